"""Metrics of a quantized MoE against its full-precision model, streamed batch by batch.

Shape legend: B windows in a batch, T tokens per window, V vocabulary, N = B*T
flattened tokens, L MoE layers, E routed experts, k experts per token, P prompts,
G generated tokens.

Why both models see the *same input ids* and each routes on its *own* hidden
states: that is what deployment does, so expert-selection Jaccard measures the
routing drift a user gets (errors of earlier layers included), not a per-layer
proxy.  Selection is recomputed with `MoELayer.select`, so DeepSeek's biased,
group-limited top-k is measured exactly as the block chooses.

Why two passes and not both models side by side: a 30B MoE in bf16 is ~60 GB, two of
them do not fit one device.  `reference` runs the fp model once and keeps, per batch,
only what the metrics need (`FpBatch`: the reference token's log-prob, each MoE layer's
top-k expert ids, the fp top-n log-probs); the fp model is then freed and `compare_to`
runs each quantized model against those files.  No logits are held across batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pascal_moe.io.batches import Batch
from pascal_moe.models import MoELayer, moe_layers
from pascal_moe.models.hooks import router_hooks


@contextmanager
def capture_routers(layers: list[MoELayer]) -> Iterator[list[list[torch.Tensor]]]:
    """Record every router's logits [N, E] per forward (all forwards: generation runs many)."""
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    with router_hooks([lay.router for lay in layers], lambda i, z, _a: store[i].append(z.detach().float())):
        yield store


def id_dtype(n_experts: int) -> torch.dtype:
    """The smallest integer type that holds expert ids: int16 up to 32767 experts, else int32."""
    return torch.int16 if n_experts <= torch.iinfo(torch.int16).max else torch.int32


def id_mask(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Bool [N, E] from expert ids [N, k]: True where the token selects the expert."""
    return torch.zeros(ids.shape[0], n_experts, dtype=torch.bool, device=ids.device).scatter_(1, ids.long(), True)


def selection_mask(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """Bool [N, E]: True where the layer's block selects the expert for the token."""
    _, idx = layer.select(logits)  # [N, k]
    return id_mask(idx, logits.shape[-1])


def jaccard(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / |A ∪ B| per token from selection masks [N, E] -> [N] (1 when both select nothing)."""
    inter = (mask_a & mask_b).sum(-1).float()  # [N]
    union = (mask_a | mask_b).sum(-1).float()  # [N]
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass(slots=True)
class Forward:
    """One model's outputs on one batch: logits [B, T, V] and per layer the selected expert ids
    [N, k] (ascending, `id_dtype`): k/E of a selection mask, a fraction of the router logits."""

    logits: torch.Tensor
    sel: list[torch.Tensor]
    n_experts: int

    @property
    def masks(self) -> list[torch.Tensor]:
        """L x [N, E] bool selection masks (built on demand)."""
        return [id_mask(s, self.n_experts) for s in self.sel]


@torch.no_grad()
def forward(model: nn.Module, layers: list[MoELayer], batch: Batch) -> Forward:
    """One forward; each router's logits are reduced to the block's top-k ids inside its hook, so no
    layer keeps [N, E] floats while the rest of the model runs."""
    dev = next(model.parameters()).device
    E = layers[0].spec.n_experts
    store: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(i: int, z: torch.Tensor, _args: tuple) -> None:
        _, idx = layers[i].select(z.detach().float())  # [N, k]
        store[i].append(idx.sort(-1).values.to(id_dtype(E)).cpu())

    with router_hooks([lay.router for lay in layers], keep):
        out = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), use_cache=False)
    return Forward(out.logits.float().cpu(), [torch.cat(s) for s in store], E)


# Rows per chunk of the vocabulary-wide work (log-softmax, cross-entropy): about 16 MiB of fp32 whatever
# the vocabulary, so a batch never holds a second and third [B, T, V] copy of its logits.
CHUNK_ELEMENTS = 1 << 22


def _chunks(n_rows: int, width: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return (slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step))


def position_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] next-token NLL of every position (padding included), computed a chunk of rows at a time."""
    B, T, V = logits.shape
    flat = logits.reshape(-1, V)  # [B*T, V] a view: chunks are slices, no copy of the logits
    tgt = ids.roll(-1, dims=1).reshape(-1)  # [B*T] next token; the last column wraps and is dropped below
    nll = torch.cat([F.cross_entropy(flat[c], tgt[c], reduction="none") for c in _chunks(B * T, V)])  # [B*T]
    return nll.view(B, T)[:, :-1].contiguous()


def token_nll(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Sum of next-token NLL over real (non-padding) targets, and their count."""
    mask = batch.attention_mask.bool()  # [B, T]
    valid = mask[:, 1:] & mask[:, :-1]  # [B, T-1]
    nll = position_nll(logits, batch.input_ids)
    return float(nll[valid].double().sum()), int(valid.sum())


def topn_kl(lp_top: torch.Tensor, top_idx: torch.Tensor | None, lq: torch.Tensor) -> torch.Tensor:
    """Per position KL(p || q) [M] from p's stored top-n log-probs lp_top [M, n] at vocab ids top_idx [M, n]
    and q's full log-probs lq [M, V].

    Over the support S = top-n of p plus one bucket for the rest:
    KL = sum_{i in S} p_i (log p_i - log q_i) + p_R (log p_R - log q_R),  p_R = 1 - sum_S p_i, q_R = sum_{not S} q_i.
    Merging the tail into one bucket can only lower KL (log-sum inequality), so this is a lower bound,
    exact when the tail is empty.  top_idx None means lp_top is the full [M, V] (exact, the original sum).
    """
    if top_idx is None:
        return (lp_top.exp() * (lp_top - lq)).sum(-1)  # [M]
    idx = top_idx.long()
    lq_top = lq.gather(1, idx)  # [M, n]
    kl = (lp_top.exp() * (lp_top - lq_top)).sum(-1)  # [M]
    p_rest = (-torch.expm1(torch.logsumexp(lp_top.double(), -1))).clamp(min=0)  # [M] 1 - sum_S p_i
    log_q_rest = torch.logsumexp(lq.scatter(1, idx, float("-inf")), -1).double()  # [M] q's tail, from its own mass
    # (not 1 - sum_S q: in fp32 that rounds to 0 when q's tail is < 1e-7 and the log blows up)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log() - log_q_rest), 0.0)  # [M]
    return kl + tail.float()


@dataclass(slots=True)
class FpBatch:
    """The fp model's part of one batch's metrics (M real positions of the batch, row-major).

    nll [B, T-1] float32: next-token NLL of the reference token (padding targets included, masked later);
    lp_top [M, n] float32 fp log-probs at top_idx [M, n] int32 (top_idx None: lp_top is the full [M, V]);
    sel: L x [M, k] int16 (int32 when E > 32767) fp top-k expert ids.
    """

    nll: torch.Tensor
    lp_top: torch.Tensor
    top_idx: torch.Tensor | None
    sel: list[torch.Tensor]


def fp_batch(out: Forward, layers: list[MoELayer], batch: Batch, top_n: int) -> FpBatch:
    """Reduce one fp forward to what the quantized pass compares against."""
    logits = out.logits  # [B, T, V]
    V = logits.shape[-1]
    nll = position_nll(logits, batch.input_ids)  # [B, T-1]
    real = batch.attention_mask.reshape(-1).bool()  # [N]
    rows = real.nonzero().squeeze(-1)  # [M]
    flat = logits.view(-1, V)  # [N, V]
    top_idx = None
    if top_n < V:
        tops = [torch.log_softmax(flat[rows[c]], -1).topk(top_n, dim=-1) for c in _chunks(len(rows), V)]
        lp = torch.cat([t.values for t in tops])  # [M, n]
        top_idx = torch.cat([t.indices for t in tops]).int()  # [M, n]
    else:
        lp = torch.log_softmax(flat[rows], -1)  # [M, V]: the full distribution was asked for
    sel = [s[real] for s in out.sel]  # L x [M, k]
    return FpBatch(nll, lp, top_idx, sel)


@dataclass
class Reference:
    """The fp pass over one stream of batches: running fp sums plus one FpBatch file per batch."""

    dir: Path
    n_batches: int = 0
    nll_fp: float = 0.0
    n_pred: int = 0

    def path(self, i: int) -> Path:
        return self.dir / f"batch-{i:06d}.pt"

    def load(self, i: int) -> FpBatch:
        d = torch.load(self.path(i), weights_only=True)
        return FpBatch(d["nll"], d["lp_top"], d["top_idx"], d["sel"])

    @property
    def ppl_fp(self) -> float:
        return float(torch.tensor(self.nll_fp / max(self.n_pred, 1)).exp())


def _valid(batch: Batch) -> torch.Tensor:
    """[B, T-1] targets that count: both the position and its next token are real."""
    mask = batch.attention_mask.bool()
    return mask[:, 1:] & mask[:, :-1]


@torch.no_grad()
def reference(fp_model: nn.Module, batches: Iterable[Batch], top_n: int, out_dir: Path) -> Reference:
    """Run the fp model over `batches` once and store each batch's FpBatch in `out_dir` (torch.save per batch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = moe_layers(fp_model)
    ref = Reference(out_dir)
    for i, batch in enumerate(batches):
        fb = fp_batch(forward(fp_model, layers, batch), layers, batch, top_n)
        torch.save({"nll": fb.nll, "lp_top": fb.lp_top, "top_idx": fb.top_idx, "sel": fb.sel}, ref.path(i))
        valid = _valid(batch)
        ref.nll_fp += float(fb.nll[valid].double().sum())
        ref.n_pred += int(valid.sum())
        ref.n_batches = i + 1
    return ref


@dataclass
class PairStats:
    """Running sums for one quantized model against the fp reference (means are read off at the end)."""

    n_layers: int
    nll_fp: float = 0.0
    nll_q: float = 0.0
    n_pred: int = 0
    kl_sum: float = 0.0
    n_kl: int = 0
    jac_sum: list[float] = field(default_factory=list)
    n_routed: int = 0
    gen_match: int = 0
    gen_total: int = 0

    def __post_init__(self) -> None:
        self.jac_sum = self.jac_sum or [0.0] * self.n_layers

    def add(self, fp: FpBatch, q: Forward, batch: Batch) -> None:
        nll, n = token_nll(q.logits, batch)
        self.nll_q += nll
        self.nll_fp += float(fp.nll[_valid(batch)].double().sum())
        self.n_pred += n
        real = batch.attention_mask.reshape(-1).bool()  # [N]
        rows = real.nonzero().squeeze(-1)  # [M]
        flat = q.logits.view(-1, q.logits.shape[-1])  # [N, V]
        kl = [
            topn_kl(fp.lp_top[c], None if fp.top_idx is None else fp.top_idx[c], torch.log_softmax(flat[rows[c]], -1))
            for c in _chunks(len(rows), flat.shape[-1])
        ]
        self.kl_sum += float(torch.cat(kl).double().sum()) if kl else 0.0
        self.n_kl += len(rows)
        for i, (a, b) in enumerate(zip(fp.sel, q.sel)):
            self.jac_sum[i] += float(jaccard(id_mask(a, q.n_experts), id_mask(b[real], q.n_experts)).double().sum())
        self.n_routed += len(rows)

    @property
    def ppl_fp(self) -> float:
        return float(torch.tensor(self.nll_fp / max(self.n_pred, 1)).exp())

    @property
    def ppl_q(self) -> float:
        return float(torch.tensor(self.nll_q / max(self.n_pred, 1)).exp())

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.n_kl, 1)

    @property
    def layer_jaccard(self) -> list[float]:
        return [s / max(self.n_routed, 1) for s in self.jac_sum]

    @property
    def mean_jaccard(self) -> float:
        lj = self.layer_jaccard
        return sum(lj) / max(len(lj), 1)

    @property
    def gen_agreement(self) -> float | None:
        return self.gen_match / self.gen_total if self.gen_total else None


@torch.no_grad()
def compare_to(q_model: nn.Module, ref: Reference, batches: Iterable[Batch]) -> PairStats:
    """Perplexity of both, KL(fp || q) and per-layer Jaccard of `q_model` against the stored fp pass.

    `batches` must be the stream `reference` saw (same order); generation agreement is separate.
    """
    layers = moe_layers(q_model)
    stats = PairStats(len(layers))
    n = 0
    for i, batch in enumerate(batches):
        stats.add(ref.load(i), forward(q_model, layers, batch), batch)
        n = i + 1
    if n != ref.n_batches:
        raise RuntimeError(f"compare_to saw {n} batches, the fp reference has {ref.n_batches}")
    return stats


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Greedy continuation [P, G] of equal-length prompts [P, Tp]; EOS does not stop it (lengths stay equal)."""
    dev = next(model.parameters()).device
    ids = prompts.to(dev)
    out = model(input_ids=ids, use_cache=True)
    cache, new = out.past_key_values, []
    for _ in range(n_tokens):
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)  # [P, 1]
        new.append(nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return torch.cat(new, 1).cpu() if new else torch.empty(prompts.shape[0], 0, dtype=torch.long)


def agreement(gen_fp: torch.Tensor, gen_q: torch.Tensor) -> tuple[int, int]:
    """(matching positions, total positions) of two greedy generations [P, G]."""
    return int((gen_fp == gen_q).sum()), gen_fp.numel()
