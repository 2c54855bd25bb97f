"""The quality screen rejects every junk passage of the fixture and passes held-out seed documents."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pascal_moe.agent.screen import QUALITY_REASONS, quality_reason
from pascal_moe.agent.verify import screen

JUNK = Path(__file__).parent / "data" / "junk_passages.json"


def test_every_junk_passage_is_rejected():
    rows = json.loads(JUNK.read_text(encoding="utf-8"))
    assert len(rows) >= 30 and {r["kind"] for r in rows} == set(QUALITY_REASONS)
    passed = [r["text"][:60] for r in rows if screen(r["text"]) is None]
    assert not passed
    # Each kind is caught by a check of the screen, mostly its own one.
    own = Counter(r["kind"] for r in rows if quality_reason(r["text"]) == r["kind"])
    assert sum(own.values()) >= 0.85 * len(rows)


def test_held_out_seed_documents_of_similar_length_pass(seed_parquet):
    df = pd.read_parquet(seed_parquet)
    words = df["text"].str.split().str.len()
    held = df[(df["split"] == "heldout") & words.between(12, 200)]
    assert len(held) >= 300
    reasons = Counter(screen(t) for t in held["text"])
    rate = reasons[None] / len(held)
    assert rate >= 0.9, reasons
    for domain, d in held.groupby("domain"):  # no domain is screened away
        assert sum(screen(t) is None for t in d["text"]) / len(d) >= 0.8, domain


ORDINARY = ["The bridge opened in 1932 after four years of work; its main span is 503 metres long and it carries "
            "eight lanes of traffic, two railway lines and a footpath.",
            "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)"
            "  # raises ZeroDivisionError on an empty list"]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_prose_and_code_pass(text):
    assert screen(text) is None
