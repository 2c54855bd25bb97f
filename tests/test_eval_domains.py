"""`pascal eval --domains`: the same metrics on each held-out domain separately, exactly as a one-domain run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pascal_moe.errors import PascalError
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.evaluate.run import run
from test_eval import model_under_test, rtn_quantize

SMALL = dict(max_tokens=1024, seq_len=128, generate_tokens=0, batch_size=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_moe_model) -> tuple[str, Path, Path, Path]:
    root = tmp_path_factory.mktemp("dom")
    model = str(model_under_test("qwen3-moe-tiny", root / "fp", tiny_moe_model))
    copy = root / "fp-copy"
    shutil.copytree(model, copy)
    return model, copy, rtn_quantize(model, "int2-g64", root / "int2-g64"), root


def test_per_domain_rows_match_single_domain_runs(setup, seed_parquet) -> None:
    model, copy, q2, root = setup
    out = run(
        EvalConfig(
            model=model,
            out=str(root / "eval"),
            quantized=[str(copy), str(q2)],
            domains="prose,code,math,dialogue",
            **SMALL,
        )
    )
    meta = json.loads((out / "eval.json").read_text())
    rows = {(r["model"], r["domain"]): r for r in meta["domains"]}
    assert set(rows) == {(m, d) for m in ("fp-copy", "int2-g64") for d in ("prose", "code", "math", "dialogue")}
    for d in ("prose", "code", "math", "dialogue"):
        same = rows[("fp-copy", d)]
        assert same["delta_ppl"] == 0.0 and same["kl"] == 0.0 and same["jaccard"] == 1.0
        assert rows[("int2-g64", d)]["kl"] > 0 and rows[("int2-g64", d)]["tokens"] > 0
    assert len({round(rows[("fp-copy", d)]["ppl_fp"], 6) for d in ("prose", "code", "math")}) == 3
    assert meta["summary"][0]["model"] == "fp" and len(meta["summary"]) == 3  # the mixed rows stay as before
    assert "| int2-g64 | code |" in (out / "report.md").read_text()
    # A run on only the code held-out texts gives the code row exactly (same windows, same order).
    df = pd.read_parquet(seed_parquet)
    code = root / "code.parquet"
    df[(df["split"] == "heldout") & (df["domain"] == "code")].drop(columns=["split"]).to_parquet(code)
    one = run(EvalConfig(model=model, out=str(root / "eval-code"), quantized=[str(q2)], data=str(code), **SMALL))
    q = json.loads((one / "eval.json").read_text())["summary"][1]
    assert q["ppl"] == pytest.approx(rows[("int2-g64", "code")]["ppl"], rel=1e-9)
    assert q["jaccard"] == pytest.approx(rows[("int2-g64", "code")]["jaccard"], rel=1e-9)


def test_all_expands_and_unknown_domain_fails_in_one_line(setup, tmp_path) -> None:
    from pascal_moe.evaluate.domains import texts_by_domain

    model, copy, _, _ = setup
    cfg = EvalConfig(model=model, out=str(tmp_path / "e"), quantized=[str(copy)], domains="all", **SMALL)
    assert sorted(texts_by_domain(cfg)) == ["code", "dialogue", "math", "prose"]
    with pytest.raises(PascalError, match="no held-out text in domain.*poetry"):
        run(EvalConfig(model=model, out=str(tmp_path / "e"), quantized=[str(copy)], domains="code,poetry", **SMALL))
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"text": ["some text here"] * 4}).to_parquet(plain)
    with pytest.raises(PascalError, match="needs a `domain` column"):
        run(
            EvalConfig(
                model=model, out=str(tmp_path / "e"), quantized=[str(copy)], data=str(plain), domains="all", **SMALL
            )
        )
