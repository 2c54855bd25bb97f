"""Metrics of a quantized MoE against its full-precision model, streamed batch by batch.

Shape legend: B windows in a batch, T tokens per window, V vocabulary, N = B*T
flattened tokens, L MoE layers, E routed experts, k experts per token, P prompts,
G generated tokens.

Why both models see the *same input ids* and each routes on its *own* hidden
states: that is what deployment does, so expert-selection Jaccard measures the
routing drift a user gets (errors of earlier layers included), not a per-layer
proxy.  Selection is recomputed with `MoELayer.select`, so DeepSeek's biased,
group-limited top-k is measured exactly as the block chooses.  Only per-token
scalars leave a batch: no logits are held across batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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


def selection_mask(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """Bool [N, E]: True where the layer's block selects the expert for the token."""
    _, idx = layer.select(logits)  # [N, k]
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)


def jaccard(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / |A ∪ B| per token from selection masks [N, E] -> [N] (1 when both select nothing)."""
    inter = (mask_a & mask_b).sum(-1).float()  # [N]
    union = (mask_a | mask_b).sum(-1).float()  # [N]
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass(slots=True)
class Forward:
    """One model's outputs on one batch: logits [B, T, V] and per-layer selection masks [N, E]."""

    logits: torch.Tensor
    masks: list[torch.Tensor]


@torch.no_grad()
def forward(model: nn.Module, layers: list[MoELayer], batch: Batch) -> Forward:
    dev = next(model.parameters()).device
    with capture_routers(layers) as store:
        out = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), use_cache=False)
    masks = [selection_mask(layer, torch.cat(rec).cpu()) for layer, rec in zip(layers, store)]  # L x [N, E]
    return Forward(out.logits.float().cpu(), masks)


def token_nll(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Sum of next-token NLL over real (non-padding) targets, and their count."""
    ids, mask = batch.input_ids, batch.attention_mask.bool()  # [B, T]
    valid = mask[:, 1:] & mask[:, :-1]  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return float(nll[valid.reshape(-1)].double().sum()), int(valid.sum())


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over real positions of KL(p || q) of next-token distributions, and the count."""
    lp = torch.log_softmax(logits_p, -1)  # [B, T, V]
    lq = torch.log_softmax(logits_q, -1)  # [B, T, V]
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, T]
    keep = mask.bool()
    return float(kl[keep].double().sum()), int(keep.sum())


@dataclass
class PairStats:
    """Running sums for one quantized model against the fp model (means are read off at the end)."""

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

    def add(self, fp: Forward, q: Forward, batch: Batch) -> None:
        nll, n = token_nll(fp.logits, batch)
        self.nll_fp += nll
        self.nll_q += token_nll(q.logits, batch)[0]
        self.n_pred += n
        kl, nk = token_kl(fp.logits, q.logits, batch.attention_mask)
        self.kl_sum += kl
        self.n_kl += nk
        real = batch.attention_mask.reshape(-1).bool()  # [N]
        for i, (a, b) in enumerate(zip(fp.masks, q.masks)):
            self.jac_sum[i] += float(jaccard(a[real], b[real]).double().sum())
        self.n_routed += int(real.sum())

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


def compare(fp_model: nn.Module, q_model: nn.Module, batches: Iterable[Batch]) -> PairStats:
    """Perplexity of both, KL(fp || q) and per-layer Jaccard over `batches` (generation is separate)."""
    fp_layers, q_layers = moe_layers(fp_model), moe_layers(q_model)
    stats = PairStats(len(fp_layers))
    for batch in batches:
        stats.add(forward(fp_model, fp_layers, batch), forward(q_model, q_layers, batch), batch)
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
