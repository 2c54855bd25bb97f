"""The block objective on cached batches: fp targets, fixed token selection, the SignRound closure.

Shape legend: B batch rows, T tokens, D hidden, N = B*T tokens, E experts, k top-k.

Each decoder layer runs with its own kwargs (`batch.kwargs[li]`); the next layer's router
(downstream term) with the next layer's.  The selection of `--selective-tokens` is made once,
from the RTN output at the start of the block, and fixed per batch for the whole optimisation:
re-selecting on the moving output would let the alignment fade as reconstruction improves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parametrize

from pascal_moe.models import MoELayer
from pascal_moe.quant import losses as L
from pascal_moe.quant.blocks import BlockBatch, TensorCache, block_forward, logits_until_router, router_tap
from pascal_moe.quant.signround import StepLoss


@dataclass
class Targets:
    """fp references of one block, per batch: router logits z [N, E] and fp orders pi [N, E] (own, next)."""

    zs: list[torch.Tensor]
    pis: list[torch.Tensor]
    zn: list[torch.Tensor]
    pin: list[torch.Tensor]


@dataclass
class BlockSetup:
    """Everything the objective of block `li` needs besides the quantized weights."""

    li: int
    layer: torch.nn.Module
    moe: MoELayer | None  # this block's MoE (None: dense block)
    next_layer: torch.nn.Module | None
    next_moe: MoELayer | None  # block li + 1's MoE (downstream term)
    batches: list[BlockBatch]


@torch.no_grad()
def fp_targets(
    s: BlockSetup, xs: TensorCache, ys: TensorCache, downstream: bool, boundary: int | None = None
) -> Targets:
    """fp block outputs (into `ys`), fp router logits and orders, and the next router's, per batch.

    `boundary`: orders keep top_k + boundary experts per token (what the router terms read); None: all E.
    """
    t = Targets([], [], [], [])
    for i, b in enumerate(s.batches):
        with router_tap(s.moe.router if s.moe else None) as logs:
            y = block_forward(s.layer, xs[i], b.kwargs[s.li])
        ys.append(y)
        if s.moe is not None:
            t.zs.append(logs[-1].float())
            t.pis.append(L.fp_order(s.moe.choice_scores(t.zs[-1]), _keep(s.moe, boundary)))
        if downstream and s.next_moe is not None:
            t.zn.append(logits_until_router(s.next_layer, s.next_moe.router, y, b.kwargs[s.li + 1]).float())
            t.pin.append(L.fp_order(s.next_moe.choice_scores(t.zn[-1]), _keep(s.next_moe, boundary)))
    return t


def _keep(moe: MoELayer, boundary: int | None) -> int | None:
    return None if boundary is None else moe.spec.top_k + boundary


@torch.no_grad()
def fixed_selection(errors: list[torch.Tensor], masks: list[torch.Tensor], quantile: float) -> list[torch.Tensor]:
    """Selected tokens [N] per batch: real tokens whose error exceeds the `quantile` of all real tokens' errors."""
    real = torch.cat([e[m] for e, m in zip(errors, masks)]).float().cpu().numpy()
    thr = float(np.quantile(real, quantile)) if real.size else 0.0
    return [m & (e > thr) for e, m in zip(errors, masks)]


@torch.no_grad()
def rtn_errors(s: BlockSetup, xq: TensorCache, ys: TensorCache) -> list[torch.Tensor]:
    """Per-token relative output error [N] of the block as it reads now (call at the RTN start)."""
    return [L.relative_error(block_forward(s.layer, xq[i], b.kwargs[s.li]), ys[i]) for i, b in enumerate(s.batches)]


def make_objective(
    s: BlockSetup,
    xq: TensorCache,
    ys: TensorCache,
    t: Targets,
    lam: float,
    lam_down: float,
    w: L.RouterLossWeights,
    selected: list[torch.Tensor] | None,
) -> Callable[[int], StepLoss]:
    """Closure batch index -> StepLoss for SignRound (quantization already applied to the layer).

    Router terms average over `selected[i]` (fixed per batch) when given, else over real tokens.
    """

    def objective(i: int) -> StepLoss:
        b = s.batches[i]
        with router_tap(s.moe.router if s.moe else None) as logs, parametrize.cached():
            y = block_forward(s.layer, xq[i], b.kwargs[s.li])  # [B, T, D]
        recon = L.masked_mean(L.recon_loss(y, ys[i]), b.mask)
        sel = b.mask if selected is None else selected[i]
        own = down = None
        if lam > 0 and s.moe is not None:
            own = L.masked_mean(L.router_loss(logs[-1], t.zs[i], t.pis[i], s.moe.spec.top_k, w), sel)
        if lam_down > 0 and t.zn:
            zq_next = logits_until_router(s.next_layer, s.next_moe.router, y, b.kwargs[s.li + 1])
            down = L.masked_mean(L.router_loss(zq_next, t.zn[i], t.pin[i], s.next_moe.spec.top_k, w), sel)
        terms = [(lam, own)] if own is not None else []
        terms += [(lam_down, down)] if down is not None else []
        total = L.block_objective(recon, terms)
        return StepLoss(
            total,
            float(recon.detach()),
            float(own.detach()) if own is not None else 0.0,
            float(down.detach()) if down is not None else 0.0,
        )

    return objective


@torch.no_grad()
def evaluate(objective: Callable[[int], StepLoss], batches: list[BlockBatch]) -> dict[str, float]:
    """Token-weighted mean of every objective term over ALL batches (one SignRound step sees one batch)."""
    acc = {"recon": 0.0, "router": 0.0, "downstream": 0.0, "total": 0.0}
    n = 0.0
    for i, b in enumerate(batches):
        step, m = objective(i), float(b.mask.sum())
        for key, val in (
            ("recon", step.recon),
            ("router", step.router),
            ("downstream", step.downstream),
            ("total", float(step.total)),
        ):
            acc[key] += m * val
        n += m
    return {k: v / max(n, 1.0) for k, v in acc.items()}
