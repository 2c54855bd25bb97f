"""`signround.freeze` quantizes large weights slice by slice (issue #15): the same bits and scales as one piece.

Checked to fail: with `_row_chunks` yielding row ranges one row too long, 6 of the 8 slicing cases fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pascal_moe.quant import signround
from pascal_moe.quant.schemes import fake_quantize, int_scale, parse_scheme, to_groups
from pascal_moe.quant.signround import QuantParams, QuantTarget, freeze


class Holder(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)


def reference(w: torch.Tensor, scheme, in_dim: int, p: QuantParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-piece freeze: scales of the whole tensor and its fake-quantized copy."""
    v, a, b = p.effective()
    g, _ = to_groups(w.float(), in_dim % w.dim(), scheme.group_size)
    return fake_quantize(w, scheme, in_dim, v, a, b), int_scale(g, scheme, a, b).squeeze(-1)


@pytest.mark.parametrize("shape, in_dim", [((6, 10, 96), 2), ((6, 96, 10), 1), ((40, 200), 1), ((96, 12), 0)])
@pytest.mark.parametrize("learn", [True, False])
def test_sliced_freeze_matches_one_piece(monkeypatch, shape: tuple, in_dim: int, learn: bool) -> None:
    torch.manual_seed(0)
    scheme = parse_scheme("int3-g32")
    w = torch.randn(*shape)
    d = in_dim % w.dim()
    rows = torch.rand(w.numel() // w.shape[d]) > 0.3  # some fallback rows
    p = QuantParams.init(w, scheme, in_dim, rows, learn=learn)
    if learn:
        with torch.no_grad():
            p.v.copy_(torch.rand_like(p.v) - 0.5)  # type: ignore[union-attr]
            p.alpha.uniform_(0.5, 1.0)
            p.beta.uniform_(0.5, 1.0)
    want_w, want_s = reference(w, scheme, in_dim, p)
    monkeypatch.setattr(signround, "FREEZE_CHUNK_BYTES", 4 * w[0].numel())  # one index of dim 0 per slice
    m = Holder(w)
    scales = freeze([QuantTarget("w", m, "w", in_dim)], [p], scheme)
    assert torch.equal(m.w.data, want_w)
    assert torch.equal(scales["w"], want_s)


def test_rtn_params_hold_no_rounding_offsets() -> None:
    w = torch.randn(4, 64)
    scheme = parse_scheme("int4-g32")
    lazy, full = QuantParams.init(w, scheme, 1, None, learn=False), QuantParams.init(w, scheme, 1, None)
    assert lazy.v is None and full.v is not None and full.v.shape == (4, 2, 32)
    assert torch.equal(fake_quantize(w, scheme, 1, *lazy.effective()), fake_quantize(w, scheme, 1, *full.effective()))
    with pytest.raises(ValueError, match="learn=False"):
        lazy.tensors()
