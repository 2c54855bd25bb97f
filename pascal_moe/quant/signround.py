"""SignRound for one block: learnable rounding V and clipping (alpha, beta), signed gradient descent.

The loop is pure: it gets the block's weights to quantize (`QuantTarget`s) and a closure that
returns the block objective on batch `b`; it knows nothing of models, hooks or devices.

Parameter shapes (weights grouped along their input dim, `schemes.to_groups`): R rows (all dims
but the input dim, flattened), G groups, gs group size.  V [R, G, gs] in [-0.5, 0.5];
alpha, beta [R, G, 1] in [0.5, 1] (scale the group max / min), all initialised as AutoRound
does (V = 0, alpha = beta = 1, i.e. the first iterate is exactly RTN).  Update (AutoRound's
SignSGD): p <- p - lr_t * sign(grad), lr_t = lr * (1 - t / iters) (linear decay); the iterate
with the lowest loss is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from pascal_moe.quant.schemes import Scheme, fake_quantize, int_scale, to_groups

CLIP_MIN, CLIP_MAX = 0.5, 1.0


@dataclass
class QuantTarget:
    """One weight to quantize: `module.<param>` grouped along `in_dim`."""

    name: str  # full parameter name in the model, e.g. model.layers.0.mlp.experts.gate_up_proj
    module: nn.Module
    param: str
    in_dim: int
    trainable_rows: torch.Tensor | None = None  # [R] bool; False rows = fallback (RTN, V = 0, alpha = beta = 1)


@dataclass
class QuantParams:
    """Learnable rounding offsets and clipping factors of one target."""

    v: torch.Tensor | None  # [R, G, gs]; None: never learnt (plain RTN), read as 0
    alpha: torch.Tensor  # [R, G, 1]
    beta: torch.Tensor  # [R, G, 1]
    rows: torch.Tensor | None = None  # [R] bool trainable mask (None: all)

    @classmethod
    def init(
        cls, w: torch.Tensor, scheme: Scheme, in_dim: int, rows: torch.Tensor | None, learn: bool = True
    ) -> "QuantParams":
        """V = 0, alpha = beta = 1 (RTN); `learn=False` skips V, a zero copy of the weight RTN never reads."""
        d = in_dim % w.dim()
        n_rows, cols = w.numel() // w.shape[d], w.shape[d]
        n_groups = -(-cols // scheme.group_size)
        ones = torch.ones(n_rows, n_groups, 1, device=w.device)
        v = torch.zeros(n_rows, n_groups, scheme.group_size, device=w.device).requires_grad_() if learn else None
        return cls(v, ones.clone().requires_grad_(), ones.clone().requires_grad_(), rows)

    def tensors(self) -> list[torch.Tensor]:
        if self.v is None:
            raise ValueError("these parameters were made with learn=False: nothing to train")
        return [self.v, self.alpha, self.beta]

    def effective(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(v, alpha, beta) with fallback rows reset to RTN defaults."""
        if self.rows is None:
            return self.v, self.alpha, self.beta
        m = self.rows.view(-1, 1, 1)
        return (
            None if self.v is None else self.v * m,
            torch.where(m, self.alpha, torch.ones_like(self.alpha)),
            torch.where(m, self.beta, torch.ones_like(self.beta)),
        )

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors()]

    def rows_slice(self, r0: int, r1: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`effective()` of rows r0:r1 only (no full-size V * mask copy)."""
        sub = QuantParams(
            None if self.v is None else self.v[r0:r1],
            self.alpha[r0:r1],
            self.beta[r0:r1],
            None if self.rows is None else self.rows[r0:r1],
        )
        return sub.effective()

    def load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors(), values):
                t.copy_(v)


class FakeQuant(nn.Module):
    """Parametrization: weight -> fake_quantize(weight, scheme, in_dim, V, alpha, beta)."""

    def __init__(self, scheme: Scheme, in_dim: int, params: QuantParams):
        super().__init__()
        self.scheme, self.in_dim, self.params = scheme, in_dim, params

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v, a, b = self.params.effective()
        return fake_quantize(w, self.scheme, self.in_dim, v, a, b)


@contextmanager
def quantized(targets: list[QuantTarget], params: list[QuantParams], scheme: Scheme) -> Iterator[None]:
    """Within the block, every target weight reads as its fake-quantized value; undone in `finally`."""
    done: list[QuantTarget] = []
    try:
        for t, p in zip(targets, params):
            parametrize.register_parametrization(t.module, t.param, FakeQuant(scheme, t.in_dim, p), unsafe=True)
            done.append(t)
        yield
    finally:
        for t in done:
            parametrize.remove_parametrizations(t.module, t.param, leave_parametrized=False)


@torch.no_grad()
def freeze(targets: list[QuantTarget], params: list[QuantParams], scheme: Scheme) -> dict[str, torch.Tensor]:
    """Write the fake-quantized weights in place; return each int target's scales [R, G] (for export)."""
    scales: dict[str, torch.Tensor] = {}
    for t, p in zip(targets, params):
        w = getattr(t.module, t.param)
        if scheme.fmt != "int":  # nvfp4's global scale reads the whole tensor: one piece
            w.data.copy_(fake_quantize(w.data, scheme, t.in_dim, *p.effective()))
            continue
        parts = []
        for s0, s1, r0, r1 in _row_chunks(w, t.in_dim):
            v, a, b = p.rows_slice(r0, r1)
            piece = w.data[s0:s1]
            g, _ = to_groups(piece.float(), t.in_dim % w.dim(), scheme.group_size)
            parts.append(int_scale(g, scheme, a, b).squeeze(-1).cpu())  # [r1 - r0, G]
            piece.copy_(fake_quantize(piece, scheme, t.in_dim, v, a, b))
        scales[t.name] = torch.cat(parts) if len(parts) > 1 else parts[0]  # [R, G]
    return scales


FREEZE_CHUNK_BYTES = 4 << 20


def _row_chunks(w: torch.Tensor, in_dim: int) -> Iterator[tuple[int, int, int, int]]:
    """Slices s0:s1 of w's dim 0 of ~FREEZE_CHUNK_BYTES and their grouped rows r0:r1.

    Why: quantize-dequantize makes several weight-sized fp32 temporaries (a fused [E, O, I] expert
    tensor: 32 MiB each at Qwen3-30B's shape); per slice they stay small.  Every op is per group,
    so the slices give the same bits.  With the input dim first, dim 0 is not a row dim: one piece.
    """
    n = w.shape[0]
    if in_dim % w.dim() == 0 or n < 2:
        yield 0, n, 0, w.numel() // w.shape[in_dim % w.dim()]
        return
    per = w.numel() // (n * w.shape[in_dim % w.dim()])  # grouped rows per index of dim 0
    step = max(1, FREEZE_CHUNK_BYTES // max(w[0].numel() * 4, 1))
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        yield s0, s1, s0 * per, s1 * per


@dataclass
class StepLoss:
    """What the objective closure returns for one batch."""

    total: torch.Tensor  # scalar, differentiable
    recon: float
    router: float  # own router term (unweighted)
    downstream: float = 0.0  # next layer's router term (unweighted)


@dataclass
class BlockResult:
    first: StepLoss
    best: StepLoss
    best_iter: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def sign_round(
    params: list[QuantParams],
    objective: Callable[[int], StepLoss],
    n_batches: int,
    iters: int,
    lr: float | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> BlockResult:
    """Minimise `objective` over V/alpha/beta by SignSGD; load the best iterate into `params`."""
    t0 = time.perf_counter()
    lr = lr if lr is not None else 1.0 / max(iters, 1)
    order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(seed)).tolist()
    trainable = [t for p in params for t in p.tensors()]
    best_vals = [p.snapshot() for p in params]
    detach = lambda s: StepLoss(s.total.detach(), s.recon, s.router, s.downstream)  # noqa: E731
    first: StepLoss | None = None
    best: StepLoss | None = None
    best_iter, hist = 0, []
    for it in range(iters):
        step = objective(order[it % n_batches])
        loss = float(step.total.detach())
        hist.append(loss)
        if first is None:
            first = detach(step)
        if best is None or loss < float(best.total):
            best, best_iter = detach(step), it
            best_vals = [p.snapshot() for p in params]
        for t in trainable:
            t.grad = None
        step.total.backward()
        lr_t = lr * (1.0 - it / iters)
        with torch.no_grad():
            for p in params:
                v, _, _ = ts = p.tensors()
                for t in ts:
                    if t.grad is not None:
                        t.sub_(lr_t * torch.sign(t.grad))
                v.clamp_(-0.5, 0.5)
                p.alpha.clamp_(CLIP_MIN, CLIP_MAX)
                p.beta.clamp_(CLIP_MIN, CLIP_MAX)
        if progress is not None:
            progress(it, loss)
    for t in trainable:
        t.grad = None
    for p, vals in zip(params, best_vals):
        p.load(vals)
    assert first is not None and best is not None, "iters must be >= 1"
    return BlockResult(first, best, best_iter, time.perf_counter() - t0, hist)
