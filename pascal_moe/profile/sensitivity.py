"""Quantization sensitivity of each expert: boundary margins, weight error, re-routing, and their combination.

Shape legend: N real tokens of a batch, L MoE layers, E routed experts, k experts
per token, H hidden size, I expert intermediate size, NB histogram bins.

Formulas (per MoE layer l, expert e; all sums over the profiled real tokens):
- boundary / margin: s = `layer.choice_scores(z_fp)` (the score whose top-k *is*
  the selection: logits for softmax routers, sigmoid + bias with group masking for
  sigmoid routers).  For each token, gap = s_(k) - s_(k+1) (k-th minus (k+1)-th
  largest; skipped when the (k+1)-th is masked, -inf).  `boundary_tokens[e]` counts
  tokens where e is the k-th or the (k+1)-th choice; `margin_mean` is the mean gap over
  them, `margin_p10`/`margin_p50` its quantiles read from a fixed log-spaced histogram
  (bounded memory, ~7% relative bin width).  Small gaps = near-misses RTN can flip.
- weight_error[e] = sum_t ||f_q(x_t) - f(x_t)||^2 / sum_t ||f(x_t)||^2 over tokens t routed
  to e in the fp model (at most `cap` random ones per expert per batch, to bound the cost),
  where f(x) = (act(x W_g^T) * (x W_u^T)) W_d^T is expert e's MLP from
  the fused tensors (gate rows first in gate_up_proj) and f_q uses only e's weights RTN-quantized.
- reroute_rate[e] = |{t : e in T_fp(t), e not in T_q(t)}| / |{t : e in T_fp(t)}| where T_q is the
  top-k set of the whole-model RTN-quantized forward on the same batch (every decoder-layer
  Linear except routers, plus all expert tensors; embeddings, norms, lm_head stay fp), run by
  `LayerwiseRTN`: one decoder layer quantized at a time, so no RTN copy of the model is held.
- layer_jaccard[l] = mean_t |T_fp ∩ T_q| / |T_fp ∪ T_q|.
- sensitivity = mean(r(weight_error), r(reroute_rate)) with r the rank normalised to [0, 1]
  within the model ((average rank - 1) / (n - 1)); a term missing for an expert (no routed
  tokens, or an expert layout we cannot evaluate) counts as the median 0.5.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn

from pascal_moe.models import MoELayer
from pascal_moe.models.base import decoder_layers
from pascal_moe.profile.capture import RoutedBatch
from pascal_moe.quant.schemes import Scheme, fake_quantize

# Margin histogram: bin 0 = [0, 1e-7), then log-spaced to 1e3, last bin = overflow.
EDGES = np.concatenate([[0.0], np.logspace(-7, 3, 321)])
_EDGES_T = torch.tensor(EDGES[1:], dtype=torch.float64)


class MarginStats:
    """Boundary-token counts and the fp choice-score gap between the k-th and (k+1)-th choice."""

    def __init__(self, n_layers: int, n_experts: int) -> None:
        self.E = n_experts
        nb = len(EDGES)  # underflow + bins + overflow
        self.hist = torch.zeros(n_layers, n_experts * nb, dtype=torch.int32)  # [L, E*NB] counts (exact, half of fp64)
        self.gap_sum = torch.zeros(n_layers, n_experts, dtype=torch.float64)  # [L, E]
        self.count = torch.zeros(n_layers, n_experts, dtype=torch.float64)  # [L, E]

    def add(self, rb: RoutedBatch) -> None:
        """Histogram the boundary gaps the recorder kept (`capture_routing(margins=True)`)."""
        assert rb.gaps is not None, "margins need the boundary gaps (capture_routing(margins=True))"
        nb = len(EDGES)
        for li, g in enumerate(rb.gaps):
            if g is None:  # k >= E: no (k+1)-th choice
                continue
            ok = torch.isfinite(g[0])
            gap, ex = g[0][ok], g[1][ok]  # [n], [n, 2]
            b = torch.bucketize(gap, _EDGES_T.to(gap.device), right=True)  # [n] 0..NB-1
            ex = ex.reshape(-1)  # [2n]
            g2 = gap.repeat_interleave(2)  # [2n]
            self.hist[li] += torch.bincount(ex * nb + b.repeat_interleave(2), minlength=self.E * nb).int().cpu()
            self.gap_sum[li] += torch.zeros(self.E, dtype=torch.float64, device=g2.device).scatter_add_(0, ex, g2).cpu()
            self.count[li] += torch.bincount(ex, minlength=self.E).double().cpu()

    def quantile(self, q: float) -> np.ndarray:
        """[L, E] q-quantile of the gap, linear within the histogram bin (NaN without boundary tokens)."""
        L = self.hist.shape[0]
        h = self.hist.view(L, self.E, -1).numpy()  # [L, E, NB] int32
        cum = h.cumsum(-1, dtype=np.int64)
        tot = cum[..., -1:]
        target = q * tot  # [L, E, 1]
        b = (cum < target).sum(-1)  # first bin where cum >= target
        b = np.minimum(b, h.shape[-1] - 1)
        lo = np.append(EDGES, EDGES[-1])[b]
        hi = np.append(EDGES, EDGES[-1])[np.minimum(b + 1, len(EDGES))]
        before = np.take_along_axis(cum, b[..., None], -1)[..., 0] - np.take_along_axis(h, b[..., None], -1)[..., 0]
        inbin = np.take_along_axis(h, b[..., None], -1)[..., 0]
        frac = np.where(inbin > 0, (target[..., 0] - before) / np.maximum(inbin, 1), 0.0)
        out = lo + np.clip(frac, 0, 1) * (hi - lo)
        return np.where(tot[..., 0] > 0, out, np.nan)

    def frame(self) -> dict[str, np.ndarray]:
        c = self.count.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(c > 0, self.gap_sum.numpy() / c, np.nan)
        return {
            "boundary_tokens": c.astype(np.int64),
            "margin_mean": mean,
            "margin_p10": self.quantile(0.10),
            "margin_p50": self.quantile(0.50),
        }


LayerHook = Callable[[int, Callable[[torch.Tensor], torch.Tensor]], None]


class LayerwiseRTN:
    """The whole-model RTN forward without a quantized copy of the model: one decoder layer at a time.

    What is quantized (as before): every decoder-layer Linear weight except the routers, plus every
    expert tensor along its input dim (`fake_quantize`, no learnt rounding); embeddings, norms and
    lm_head stay fp.  How: inside `applied()`, a forward pre-hook on decoder layer d replaces the
    `.data` of d's weights by their RTN values (the fp tensors are kept by reference, not copied) and
    the layer's forward hook (or the next layer's pre-hook, or `finally` when the forward stops early)
    puts the fp tensors back.  Layer d therefore sees exactly the hidden states of the all-layers-
    quantized forward, so reroute and Jaccard are unchanged, and peak extra memory is one decoder
    layer's quantized weights (plus `fake_quantize`'s fp32 temporaries of one tensor), instead of a
    full RTN copy of the decoder (~60 GB for a 30B bf16 model).  The price: RTN is recomputed on every
    forward (`seconds` counts it); it is elementwise work, small next to the forward's matmuls.
    """

    def __init__(self, model: nn.Module, layers: list[MoELayer], scheme: Scheme) -> None:
        self.scheme = scheme
        self.decoder = decoder_layers(model)
        self.layers = layers
        self.moe: dict[int, list[int]] = {}  # decoder index -> MoE ordinals in it
        for li, layer in enumerate(layers):
            self.moe.setdefault(layer.layer_index, []).append(li)
        self.active: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, fp data) of the swapped layer
        self.seconds = 0.0

    def _params(self, d: int) -> list[tuple[torch.Tensor, int]]:
        """(param, in_dim) of decoder layer d, looked up now: a streamed (offloaded) block gets new
        parameter objects each time it is read from the checkpoint, so none is kept between forwards."""
        routers = {id(layer.router) for layer in self.layers}
        block = self.decoder[d]
        cands = [(et.tensor, et.in_dim) for li in self.moe.get(d, []) for et in self.layers[li].experts]
        cands += [(m.weight, 1) for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in routers]
        seen: set[int] = set()
        group = []
        for p, in_dim in cands:
            if id(p) not in seen:
                seen.add(id(p))
                group.append((p, in_dim))
        return group

    def fp(self, param: torch.Tensor) -> torch.Tensor:
        """The fp data of a parameter of the layer now quantized (KeyError for any other)."""
        for p, fp in self.active:
            if p is param:
                return fp
        raise KeyError("parameter is not in the quantized layer")

    @torch.no_grad()
    def _swap_in(self, d: int) -> None:
        self._restore()
        t0 = time.perf_counter()
        for p, in_dim in self._params(d):
            fp = p.data
            p.data = fake_quantize(fp, self.scheme, in_dim=in_dim)
            self.active.append((p, fp))
        self.seconds += time.perf_counter() - t0

    def _restore(self) -> None:
        while self.active:
            p, fp = self.active.pop()
            p.data = fp

    @contextmanager
    def applied(self, on_layer: LayerHook | None = None) -> Iterator[None]:
        """Forwards inside run quantized, layer by layer; `on_layer(moe_ordinal, self.fp)` is called for
        each MoE layer while its decoder layer is quantized (before it runs); fp weights restored on exit."""

        def pre(d: int):
            def hook(module: nn.Module, args: tuple) -> None:
                self._swap_in(d)
                if on_layer is not None:
                    for li in self.moe.get(d, []):
                        on_layer(li, self.fp)

            return hook

        handles = []
        try:
            for d, block in enumerate(self.decoder):
                handles.append(block.register_forward_pre_hook(pre(d)))
                handles.append(
                    block.register_forward_hook(lambda *_: self._restore(), prepend=True)
                )  # before a streamed block is dropped
            yield
        finally:
            self._restore()
            for h in handles:
                h.remove()


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """Expert MLP from fused weights: x [n, H] with gate_up [2I, H] (gate rows first), down [H, I] -> [n, H];
    batched over experts as x [E, c, H], gate_up [E, 2I, H], down [E, H, I] -> [E, c, H]."""
    gate, up = (x @ gate_up.transpose(-1, -2)).chunk(2, dim=-1)  # [..., I] each
    return (act(gate) * up) @ down.transpose(-1, -2)  # [..., H]


def fused_pair(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate_up [E, 2I, H], down [E, H, I]) when the layer stores fused, non-transposed experts; else None."""
    t = {et.param: et for et in layer.experts if et.expert_dim == 0 and et.in_dim == 2}
    if (
        "gate_up_proj" not in t
        or "down_proj" not in t
        or getattr(t["gate_up_proj"].module, "gate_up_proj_bias", None) is not None
    ):
        return None
    return t["gate_up_proj"].tensor, t["down_proj"].tensor


def per_expert_slots(idx: torch.Tensor, n_experts: int, cap: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Up to `cap` random routed tokens per expert: (expert [M], slot [M] < cap, token [M]) from idx [N, k].

    cap <= 0 keeps every routed token (slots up to the busiest expert's count).
    """
    N, k = idx.shape
    perm = torch.randperm(N * k, generator=gen).to(idx.device)  # shuffle so a cap is a uniform subsample
    ex, order = torch.sort(idx.reshape(-1)[perm], stable=True)  # [N*k] expert ids ascending
    tok = perm[order] // k  # [N*k] token of each membership
    counts = torch.bincount(ex, minlength=n_experts)  # [E]
    slot = torch.arange(N * k, device=idx.device) - (counts.cumsum(0) - counts)[ex]  # rank within its expert
    keep = slot < cap if cap > 0 else torch.ones_like(slot, dtype=torch.bool)
    return ex[keep], slot[keep], tok[keep]


class WeightError:
    """Relative output error of each expert with only its own weights RTN-quantized, on its fp-routed tokens.

    Per batch, at most `cap` routed tokens per expert (a uniform subsample seeded by (seed, batch index), so
    it does not depend on how batches are split over workers; 0 = all) are run
    through the fp and quantized expert MLPs in one batched matmul over experts; the ratio of the
    summed squared errors to the summed squared outputs is the estimate.  `add` is called by
    `LayerwiseRTN.applied` while layer `li` is quantized (its tensors hold RTN values, `fp_of` gives
    the fp ones), so no quantized copy outlives that layer.
    """

    def __init__(self, layers: list[MoELayer], act, cap: int = 8, seed: int = 0) -> None:
        from transformers.activations import ACT2FN

        self.act = ACT2FN[act] if isinstance(act, str) else act
        self.E = layers[0].spec.n_experts
        self.cap = cap
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.num = torch.zeros(len(layers), self.E, dtype=torch.float64)  # [L, E]
        self.den = torch.zeros(len(layers), self.E, dtype=torch.float64)  # [L, E]
        self.tokens = torch.zeros(len(layers), self.E, dtype=torch.float64)  # [L, E] tokens evaluated
        self.layers = layers  # fused_pair is looked up per call: streamed blocks get new tensors per forward
        self.seconds = 0.0

    def start_batch(self, batch_index: int) -> None:
        """Seed the subsample of batch `batch_index` of the whole input (so how batches are sharded does not
        change it); the batch's layers then draw from it in layer order."""
        self.gen.manual_seed(self.seed * 1_000_003 + batch_index)

    @torch.no_grad()
    def add(self, rb: RoutedBatch, li: int, fp_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Accumulate layer `li` of batch `rb`; the layer's expert tensors must hold their RTN values now."""
        assert rb.inputs is not None, "weight error needs router inputs (capture_routing(keep_inputs=True))"
        pair = fused_pair(self.layers[li])
        if pair is None:
            return
        t0 = time.perf_counter()
        x, idx = rb.inputs[li], rb.indices[li]  # [N, H], [N, k]
        gu_q, dn_q = pair
        gu, dn = fp_of(gu_q), fp_of(dn_q)
        ex, slot, tok = per_expert_slots(idx, self.E, self.cap, self.gen)
        c = int(slot.max()) + 1
        X = x.new_zeros(self.E, c, x.shape[-1])  # [E, c, H] zero rows are padding (f(0) = 0, masked anyway)
        X[ex, slot] = x[tok]
        mask = torch.zeros(self.E, c, 1, dtype=x.dtype, device=x.device)
        mask[ex, slot] = 1
        f = expert_mlp(X, gu, dn, self.act).double()  # [E, c, H]
        fq = expert_mlp(X, gu_q, dn_q, self.act).double()  # [E, c, H]
        self.num[li] += ((fq - f).pow(2) * mask).sum((1, 2)).cpu()
        self.den[li] += (f.pow(2) * mask).sum((1, 2)).cpu()
        self.tokens[li] += mask.sum((1, 2)).double().cpu()
        self.seconds += time.perf_counter() - t0

    def values(self) -> np.ndarray:
        """[L, E]; NaN where an expert got no token or its layout is not fused [E, O, I]."""
        num, den = self.num.numpy(), self.den.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)


class Reroute:
    """Top-k set changes between the fp and the whole-model-quantized forward of the same batch."""

    def __init__(self, n_layers: int, n_experts: int) -> None:
        self.E = n_experts
        self.routed = torch.zeros(n_layers, n_experts, dtype=torch.float64)  # [L, E]
        self.lost = torch.zeros(n_layers, n_experts, dtype=torch.float64)  # [L, E]
        self.jac_sum = torch.zeros(n_layers, dtype=torch.float64)  # [L]
        self.n = 0

    def add(self, fp_indices: list[torch.Tensor], q_indices: list[torch.Tensor]) -> None:
        for li, (a, b) in enumerate(zip(fp_indices, q_indices)):
            k = a.shape[1]
            ma = torch.zeros(a.shape[0], self.E, dtype=torch.bool, device=a.device).scatter_(1, a, True)  # [N, E]
            mb = torch.zeros_like(ma).scatter_(1, b, True)
            inter = (ma & mb).sum(-1).double()  # [N]
            self.jac_sum[li] += (inter / (2 * k - inter)).sum().cpu()
            self.routed[li] += ma.sum(0).double().cpu()
            self.lost[li] += (ma & ~mb).sum(0).double().cpu()
        self.n += fp_indices[0].shape[0]

    def rate(self) -> np.ndarray:
        r = self.routed.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(r > 0, self.lost.numpy() / r, np.nan)

    def layer_rate(self) -> list[float]:
        """Per layer: lost (token, expert) memberships / all fp memberships."""
        return (self.lost.sum(1) / self.routed.sum(1).clamp(min=1)).tolist()

    def jaccard(self) -> list[float]:
        return (self.jac_sum / max(self.n, 1)).tolist()


def rank01(x: pd.Series) -> pd.Series:
    """(average rank - 1) / (n - 1) over non-NaN values; NaN stays NaN; a single value maps to 0.5."""
    n = x.notna().sum()
    if n <= 1:
        return pd.Series(np.where(x.notna(), 0.5, np.nan), index=x.index)
    return (x.rank(method="average") - 1) / (n - 1)


def combine(weight_error: pd.Series, reroute_rate: pd.Series) -> pd.Series:
    """sensitivity in [0, 1]: mean of the within-model normalised ranks (missing term = 0.5)."""
    return ((rank01(weight_error).fillna(0.5) + rank01(reroute_rate).fillna(0.5)) / 2).clip(0, 1)
