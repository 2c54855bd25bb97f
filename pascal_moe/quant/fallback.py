"""Which experts fall back to RTN: a token-count floor and, optionally, a share-of-slots floor.

Why two rules: `--min-expert-tokens` is pascal's (an expert with a handful of tokens gets
no useful gradient), `--fallback-threshold` is GPTQModel's (an expert routed fewer than
0.5% of the layer's routed slots keeps plain RTN), so the toolkit's own answer to
coverage can be run as a baseline with the same quantizer.

Shape legend: E routed experts.
"""

from __future__ import annotations

import math

import torch

from pascal_moe.errors import PascalError


def check_threshold(share: float | None) -> None:
    """A share of routed slots lies in [0, 1)."""
    if share is not None and not 0.0 <= share < 1.0:
        raise PascalError(f"--fallback-threshold is a share of a layer's routed tokens in [0, 1), got {share}")


def min_tokens(counts: torch.Tensor | None, min_expert_tokens: int, share: float | None) -> int:
    """The token floor of one layer: max(min_expert_tokens, ceil(share x routed slots)).

    counts [E] sums to tokens x k (each token fills k slots), so `share` is measured against
    every routed slot of the layer's calibration tokens.
    """
    if counts is None or share is None:
        return min_expert_tokens
    return max(min_expert_tokens, math.ceil(share * int(counts.sum())))
