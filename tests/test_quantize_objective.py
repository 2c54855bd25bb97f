"""--selective-tokens picks tokens once per batch; --downstream-router has its own weight --lambda-downstream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pascal_moe.quant import run as qrun
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.objective import fixed_selection

DEEPSEEK = {"num_key_value_heads": 4}  # see test_quantize_archs.FIX


@pytest.fixture
def calib(text_calib) -> Path:
    return text_calib(6)


def blocks(model: Path, calib: Path, out: Path, **kw) -> list[dict]:
    cfg = dict(
        model=str(model),
        calib=str(calib),
        out=str(out),
        scheme="int4-g32",
        method="vsraq",
        iters=4,
        tokens=256,
        seq_len=32,
        batch_size=4,
        min_expert_tokens=2,
        device="cpu",
    )
    qrun.run(QuantizeConfig(**{**cfg, **kw}))
    return json.loads((out / "quantize.json").read_text())["blocks"]


def test_fixed_selection_by_hand() -> None:
    """Real tokens' errors 0.1 0.5 0.9 | 0.3 0.7 -> median 0.5 -> 0.9 and 0.7 selected; padding (2.0) never."""
    errors = [torch.tensor([0.1, 0.5, 0.9, 2.0]), torch.tensor([0.3, 0.7])]
    masks = [torch.tensor([True, True, True, False]), torch.tensor([True, True])]
    sel = fixed_selection(errors, masks, 0.5)
    assert [s.tolist() for s in sel] == [[False, False, True, False], [False, True]]
    assert [s.sum().item() for s in fixed_selection(errors, masks, 0.0)] == [2, 2]  # all but the minimum


@pytest.mark.parametrize("quantile, share", [(0.5, 0.5), (0.75, 0.25)])
def test_selected_share_is_fixed_at_the_rtn_start(
    quantile: float, share: float, tiny_moe_dir, calib: Path, tmp_path: Path
) -> None:
    """The share per block is the RTN-start share (tokens above the quantile), whatever the optimiser does."""
    got = blocks(tiny_moe_dir("qwen3_moe"), calib, tmp_path / "q", selective_tokens=True, selective_quantile=quantile)
    for b in got:
        assert share - 0.02 <= b["selected_share"] <= share, (b["layer"], b["selected_share"])
    plain = blocks(tiny_moe_dir("qwen3_moe"), calib, tmp_path / "p")
    assert all(b["selected_share"] == 1.0 for b in plain)


def test_downstream_term_has_its_own_weight(tiny_moe_dir, calib: Path, tmp_path: Path) -> None:
    """objective = recon + lambda_router * own + lambda_downstream * next router, per block (DeepSeek: dense, 2 MoE)."""
    model = tiny_moe_dir("deepseek_v3", **DEEPSEEK)
    own = blocks(model, calib, tmp_path / "a", downstream_router=True, lambda_router=0.1, lambda_downstream=0.5)
    assert own[0]["router_rtn"] == 0 and own[0]["downstream_rtn"] > 0  # dense block 0: the next router only
    assert own[2]["downstream_rtn"] == 0  # last block: no next router
    for b in own:
        want = b["loss_rtn"] + 0.1 * b["router_rtn"] + 0.5 * b["downstream_rtn"]
        assert b["objective_rtn"] == pytest.approx(want, rel=1e-5)
    same = blocks(model, calib, tmp_path / "b", downstream_router=True, lambda_router=0.1)  # default: = lambda_router
    for b in same:
        assert b["objective_rtn"] == pytest.approx(
            b["loss_rtn"] + 0.1 * (b["router_rtn"] + b["downstream_rtn"]), rel=1e-5
        )
    off = blocks(model, calib, tmp_path / "c", downstream_router=True, lambda_downstream=0.0)
    plain = blocks(model, calib, tmp_path / "d")
    assert [b["loss_final"] for b in off] == [b["loss_final"] for b in plain]
    assert all(b["downstream_rtn"] == 0 for b in off)


def test_router_term_averages_over_the_fixed_selection_while_weights_move(tiny_moe_model) -> None:
    """make_objective's router term is the mean over the given tokens, before and after the weights change."""
    from torch.nn.utils import parametrize

    from pascal_moe.models import moe_layers
    from pascal_moe.models.base import decoder_layers
    from pascal_moe.quant import losses as L
    from pascal_moe.quant.blocks import TensorCache, block_forward, capture_block_inputs, router_tap
    from pascal_moe.quant.objective import BlockSetup, fp_targets, make_objective
    from pascal_moe.quant.run import layer_targets
    from pascal_moe.quant.schemes import parse_scheme
    from pascal_moe.quant.signround import QuantParams, quantized

    model = tiny_moe_model("qwen3_moe")
    for p in model.parameters():
        p.requires_grad_(False)
    moe, layer, scheme = moe_layers(model)[0], decoder_layers(model)[0], parse_scheme("int4-g32")
    ids = torch.randint(2, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    xs, ys = TensorCache(), TensorCache()
    batches = capture_block_inputs(model, [(ids, torch.ones_like(ids))], xs)
    setup = BlockSetup(0, layer, moe, None, None, batches)
    tg = fp_targets(setup, xs, ys, downstream=False)
    targets, _ = layer_targets(model, 0, moe, None, 0)
    params = [QuantParams.init(getattr(t.module, t.param), scheme, t.in_dim, None) for t in targets]
    sel = [torch.arange(32) % 3 == 0]  # [N] a fixed, arbitrary token subset
    w = L.RouterLossWeights()
    with quantized(targets, params, scheme):
        obj = make_objective(setup, xs, ys, tg, 0.1, 0.0, w, sel)
        for _step in range(2):
            with torch.no_grad(), router_tap(moe.router) as logs, parametrize.cached():
                block_forward(layer, xs[0], batches[0].kwargs[0])
            per_token = L.router_loss(logs[-1], tg.zs[0], tg.pis[0], moe.spec.top_k, w)  # [N]
            assert obj(0).router == pytest.approx(float(per_token[sel[0]].mean()), rel=1e-5)
            with torch.no_grad():  # move the weights as an optimiser would
                for p in params:
                    p.v.copy_(torch.rand_like(p.v) - 0.5)
