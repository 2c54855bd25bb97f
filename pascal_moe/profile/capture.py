"""Routing capture: each MoE layer's expert selection per forward, and exact routed-token counts.

Shape legend: B batch rows, T sequence length, N real (non-padding) tokens of a
batch, L MoE layers, E routed experts, k experts per token, H hidden size.

Why hooks on the router and not the gate's returned indices: the router's first
output is its raw logits on every supported architecture, and `layer.select`
recomputes the block's selection from them exactly (biased, group-limited top-k
included), so the same code path serves fp and quantized forwards and any
architecture whose router returns only logits.  Hooks live only inside
`capture_routing`; nothing stays on the model afterwards.

Counting rule (used by samples.parquet, experts.parquet, `route_counts` and `expert_totals`, the one
routed-count helper: synthesize's verification, balance's window coverage and eval's calibration coverage call it): a
token counts once for each expert in its top-k set, per MoE layer; padding
positions (`attention_mask == 0`) never count.  The key of (layer, expert) is
`layer * E + expert` with `layer` the MoE ordinal (docs/CONTRACTS.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pascal_moe.io.batches import Batch, batches, tokenize
from pascal_moe.models import MoELayer, moe_layers
from pascal_moe.models.hooks import StopForward, router_hooks


@dataclass
class RoutedCounts:
    """Tokens one text sent to each (layer, expert) key; `keys` ascending, zero counts left out."""

    n_tokens: int
    keys: np.ndarray  # [K] int32, key = layer * E + expert
    counts: np.ndarray  # [K] int32


@dataclass
class RoutingRecorder:
    """What the hooks kept of the last forward: one entry per MoE layer (None until that layer ran).

    Each router's logits are reduced inside its hook to the block's selection on the real tokens (and,
    with `margins`, the top-k boundary gap), so a forward holds L x [N, k] ids and weights, never
    L x [B*T, E] logits: per layer k/E of the logits (1/16 on Qwen3-30B-A3B's 128 experts, top-8).
    The real tokens come from the forward's `attention_mask` (read by a pre-hook on the model).
    `stop_early`: abort the forward right after the last MoE router ran (its experts, the
    remaining layers and the LM head are not needed for routing statistics).
    """

    n_layers: int
    keep_inputs: bool = False
    stop_early: bool = False
    margins: bool = False
    weights: list[torch.Tensor | None] = field(default_factory=list)  # each [N, k]
    indices: list[torch.Tensor | None] = field(default_factory=list)  # each [N, k]
    gaps: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # ([N], [N, 2])
    inputs: list[torch.Tensor | None] = field(default_factory=list)  # each [N, H] (router input = expert input)
    real: torch.Tensor | None = None  # [N] flat positions of the forward's real tokens; None: all (no mask seen)

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.weights = [None] * self.n_layers
        self.indices = [None] * self.n_layers
        self.gaps = [None] * self.n_layers
        self.inputs = [None] * self.n_layers

    def record(self, i: int, layer: MoELayer, logits: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Keep layer i's selection (and boundary gap, router input x) of the real tokens; the logits are dropped."""
        z = logits.detach()  # [B*T, E]
        real = self.real.to(z.device) if self.real is not None else None
        z = (z.index_select(0, real) if real is not None else z).float()  # [N, E]
        self.weights[i], self.indices[i] = layer.select(z)  # [N, k] each
        if self.margins:
            self.gaps[i] = boundary_gap(layer, z)
        if x is not None:
            x = x.reshape(-1, x.shape[-1]).detach()  # [B*T, H]
            self.inputs[i] = x.index_select(0, real) if real is not None else x  # [N, H]


def boundary_gap(layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per token the choice-score gap s_(k) - s_(k+1) [N] (float64; -inf/NaN where the (k+1)-th is
    masked) and the experts holding the k-th and (k+1)-th place [N, 2]; None when k >= E."""
    k = layer.spec.top_k
    if k >= logits.shape[-1]:
        return None
    top = layer.choice_scores(logits).topk(k + 1, dim=-1)  # values/indices [N, k+1]
    return (top.values[:, k - 1] - top.values[:, k]).double(), top.indices[:, k - 1 : k + 1]


@contextmanager
def capture_routing(
    model: nn.Module,
    layers: list[MoELayer] | None = None,
    keep_inputs: bool = False,
    stop_early: bool = False,
    margins: bool = False,
) -> Iterator[RoutingRecorder]:
    """Record every MoE layer's selection (with `margins` its boundary gap, with `keep_inputs` its router
    inputs); hooks removed on exit.

    The recorder keeps only the latest forward (memory of one batch); call `clear()` between forwards
    if you need to detect a layer that did not run.  `stop_early` aborts each forward after the last
    router (use `forward` below, which catches it); leave it off for models whose forward holds state
    that an exception would leave behind (e.g. offloading hooks).
    """
    layers = layers if layers is not None else moe_layers(model)
    rec = RoutingRecorder(len(layers), keep_inputs, stop_early, margins)
    last = len(layers) - 1

    def on_logits(i: int, logits: torch.Tensor, args: tuple) -> None:
        rec.record(i, layers[i], logits, args[0] if keep_inputs else None)
        if rec.stop_early and i == last:
            raise StopForward

    def on_call(_model: nn.Module, _args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        rec.real = mask.reshape(-1).bool().nonzero().squeeze(-1) if mask is not None and mask.dim() == 2 else None

    handle = model.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        with router_hooks([lay.router for lay in layers], on_logits):
            yield rec
    finally:
        handle.remove()


@dataclass
class RoutedBatch:
    """One batch's routing restricted to real tokens (padding already dropped)."""

    batch: Batch
    token_ids: torch.Tensor  # [N] input id of each real token
    rows: torch.Tensor  # [N] batch row of each real token
    positions: torch.Tensor  # [N] position within its sample
    weights: list[torch.Tensor]  # L x [N, k]
    indices: list[torch.Tensor]  # L x [N, k]
    gaps: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # L x ([N], [N, 2]) with margins
    inputs: list[torch.Tensor] | None = None  # L x [N, H] router/expert inputs when captured

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())


def forward(model: nn.Module, batch: Batch) -> None:
    """One inference forward; `logits_to_keep=1` skips the vocabulary projection for all but one position;
    a `StopForward` from a recorder with `stop_early` ends it after the last MoE router."""
    dev = next(model.parameters()).device
    try:
        model(
            input_ids=batch.input_ids.to(dev),
            attention_mask=batch.attention_mask.to(dev),
            use_cache=False,
            logits_to_keep=1,
        )
    except StopForward:
        pass


def routed_batch(batch: Batch, rec: RoutingRecorder, layers: list[MoELayer]) -> RoutedBatch:
    """Turn the recorder's last forward into real-token routing (padding rows removed)."""
    if any(z is None for z in rec.indices):
        missing = [i for i, z in enumerate(rec.indices) if z is None]
        raise RuntimeError(f"MoE layers {missing} did not run in the forward (router hooks saw nothing)")
    mask = batch.attention_mask.reshape(-1).bool()  # [B*T]
    dev = rec.indices[0].device
    real = mask.nonzero().squeeze(-1).to(dev)  # [N] flat positions of real tokens
    B, T = batch.input_ids.shape

    def rows(xs: list) -> list:  # the recorder kept real rows already unless the forward had no mask
        return xs if rec.real is not None else [x.index_select(0, real) for x in xs]

    gaps = rec.gaps if rec.real is not None else [None if g is None else (g[0][real], g[1][real]) for g in rec.gaps]
    return RoutedBatch(
        batch=batch,
        token_ids=batch.input_ids.reshape(-1).to(dev)[real],
        rows=real // T,
        positions=real % T,
        weights=rows(rec.weights),
        indices=rows(rec.indices),
        gaps=gaps if rec.margins else None,
        inputs=rows(rec.inputs) if rec.keep_inputs else None,
    )


class CountAccumulator:
    """Per-sample sparse key counts and per-(layer, expert) totals: tokens and routing-weight mass."""

    def __init__(self, n_samples: int, n_layers: int, n_experts: int) -> None:
        self.L, self.E = n_layers, n_experts
        self.samples: list[RoutedCounts] = [
            RoutedCounts(0, np.zeros(0, np.int32), np.zeros(0, np.int32)) for _ in range(n_samples)
        ]
        self.tokens = torch.zeros(n_layers * n_experts, dtype=torch.float64)  # [L*E]
        self.weight_mass = torch.zeros(n_layers * n_experts, dtype=torch.float64)  # [L*E]
        self.n_tokens = 0

    def add(self, rb: RoutedBatch) -> None:
        L, E = self.L, self.E
        B = len(rb.batch.sample_index)
        offs = torch.arange(L, device=rb.rows.device).view(1, L, 1) * E  # [1, L, 1]
        keys = torch.stack(rb.indices, 1) + offs  # [N, L, k]
        flat = (rb.rows.view(-1, 1, 1) * (L * E) + keys).reshape(-1)  # [N*L*k]
        per_row = torch.bincount(flat, minlength=B * L * E).view(B, L * E).cpu()  # [B, L*E]
        w = torch.stack(rb.weights, 1).reshape(-1).double()  # [N*L*k]
        self.weight_mass += (
            torch.zeros(L * E, dtype=torch.float64, device=w.device).scatter_add_(0, keys.reshape(-1), w).cpu()
        )
        self.tokens += per_row.sum(0).double()
        n_per_row = torch.bincount(rb.rows, minlength=B).cpu()
        self.n_tokens += rb.n_tokens
        for r, s in enumerate(rb.batch.sample_index):
            nz = per_row[r].nonzero().squeeze(-1)
            self.samples[s] = RoutedCounts(
                int(n_per_row[r]), nz.numpy().astype(np.int32), per_row[r, nz].numpy().astype(np.int32)
            )


def iter_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> tuple[list[list[int]], Iterator[Batch]]:
    """Token ids of each text (truncated to `seq_len`) and right-padded batches over them."""
    ids = tokenize(texts, tokenizer, seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ids, batches(ids, batch_size, pad)


@torch.no_grad()
def route_counts(
    model: nn.Module, tokenizer, texts: list[str], seq_len: int, batch_size: int = 8
) -> list[RoutedCounts]:
    """Per text: real tokens and sparse (layer, expert) routed-token counts, as samples.parquet counts them."""
    ids = tokenize(texts, tokenizer, seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return route_token_ids(model, ids, batch_size, pad)


@torch.no_grad()
def route_token_ids(
    model: nn.Module, token_ids: list[list[int]], batch_size: int = 8, pad_id: int = 0
) -> list[RoutedCounts]:
    """Per row of token ids (used as they are, e.g. packed windows): routed-token counts, same counting rule."""
    return _accumulate(model, token_ids, batch_size, pad_id).samples


@torch.no_grad()
def expert_totals(model: nn.Module, token_ids: list[list[int]], batch_size: int = 8, pad_id: int = 0) -> torch.Tensor:
    """Tokens routed to each expert [L, E] over all rows (e.g. a calibration set's coverage), same counting rule."""
    acc = _accumulate(model, token_ids, batch_size, pad_id)
    return acc.tokens.view(acc.L, acc.E).round().long()


def _accumulate(model: nn.Module, token_ids: list[list[int]], batch_size: int, pad_id: int) -> CountAccumulator:
    layers = moe_layers(model)
    acc = CountAccumulator(len(token_ids), len(layers), layers[0].spec.n_experts)
    with capture_routing(model, layers, stop_early=True) as rec:
        for batch in batches(token_ids, batch_size, pad_id):
            rec.clear()
            forward(model, batch)
            acc.add(routed_batch(batch, rec, layers))
    return acc
