"""`pascal verify` judges external synthetic text: junk gets quality_ok = false, real text is routed and judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pascal_moe.agent.config import VerifyConfig
from pascal_moe.agent.verify_cmd import run
from pascal_moe.errors import PascalError

JUNK = Path(__file__).parent / "data" / "junk_passages.json"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One intra-op torch thread (see conftest)."""


def test_verify_cli_flags_junk_and_judges_real_text(qwen_dir, profile_dir, seed_parquet, tmp_path):
    prof = profile_dir(qwen_dir)
    junk = [r["text"] for r in json.loads(JUNK.read_text(encoding="utf-8"))][::3]
    seed = pd.read_parquet(seed_parquet)
    real = seed[(seed["split"] == "heldout") & seed["text"].str.split().str.len().between(30, 120)]["text"][:12]
    rows = [{"text": t, "kind": "junk"} for t in junk] + [{"text": t, "kind": "real"} for t in real]
    cand = tmp_path / "cands.jsonl"
    pd.DataFrame(rows).to_json(cand, orient="records", lines=True, force_ascii=False)
    out = tmp_path / "ver"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pascal_moe.cli",
            "verify",
            "--model",
            str(qwen_dir),
            "--profile",
            str(prof),
            "--candidates",
            str(cand),
            "--out",
            str(out),
            "--seq-len",
            "64",
            "--device",
            "cpu",
            "--ppl-percentile",
            "99",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "1000"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_parquet(out / "verified.parquet")
    assert {"text", "quality_ok", "accepted", "reject_reason", "target_hits", "keys", "counts", "n_tokens"} <= set(df)
    kinds = dict(zip((r["text"] for r in rows), (r["kind"] for r in rows)))
    df["kind"] = df["text"].map(kinds)
    assert len(df) == len(rows)
    assert not df.loc[df["kind"] == "junk", "quality_ok"].any()
    assert not df.loc[df["kind"] == "junk", "accepted"].any()
    assert df.loc[df["kind"] == "real", "quality_ok"].mean() >= 0.9
    ok = df[df["quality_ok"]]
    assert (ok["n_tokens"] > 0).all() and (
        ok["accepted"] == (ok["target_hits"] > 0) & (ok["target_rate"] >= ok["accept_threshold"])
    ).all()
    summary = json.loads((out / "verify.json").read_text())
    assert summary["candidates"] == len(rows) and summary["rejected_by_reason"]


def test_missing_candidates_is_one_line_error(qwen_dir, profile_dir, tmp_path):
    with pytest.raises(PascalError, match="candidates not found"):
        run(
            VerifyConfig(
                model=str(qwen_dir),
                profile=str(profile_dir(qwen_dir)),
                candidates=str(tmp_path / "no.jsonl"),
                out=str(tmp_path / "o"),
            )
        )


def test_word_salad_is_above_the_seed_perplexity_bound(qwen_dir, seed_parquet):
    """Shuffling a held-out document's words keeps every check of screen.py happy but not the model."""
    import random

    from pascal_moe.agent.perplexity import PerplexityBound, mean_nll
    from pascal_moe.models.loading import load_model, load_tokenizer

    model, tok = load_model(str(qwen_dir), "cpu", "float32"), load_tokenizer(str(qwen_dir))
    seed = pd.read_parquet(seed_parquet)
    prose = seed[(seed["domain"] == "prose") & seed["text"].str.split().str.len().between(60, 120)]
    bound = PerplexityBound.from_seed(model, tok, prose[prose["split"] == "train"]["text"][:96].tolist(), 128)
    real = prose[prose["split"] == "heldout"]["text"][:16].tolist()
    rng = random.Random(0)
    salad = [" ".join(rng.sample(t.split(), len(t.split()))) for t in real]
    nll_real, n_real = mean_nll(model, tok, real, 128)
    nll_salad, n_salad = mean_nll(model, tok, salad, 128)
    assert (nll_salad > nll_real).all()
    assert bound.too_high(nll_salad, n_salad).mean() >= 0.9
    assert bound.too_high(nll_real, n_real).mean() <= 0.25
