"""The evidence matrix (generic calibration text, specialised use): config, plan, coverage bar and report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


er = benchmark_module("evidence_report")


def test_config_plans_every_baseline_at_equal_tokens() -> None:
    em = benchmark_module("evidence_matrix")
    s, _ = em.settings(em.CONFIG, False)
    assert s["seed_domains"] == ["prose"] and set(s["eval"]["domains"].split(",")) == {
        "prose",
        "code",
        "math",
        "dialogue",
    }
    cells = em.cm.plan(s)
    assert {c["calib"] for c in cells} == {None, "random", "balanced", "pascal-self", "ebss"}
    assert {c["method"] for c in cells} == {
        "rtn",
        "autoround",
        "vsraq",
        "autoround-fb",
        "llmc-gptq",
        "llmc-gptq-noall",
        "autoround-lib",
    }
    assert sum(c["method"] == "rtn" for c in cells) == len(s["schemes"])  # rtn reads no calibration
    assert len(cells) == len(s["schemes"]) * (1 + 4 * 2 * 6)  # 4 sets x 2 seeds x 6 calibrated quantizers
    assert s["quantize"]["iters"] == 25  # autoround-lib runs at our quantizer's steps (the runner passes them on)
    q, _ = em.settings(em.CONFIG, True)
    assert q["models"] == ["data/models/qwen3-moe-tiny"] and q["out"] != s["out"]
    assert all(p.startswith(q["out"]) for p in q["cells"].values())  # a quick run never writes docs/


def test_below_demand_uses_the_layer_uniform_share() -> None:
    cov = pd.DataFrame(
        {"layer": [0] * 4 + [1] * 4, "expert": list(range(4)) * 2, "tokens": [700, 200, 80, 20, 250, 250, 250, 250]}
    )  # u = 250 in both layers
    got = er.below_demand(cov, min_tokens=64, share=0.25)  # demand max(64, 62.5) = 64
    assert got["below_demand"] == 1 and got["share_below"] == 1 / 8 and got["uncovered"] == 0
    assert er.below_demand(cov, min_tokens=0, share=0.4)["below_demand"] == 2  # demand 100: 80 and 20
    assert er.below_demand(cov, min_tokens=300, share=0.0)["below_demand"] == 7
    assert got["max_over_min"] == 35.0


def _cells(tmp_path: Path) -> list[dict]:
    """Fake finished cells: eval.json with a mixed summary and per-domain rows, as `pascal eval --domains` writes."""
    recs = []
    dppl = {
        ("autoround", "pascal-self"): [0.50, 0.54],
        ("autoround", "random"): [0.90, 0.86],
        ("llmc-gptq", "random"): [0.52, 0.50],
    }
    for (method, calib), vals in dppl.items():
        for seed, v in enumerate(vals):
            d = tmp_path / f"{method}-{calib}-{seed}"
            d.mkdir()
            summary = [
                {"model": "fp", "ppl": 10.0},
                {"model": "q", "ppl": 10 + v, "delta_ppl": v, "jaccard": 0.9, "kl": 0.01},
            ]
            doms = [
                {
                    "model": "q",
                    "domain": dom,
                    "ppl_fp": 8.0,
                    "ppl": 8 + v * f,
                    "delta_ppl": v * f,
                    "jaccard": 0.9,
                    "kl": 0.01 * f,
                }
                for dom, f in (("prose", 0.5), ("code", 2.0))
            ]
            (d / "eval.json").write_text(json.dumps({"summary": summary, "domains": doms}))
            recs.append(
                {"model": "m", "calib": calib, "seed": seed, "method": method, "scheme": "int3-g128", "eval": d}
            )
    return recs


def test_domain_frame_answers_and_tables(tmp_path: Path) -> None:
    df = er.domain_frame(_cells(tmp_path))
    assert set(df.domain) == {"all", "prose", "code"} and len(df) == 6 * 3
    r = er.compare(df, ("autoround", "pascal-self"), ("autoround", "random"), "int3-g128", "code")
    assert r["verdict"] == "better, beyond seed noise" and r["ours"] == "1.040 ± 0.057"
    r = er.compare(df, ("autoround", "pascal-self"), ("llmc-gptq", "random"), "int3-g128", "code")
    assert r["verdict"] == "worse, within seed noise"
    assert er.compare(df, ("autoround", "pascal-self"), ("autoround", "ebss"), "int3-g128", "code") is None
    text = er.answers(df)
    assert "pascal-self vs random prose (autoround)" in text and "EBSS" not in text
    t = er.domain_tables(df, "delta_ppl", 3)[("m", "int3-g128")]
    assert t.splitlines()[0] == "| quantizer | calibration set | seeds | prose | code | all |"
    out = er.write(tmp_path / "docs" / "tables.md", df, pd.DataFrame(), "python x", "a: 1")
    page = out.read_text()
    assert "![m_domains.png](m_domains.png)" in page and (tmp_path / "docs" / "m_domains.png").is_file()


def test_committed_cells_survive_a_partial_run_and_disk_wins(tmp_path: Path) -> None:
    ec = benchmark_module("evidence_cells")
    cells = {"metrics": str(tmp_path / "cells.jsonl"), "coverage": str(tmp_path / "coverage.jsonl")}
    first = er.domain_frame(_cells(tmp_path))
    cov = pd.DataFrame([{"model": "m", "calib": "random", "seed": 0, "tokens": 8192, "share_below": 0.06}])
    df, c = ec.keep(cells, first, cov)
    assert len(df) == 18 and len(c) == 1 and len(ec.read(Path(cells["metrics"]))) == 18
    # a later run on a fresh machine: one cell on disk, re-measured; the other committed cells stay
    later = first[(first.method == "autoround") & (first.calib == "random") & (first.seed == 0)].copy()
    later["delta_ppl"] = later["delta_ppl"] + 1.0
    df, c = ec.keep(cells, later, pd.DataFrame())
    assert len(df) == 18 and len(c) == 1
    kept = ec.read(Path(cells["metrics"]))
    sel = kept[(kept.method == "autoround") & (kept.calib == "random") & (kept.seed == 0)]
    assert sorted(sel.delta_ppl) == sorted(later.delta_ppl)  # disk wins
    other = kept[(kept.method == "llmc-gptq") & (kept.seed == 1) & (kept.domain == "all")]
    assert other.delta_ppl.tolist() == [0.50]  # committed record untouched, at full precision
    assert ec.keep(None, later, pd.DataFrame())[0] is later  # no `cells` setting: nothing read or written


def test_a_partial_page_keeps_the_published_plot_name() -> None:
    assert er.plot_name(Path("docs/evidence/tables.md"), "m") == "m_domains.png"
    assert er.plot_name(Path("docs/evidence/autoround_lib.md"), "m") == "autoround_lib_m_domains.png"
