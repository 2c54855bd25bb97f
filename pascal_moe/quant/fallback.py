"""Which experts fall back to RTN: a token-count floor and, optionally, a share-of-tokens floor.

Why two rules: `--min-expert-tokens` is pascal's (an expert with a handful of tokens gets
no useful gradient), `--fallback-threshold` is GPTQModel's (`Fallback(strategy=RTN,
threshold="0.5%")`: a module that saw fewer than 0.5% of the calibration tokens keeps plain
RTN; gptqmodel/utils/fallback.py compares the module's observed tokens with that share of
the total calibration tokens), so the toolkit's own answer to coverage can be run as a
baseline with the same quantizer.

Shape legend: E routed experts, k experts per token.
"""

from __future__ import annotations

import math

import torch

from pascal_moe.errors import PascalError


def check_threshold(share: float | None) -> None:
    """A share of calibration tokens lies in [0, 1)."""
    if share is not None and not 0.0 <= share < 1.0:
        raise PascalError(f"--fallback-threshold is a share of the calibration tokens in [0, 1), got {share}")


def min_tokens(counts: torch.Tensor | None, min_expert_tokens: int, share: float | None, top_k: int = 1) -> int:
    """The token floor of one layer: max(min_expert_tokens, ceil(share x N)).

    N = the layer's calibration tokens = counts [E] summed / k (each token fills k expert slots).
    An expert falls back when its count < floor, i.e. count < share x N, GPTQModel's test.
    """
    if counts is None or share is None:
        return min_expert_tokens
    return max(min_expert_tokens, math.ceil(share * int(counts.sum()) / top_k))
