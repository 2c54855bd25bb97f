"""notebooks/explore_run.ipynb runs headless on a small run directory built here from CONTRACTS-shaped artifacts.

The run directory is synthetic (no model runs), so this test does not depend on the other stages' speed;
its numbers are chosen so the notebook's printed summaries can be checked exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pascal_moe.evaluate import plots

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"
L, E = 3, 8


def build_run_dir(root: Path, with_synth: bool = True) -> Path:
    rng = np.random.default_rng(0)
    prof, synth, calib, ev = (root / d for d in ("profile", "synth", "calib", "eval"))
    for d in (prof, synth, calib, ev):
        d.mkdir(parents=True)
    tokens = rng.integers(1, 500, size=(L, E))
    tokens[2, 5] = 0  # one dead expert
    experts = pd.DataFrame(
        [
            {
                "layer": lay,
                "layer_index": lay + 1,
                "expert": e,
                "tokens": int(tokens[lay, e]),
                "share": tokens[lay, e] / tokens[lay].sum(),
                "weight_mass": float(tokens[lay, e]),
                "boundary_tokens": 3,
                "margin_mean": 0.1,
                "margin_p10": 0.01,
                "margin_p50": 0.05,
                "weight_error": 0.02,
                "reroute_rate": 0.1,
                "sensitivity": float(rng.random()),
            }
            for lay in range(L)
            for e in range(E)
        ]
    )
    experts.to_parquet(prof / "experts.parquet")
    pd.DataFrame(
        [
            {
                "layer": lay,
                "expert": e,
                "kind": "token",
                "rank": r,
                "token_id": 100 + r,
                "token": f"tok{lay}{e}{r}",
                "count": 10 - r,
                "lift": 5.0 - r,
                "context": None,
                "weight": 1.0,
            }
            for lay in range(L)
            for e in range(E)
            for r in range(6)
        ]
    ).to_parquet(prof / "triggers.parquet")
    if with_synth:
        n = 5
        pq.write_table(
            pa.table(
                {
                    "sample_id": [f"s{i}" for i in range(n)],
                    "text": [f"synthetic passage number {i}" for i in range(n)],
                    "source": ["synthetic"] * n,
                    "targets": [["L2.E5", "L1.E3"]] * n,
                    "pattern": ["p"] * n,
                    "round": [0, 0, 1, 1, 1],
                    "backend": ["self"] * n,
                    "agent_model": ["self"] * n,
                    "prompt_hash": ["h"] * n,
                    "n_tokens": [40] * n,
                    "keys": [[21, 11]] * n,
                    "counts": [[4, 2]] * n,
                    "target_hits": [6] * n,
                    "target_rate": [0.15] * n,
                    "baseline_rate": [0.05] * n,
                    "hit_ratio": [3.0, 1.0, 2.5, 4.0, 0.5],
                    "accepted": [True, False, True, True, False],
                }
            ),
            synth / "synthetic.parquet",
        )
    pq.write_table(
        pa.table(
            {
                "text": ["a", "b", "c"],
                "source": ["seed", "seed", "synthetic"],
                "sample_id": ["d1", "d2", "s0"],
                "n_tokens": pa.array([10, 20, 40], pa.int32()),
                "input_ids": pa.array([[1] * 10, [2] * 20, [3] * 40], pa.list_(pa.int32())),
                "targets": [[], [], ["L2.E5"]],
            }
        ),
        calib / "calib.parquet",
    )
    demand = np.full(L * E, 50.0)
    before, after = tokens.ravel() * 0.1, np.maximum(tokens.ravel() * 0.1, 60)
    pd.DataFrame(
        {
            "layer": np.arange(L * E) // E,
            "expert": np.arange(L * E) % E,
            "key": np.arange(L * E),
            "demand": demand,
            "weight": 1.0,
            "tokens_random": before,
            "tokens_measured": after,
            "below_before": before < demand,
            "below_after": after < demand,
            "candidate_tokens": tokens.ravel(),
        }
    ).to_parquet(calib / "coverage.parquet")
    plots.coverage_heatmap(tokens, calib / "coverage.png")
    rows = [
        {
            "model": m,
            "path": m,
            "method": m,
            "scheme": "int4-g128",
            "metric": "jaccard",
            "layer": lay,
            "value": v - 0.05 * lay,
        }
        for m, v in (("rtn", 0.8), ("vsraq", 0.9))
        for lay in range(L)
    ]
    rows += [
        {"model": m, "path": m, "method": m, "scheme": "int4-g128", "metric": met, "layer": -1, "value": v}
        for m, met, v in (
            ("fp", "ppl", 10.0),
            ("rtn", "ppl", 11.0),
            ("rtn", "kl", 0.02),
            ("vsraq", "ppl", 10.5),
            ("vsraq", "kl", 0.01),
        )
    ]
    df = pd.DataFrame(rows)
    df.to_parquet(ev / "eval.parquet")
    plots.jaccard_lines(df, ev / "jaccard.png")
    plots.ppl_kl_bars(df, ev / "ppl_kl.png")
    return root, int((before < demand).sum()), int((after < demand).sum())


def execute(run_dir: Path, monkeypatch) -> list[dict]:
    monkeypatch.setenv("PASCAL_RUN_DIR", str(run_dir))
    monkeypatch.delenv("PASCAL_EVAL_DIR", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
    ).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(outputs: list[dict]) -> str:
    parts = []
    for o in outputs:
        parts.append(o.get("text", ""))
        parts.append(o.get("data", {}).get("text/plain", ""))
        parts.append(o.get("data", {}).get("text/html", ""))
    return "\n".join(parts)


def test_notebook_shows_every_artifact(tmp_path, monkeypatch):
    run_dir, below_before, below_after = build_run_dir(tmp_path / "run")
    outputs = execute(run_dir, monkeypatch)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = _text(outputs)
    assert "accepted 3 of 5 synthetic samples (60%)" in text
    assert f"random seed set {below_before}, balanced set {below_after} (of {L * E})" in text
    assert "tok2\u0035" in text and "tok250 | tok251" in text  # the dead expert's trigger tokens are listed
    assert "synthetic passage number 3" in text  # the best accepted sample is shown
    assert "missing:" not in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4  # share/sensitivity heatmaps, coverage.png, jaccard.png, ppl_kl.png


def test_notebook_tolerates_a_partial_run(tmp_path, monkeypatch):
    run_dir, _, _ = build_run_dir(tmp_path / "run", with_synth=False)
    outputs = execute(run_dir, monkeypatch)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert "missing: " in _text(outputs) and "synthetic.parquet" in _text(outputs)
    assert os.environ.get("PASCAL_RUN_DIR") == str(run_dir)
