"""Weight quantization grids: symmetric group-wise integer and emulated NVFP4.

Conventions follow compressed-tensors so exported weights reload bit-exactly:
- int (symmetric): q in [-2^(b-1), 2^(b-1)-1] per group of `group_size` input
  channels, zero point 0.  A last partial group is allowed (padding with zeros
  does not change its amax).  Two grids over the same codes:
  - `ct` (default, `intB-gN`): compressed-tensors' scale = amax / ((qmax - qmin) / 2);
    the extreme weight lands at +-(2^b - 1)/2, between codes (at int2 the levels
    are {-1.33, -0.67, 0, 0.67} amax: neither extreme is representable).
  - `full` (`intB-gN-full`): auto-round's `int_sym`, scale = +-amax / 2^(b-1), the
    sign chosen so that the larger-magnitude side of the group maps to qmin (the
    extra negative level): the extreme weight is exactly on the grid.  A negative
    scale packs and reloads through compressed-tensors as it is (dequant = q * scale).
- nvfp4: FP4 E2M1 values {0, .5, 1, 1.5, 2, 3, 4, 6} (signed) in blocks of 16
  input channels; per-block scale stored as FP8 E4M3; one FP32 global scale per
  tensor, global = amax / (6 * 448), block scale = fp8(amax_block / 6 / global).

Rounding learnt by SignRound enters as `v` (offset added before rounding, in grid
steps, in [-0.5, 0.5]) and clipping factors `alpha`, `beta` (scale the positive
max and negative min of each group before the scale is computed).  Rounding
uses a straight-through estimator so gradients reach `v`, `alpha` and `beta`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from pascal_moe.errors import PascalError

FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8_E4M3_MAX = 448.0
FP4_MAX = 6.0


@dataclass(frozen=True)
class Scheme:
    name: str
    fmt: Literal["int", "nvfp4"]
    bits: int
    group_size: int
    grid: Literal["ct", "full"] = "ct"  # int only: see the module docstring

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


SCHEMES = ("int8-g128", "int4-g128", "int3-g128", "int2-g64", "int2-g64-full", "nvfp4")


def parse_scheme(name: str) -> Scheme:
    """'int4-g128' (bits 2..8, any group size; '-full' for the full-range grid), 'w4a16' (= int4-g128) or 'nvfp4'."""
    key = name.lower().strip()
    if key == "w4a16":
        key = "int4-g128"
    if key in ("nvfp4", "nvfp4a16"):
        return Scheme("nvfp4", "nvfp4", 4, 16)
    m = re.fullmatch(r"int([2-8])-g(\d+)(-full)?", key)
    if not m or int(m.group(2)) < 1:
        raise PascalError(f"unknown scheme {name!r}: use one of {', '.join(SCHEMES)} (or intB-gN[-full])")
    return Scheme(key, "int", int(m.group(1)), int(m.group(2)), "full" if m.group(3) else "ct")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def to_groups(w: torch.Tensor, in_dim: int, group_size: int) -> tuple[torch.Tensor, tuple]:
    """[..., in, ...] -> [R, G, gs] with the input dim grouped (zero-padded); returns the undo info."""
    moved = w.movedim(in_dim, -1)
    shape = moved.shape
    cols = shape[-1]
    pad = (-cols) % group_size
    flat = moved.reshape(-1, cols)
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(flat.shape[0], -1, group_size), (in_dim, shape, cols)


def from_groups(g: torch.Tensor, undo: tuple) -> torch.Tensor:
    in_dim, shape, cols = undo
    flat = g.reshape(g.shape[0], -1)[:, :cols]
    return flat.reshape(shape).movedim(-1, in_dim)


def int_scale(
    g: torch.Tensor, scheme: Scheme, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-group scale [R, G, 1] from (clipped) group max/min; negative on the full grid when max >= -min."""
    wmax = g.amax(-1, keepdim=True).clamp(min=0)
    wmin = g.amin(-1, keepdim=True).clamp(max=0)
    if alpha is not None:
        wmax = wmax * alpha
    if beta is not None:
        wmin = wmin * beta
    amax = torch.maximum(wmax, -wmin)
    if scheme.grid == "ct":
        return (amax / ((scheme.qmax - scheme.qmin) / 2)).clamp(min=1e-10)
    # full range (auto-round int_sym): the larger side (ties: the positive one) maps to qmin = -2^(b-1)
    sign = torch.where(wmax >= -wmin, -1.0, 1.0).to(amax)  # [R, G, 1]
    return sign * (amax / -scheme.qmin).clamp(min=1e-10)


def _fp4_round(y: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """Nearest E2M1 value (ties to the larger magnitude); `v` shifts by a fraction of the local grid step."""
    grid = FP4_GRID.to(y)
    a = y.abs()
    if v is not None:
        step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
        a = (a + v * torch.sign(y).where(y != 0, torch.ones_like(y)) * step).clamp(min=0)
    idx = (a.unsqueeze(-1) - grid).abs().argmin(-1)
    q = grid[idx] * torch.sign(y)
    shifted = a * torch.sign(y)  # y moved by v: the straight-through estimator passes gradients to v too
    return shifted + (q - shifted).detach() if shifted.requires_grad else q


def nvfp4_scales(
    g: torch.Tensor, global_amax: torch.Tensor, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block scale [R, G, 1] rounded to FP8 E4M3, global scale scalar)."""
    gscale = (global_amax / (FP4_MAX * FP8_E4M3_MAX)).clamp(min=1e-12)
    wmax = g.amax(-1, keepdim=True).clamp(min=0)
    wmin = g.amin(-1, keepdim=True).clamp(max=0)
    if alpha is not None:
        wmax = wmax * alpha
    if beta is not None:
        wmin = wmin * beta
    raw = torch.maximum(wmax, -wmin) / FP4_MAX / gscale
    fp8 = raw.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(raw.dtype)
    fp8 = raw + (fp8 - raw).detach()  # STE through the FP8 cast
    return fp8.clamp(min=2.0**-9), gscale


def fake_quantize(
    w: torch.Tensor,
    scheme: Scheme,
    in_dim: int = -1,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize `w` (any shape) along `in_dim`; `v` has the grouped shape [R, G, gs]."""
    in_dim = in_dim % w.dim()
    g, undo = to_groups(w.float(), in_dim, scheme.group_size)  # [R, G, gs]
    if scheme.fmt == "int":
        s = int_scale(g, scheme, alpha, beta)  # [R, G, 1]
        y = g / s + (v if v is not None else 0.0)
        q = torch.clamp(_round_ste(y), scheme.qmin, scheme.qmax)
        deq = q * s
    else:
        s, gscale = nvfp4_scales(g, w.detach().abs().amax().float(), alpha, beta)
        q = _fp4_round(g / (s * gscale), v).clamp(-FP4_MAX, FP4_MAX)
        deq = q * s * gscale
    return from_groups(deq, undo).to(w.dtype)


@dataclass(slots=True)
class IntQuantized:
    """Integer codes and scales of one 2-D weight [O, I] for export (groups along I)."""

    q: torch.Tensor  # [O, I] int8 values in [qmin, qmax]
    scale: torch.Tensor  # [O, G]


@torch.no_grad()
def int_codes(
    w: torch.Tensor,
    scheme: Scheme,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> IntQuantized:
    """Codes and scales of a 2-D weight [O, I] exactly as `fake_quantize(w, scheme, 1, ...)` rounds them."""
    g, undo = to_groups(w.float(), 1, scheme.group_size)
    s = int_scale(g, scheme, alpha, beta)
    q = torch.clamp(torch.round(g / s + (v if v is not None else 0.0)), scheme.qmin, scheme.qmax)
    return IntQuantized(from_groups(q, undo).to(torch.int8), s.squeeze(-1))
