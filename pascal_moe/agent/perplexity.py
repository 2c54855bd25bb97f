"""Perplexity bound: a passage must read, to the target fp model, like the seed corpus does.

Why: junk that slips through the pattern checks of screen.py (word salad, half-sentences,
machine-translated soup) is surprising to the model it is meant to calibrate.  Each
passage's mean next-token NLL is compared with the seed corpus's NLL distribution for
texts of similar length (short texts are harder to predict): above the seed's
`percentile` for that length bucket, the passage is rejected as `high_perplexity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pascal_moe.io.batches import batches, tokenize

LENGTH_EDGES = (32, 64, 128, 256)  # token-count buckets: <32, 32-63, 64-127, 128-255, >=256


def mean_nll(
    model, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(mean next-token NLL per text [N], tokens per text [N]); NaN NLL for a text of < 2 tokens."""
    ids = tokenize(list(texts), tokenizer, seq_len)
    nll = np.full(len(ids), np.nan)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for b in batches(ids, batch_size, pad):
            logits = (
                model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
                .logits.float()
                .cpu()
            )  # [B, T, V]
            valid = (b.attention_mask[:, 1:] & b.attention_mask[:, :-1]).bool()  # [B, T-1]
            tok_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), b.input_ids[:, 1:], reduction="none")  # [B, T-1]
            per = (tok_nll * valid).sum(1) / valid.sum(1).clamp(min=1)  # [B]
            for r, i in enumerate(b.sample_index):
                if valid[r].any():
                    nll[i] = float(per[r])
    return nll, np.array([len(x) for x in ids])


def bucket(n_tokens: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(LENGTH_EDGES), n_tokens, side="right")


@dataclass(slots=True)
class PerplexityBound:
    """Per length bucket, the seed NLL at `percentile` (the highest bucket with seed texts stands in for empty ones)."""

    limits: np.ndarray  # [len(LENGTH_EDGES) + 1] NLL ceilings

    @classmethod
    def from_seed(
        cls, model, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int = 8, percentile: float = 95.0
    ) -> PerplexityBound:
        return cls.from_nll(*mean_nll(model, tokenizer, texts, seq_len, batch_size), percentile)

    @classmethod
    def from_nll(cls, nll: np.ndarray, n: np.ndarray, percentile: float = 95.0) -> PerplexityBound:
        """The bound from the seed texts' (NLL, tokens), however they were computed (here or on Ray actors)."""
        ok = ~np.isnan(nll)
        nll, b = nll[ok], bucket(n[ok])
        overall = float(np.percentile(nll, percentile)) if len(nll) else np.inf
        limits = np.array(
            [
                float(np.percentile(nll[b == k], percentile)) if (b == k).sum() >= 10 else overall
                for k in range(len(LENGTH_EDGES) + 1)
            ]
        )
        return cls(limits)

    def too_high(self, nll: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
        """[N] bool: NLL above the seed ceiling of its length bucket (NaN never is)."""
        return np.nan_to_num(nll, nan=-np.inf) > self.limits[bucket(n_tokens)]
