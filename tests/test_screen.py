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


ORDINARY = [
    "The bridge opened in 1932 after four years of work; its main span is 503 metres long and it carries "
    "eight lanes of traffic, two railway lines and a footpath.",
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)"
    "  # raises ZeroDivisionError on an empty list",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_prose_and_code_pass(text):
    assert screen(text) is None


def test_near_duplicates_of_the_pool_and_of_each_other(seed_parquet):
    from pascal_moe.agent.dedup import NearDuplicates

    seed = pd.read_parquet(seed_parquet)
    texts = seed[seed["split"] == "train"]["text"].tolist()[:2000]
    pool = NearDuplicates(texts)
    copy = texts[7].replace(".", ",", 1)  # a seed document with one character changed
    fresh = ORDINARY[0]
    assert pool.similarity(copy) >= 0.9 and pool.check_add(copy)
    assert pool.similarity(fresh) < 0.2 and not pool.check_add(fresh)
    assert pool.check_add(fresh + " It was repainted in 1998.")  # the second near-copy of a kept passage


def test_wrong_script_follows_the_triggers():
    from pascal_moe.agent.screen import expected_script, wrong_script

    zh = "我們的團隊一起協作，給出一流的解決方案，並且每天都在改進我們的工作方式與流程，這是我們的起點。"
    assert expected_script(["的", "一", "\ufffd"]) == "CJK" and expected_script(["1", "=="]) is None
    assert wrong_script(ORDINARY[0], "CJK") and not wrong_script(zh, "CJK")
    assert wrong_script(zh, "LATIN") and not wrong_script(ORDINARY[0], "LATIN")
    assert not wrong_script(ORDINARY[0], None)


NOT_SALAD = [
    "The Man from U.N.C.L.E. aired on NBC, e.g. in 1965; i.e. before the U.S.A. tour.",
    "for i in range(n):\n    x[i] = a * y[i] + b * z[i] - c * w[i] + d * v[i]\n    k = j = m = i",
    "If it is to be, so do it in C as we go on to it at an old pc.",
]


@pytest.mark.parametrize("text", NOT_SALAD)
def test_abbreviations_short_words_and_single_letter_code_are_not_letter_salad(text):
    from pascal_moe.agent.screen import letter_salad

    assert not letter_salad(text)
    assert letter_salad(text + " a.b.c.d.e.f.g.h.i.")  # the same with dotted letters after it
