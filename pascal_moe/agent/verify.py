"""Verify candidate passages: screen degenerate and junk text (screen.py), then measure routing on the target model.

Why both: a passage can hit the target experts *because* it is degenerate (a token
repeated 200 times routes wherever that token goes), and such text skews
calibration (MoEQuant's shipped samples hold NUL runs and repeated fragments).
So text is screened first, with the rejection reason counted, and only then
profiled with the profiler's own counting (`route_counts`, the same numbers as
samples.parquet), so synthetic rows and seed rows are comparable.

Acceptance: target_rate = tokens routed to the group's target experts / n_tokens;
accepted when target_hits > 0 and target_rate >= accept_ratio x baseline_rate (the
seed average for the same experts).  The threshold is stored with each row.
"""

from __future__ import annotations

import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pascal_moe.agent.dedup import NearDuplicates
from pascal_moe.agent.perplexity import PerplexityBound
from pascal_moe.agent.screen import QUALITY_REASONS, TARGET_REASONS, quality_reason, wrong_script

if TYPE_CHECKING:
    from pascal_moe.agent.passes import ModelPasses

SCREEN_REASONS = (
    "empty",
    "too_short",
    "control_chars",
    "broken_chars",
    "repetition",
    "low_compression",
    *QUALITY_REASONS,
    *TARGET_REASONS,
    "high_perplexity",
)


@dataclass(frozen=True, slots=True)
class ScreenConfig:
    """Thresholds chosen on the bundled seed corpus: each rejects < 0.5% of its documents."""

    min_words: int = 12
    ngram: int = 3
    max_repeated_ngram_frac: float = 0.4  # seed: p99.9 = 0.43 of 3-grams are repeats in the worst docs
    min_compression_ratio: float = 0.2  # zlib bytes / raw bytes; seed p0.1 = 0.23
    max_control_chars: int = 0  # any control character other than \n \t \r
    max_broken_chars: int = 0  # U+FFFD: bytes that did not decode (a byte-level token cut mid-character)
    quality: bool = True  # the checks of screen.py: keyword lists, meta-text, prompt echoes, repeats, mojibake


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (0 = none repeated)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size: near 0 for text made of one repeated fragment."""
    raw = text.encode("utf-8", errors="replace")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 0.0


def control_chars(text: str) -> int:
    """Count of control characters (NUL included) other than newline, tab and carriage return."""
    return sum(1 for ch in text if ch not in "\n\t\r" and unicodedata.category(ch) == "Cc")


def screen(text: str, cfg: ScreenConfig = ScreenConfig()) -> str | None:
    """The first reason `text` is degenerate (one of SCREEN_REASONS), or None when it passes."""
    if not text or not text.strip():
        return "empty"
    if len(text.split()) < cfg.min_words:
        return "too_short"
    if control_chars(text) > cfg.max_control_chars:
        return "control_chars"
    if text.count("\ufffd") > cfg.max_broken_chars:
        return "broken_chars"
    if repeated_ngram_fraction(text, cfg.ngram) > cfg.max_repeated_ngram_frac:
        return "repetition"
    if compression_ratio(text) < cfg.min_compression_ratio:
        return "low_compression"
    return quality_reason(text) if cfg.quality else None


@dataclass(slots=True)
class Measured:
    """One passage after verification; field names are synthetic.parquet's columns."""

    n_tokens: int
    keys: list[int]
    counts: list[int]
    target_hits: int
    target_rate: float
    baseline_rate: float
    hit_ratio: float
    accept_threshold: float
    accepted: bool
    reject_reason: str | None  # a SCREEN_REASONS entry, "below_threshold", or None when accepted


@dataclass(slots=True)
class Rejections:
    """Rejections counted by reason (screen reasons, below_threshold, agent failures)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str | None, n: int = 1) -> None:
        if reason:
            self.counts[reason] += n


def judge(
    n_tokens: int,
    keys: Sequence[int],
    counts: Sequence[int],
    targets: Sequence[int],
    baseline_rate: float,
    accept_ratio: float,
) -> Measured:
    """Target hits and the accept decision for one routed passage."""
    want = set(int(t) for t in targets)
    hits = int(sum(c for k, c in zip(keys, counts) if int(k) in want))
    rate = hits / n_tokens if n_tokens else 0.0
    threshold = accept_ratio * baseline_rate
    ratio = rate / baseline_rate if baseline_rate > 0 else (float("inf") if hits else 0.0)
    ok = hits > 0 and rate >= threshold
    return Measured(
        n_tokens,
        [int(k) for k in keys],
        [int(c) for c in counts],
        hits,
        rate,
        baseline_rate,
        ratio,
        threshold,
        ok,
        None if ok else "below_threshold",
    )


def unmeasured(reason: str, baseline_rate: float, accept_ratio: float) -> Measured:
    """A passage rejected before profiling (screened out)."""
    return Measured(0, [], [], 0, 0.0, baseline_rate, 0.0, accept_ratio * baseline_rate, False, reason)


def verify(
    texts: Sequence[str],
    targets: Sequence[Sequence[int]],
    baselines: Sequence[float],
    model,
    tokenizer,
    *,
    accept_ratio: float,
    seq_len: int,
    batch_size: int = 8,
    screen_cfg: ScreenConfig = ScreenConfig(),
    rejections: Rejections | None = None,
    scripts: Sequence[str | None] | None = None,
    pool: NearDuplicates | None = None,
    ppl: PerplexityBound | None = None,
    passes: ModelPasses | None = None,
) -> list[Measured]:
    """Screen each text, route the survivors through `model`, judge each against its own targets.

    scripts: per text, the script of its target's triggers (screen.expected_script); pool: texts
    a passage must not nearly duplicate (seed pool and passages kept so far; survivors join it);
    ppl: the seed corpus's NLL ceilings under this model (perplexity.py), checked last (it costs a forward);
    passes: where the two forwards run (passes.py; `--executor ray`: sharded on actors, `model` unused);
    default: `model` in this process.
    """
    from pascal_moe.agent.passes import LocalPasses

    run = passes if passes is not None else LocalPasses(model, tokenizer, seq_len, batch_size)

    reasons = [screen(t, screen_cfg) for t in texts]
    for i, t in enumerate(texts):
        if reasons[i] is None and scripts is not None and wrong_script(t, scripts[i]):
            reasons[i] = "wrong_script"
        if reasons[i] is None and pool is not None and pool.check_add(t):
            reasons[i] = "near_duplicate"
    live = [i for i, r in enumerate(reasons) if r is None]
    if ppl is not None and live:
        nll, n = run.nll([texts[i] for i in live])
        for i, high in zip(live, ppl.too_high(nll, n)):
            reasons[i] = "high_perplexity" if high else None
        live = [i for i, r in enumerate(reasons) if r is None]
    routed = run.route([texts[i] for i in live]) if live else []
    out: list[Measured | None] = [None] * len(texts)
    for i, rc in zip(live, routed):
        out[i] = judge(int(rc.n_tokens), list(rc.keys), list(rc.counts), targets[i], baselines[i], accept_ratio)
    for i, r in enumerate(reasons):
        if r is not None:
            out[i] = unmeasured(r, baselines[i], accept_ratio)
    if rejections is not None:
        for m in out:
            rejections.add(m.reject_reason if m is not None else None)
    return [m for m in out if m is not None]


def per_key_rate(
    keys_list: Sequence[Sequence[int]], counts_list: Sequence[Sequence[int]], n_tokens: Sequence[int], size: int
) -> tuple[np.ndarray, int]:
    """(tokens per key [size], total tokens) summed over passages."""
    totals = np.zeros(size, dtype=np.int64)
    for keys, counts in zip(keys_list, counts_list):
        if len(keys):
            np.add.at(totals, np.asarray(keys, dtype=np.int64), np.asarray(counts, dtype=np.int64))
    return totals, int(sum(n_tokens))
