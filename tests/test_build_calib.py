"""`pascal build-calib`: stage markers, resume by fingerprint, and one real offline run.

The end-to-end test runs the real stages (profile -> synthesize with the `self` backend -> balance)
on the bundled Qwen3-MoE when its weights are present, else on a tiny random Qwen3-MoE built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_moe

from pascal_moe.errors import PascalError
from pascal_moe.pipeline import Stage, run_stage
from pascal_moe.pipeline_config import BuildCalibConfig
from pascal_moe.settings import from_mapping, load_yaml

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "models" / "qwen3-moe-tiny"


def tiny_model(d: Path) -> Path:
    """The bundled Qwen3-MoE if trained, else a random one with its tokenizer (widths divisible by W4A16 groups)."""
    bundled = Path(os.environ.get("PASCAL_TEST_QWEN_DIR") or BUNDLED)  # conftest's development override
    if (bundled / "model.safetensors").is_file():
        return bundled
    wide = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, head_dim=32, num_hidden_layers=2)
    return save_tiny_moe("qwen3_moe", d, mlp_only_layers=[], norm_topk_prob=False, **wide)


def test_run_stage_skips_resumes_and_redoes(tmp_path):
    calls = []

    def work(fail: bool = False):
        calls.append(fail)
        (tmp_path / "s" / f"part{len(calls)}").write_text("x")
        if fail:
            raise KeyboardInterrupt  # a crash mid-stage

    stage = Stage("s", tmp_path / "s", {"a": 1}, work)
    assert run_stage(stage, tmp_path) is True
    mtime = (tmp_path / "s" / "stage.json").stat().st_mtime_ns
    assert run_stage(stage, tmp_path) is False and len(calls) == 1  # finished + same fingerprint: skipped
    assert (tmp_path / "s" / "stage.json").stat().st_mtime_ns == mtime
    with pytest.raises(KeyboardInterrupt):
        run_stage(Stage("s", tmp_path / "s", {"a": 2}, lambda: work(fail=True)), tmp_path)
    assert not (tmp_path / "s" / "stage.json").exists()  # changed settings: old output cleared, no marker
    assert not (tmp_path / "s" / "part1").exists() and (tmp_path / "s" / "part2").exists()
    assert run_stage(Stage("s", tmp_path / "s", {"a": 2}, work), tmp_path) is True
    assert (tmp_path / "s" / "part2").exists()  # same fingerprint, unfinished: resumed in place
    log = (tmp_path / "pipeline.log").read_text()
    assert "s: skipped" in log and "redoing from scratch" in log and "resuming an unfinished run" in log


@pytest.mark.parametrize("name", ["bundled-qwen3.yaml", "bundled-deepseek.yaml", "qwen3-30b-a3b.yaml"])
def test_pipeline_yaml_files_are_valid_settings(name):
    values = load_yaml(str(ROOT / "pipelines" / name), section="build-calib")
    cfg = from_mapping(BuildCalibConfig, values, name)
    assert cfg.model and cfg.tokens > 0


def test_build_calib_rejects_bad_settings(tmp_path):
    from pascal_moe.pipeline import run

    with pytest.raises(PascalError, match="--tokens"):
        run(BuildCalibConfig(model=str(tmp_path), out=str(tmp_path / "r"), tokens=0))
    with pytest.raises(PascalError, match="config.json"):
        run(BuildCalibConfig(model=str(tmp_path), out=str(tmp_path / "r")))


def _cli(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "pascal_moe.cli",
        "build-calib",
        "--model",
        str(model),
        "--out",
        str(out),
        "--max-seed-samples",
        "24",
        "--seed-pool-tokens",
        "100000",
        "--no-sensitivity",
        "--rounds",
        "1",
        "--samples-per-target",
        "1",
        "--top-sensitive",
        "2",
        "--self-tokens",
        "8",
        "--tokens",
        "1024",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        *extra,
    ]
    env = {**os.environ, "OPENAI_BASE_URL": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow
def test_build_calib_offline_end_to_end_and_resume(tmp_path):
    for mod in ("profile/run.py", "profile/capture.py", "agent/loop.py"):
        if not (ROOT / "pascal_moe" / mod).is_file():
            pytest.skip(f"pascal_moe/{mod} is not built yet")
    import numpy as np
    import pandas as pd
    from datasets import load_dataset

    model, out = tiny_model(tmp_path / "model"), tmp_path / "run"
    res = _cli(model, out)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = load_dataset("parquet", data_files=str(out / "calib" / "calib.parquet"), split="train")
    lens = [len(i) for i in ds["input_ids"]]
    assert lens == ds["n_tokens"] and all(n == 64 for n in lens[:-1]) and sum(lens) <= 1024
    man = json.loads((out / "calib" / "manifest.json").read_text())
    assert man["calib_tokens"] == sum(lens) >= 0.9 * 1024  # 24 short seed documents may not fill it exactly
    assert load_dataset(str(out), split="train")["n_tokens"] == ds["n_tokens"]  # the run root loads the set too
    cov = pd.read_parquet(out / "calib" / "coverage.parquet")
    counted = np.zeros(len(cov))
    for keys, counts in zip(ds["keys"], ds["counts"]):
        np.add.at(counted, keys, counts)
    assert (cov.sort_values("key")["tokens_measured"].to_numpy() == counted).all()
    for stage in ("profile", "synth", "calib"):
        assert json.loads((out / stage / "stage.json").read_text())["fingerprint"]
    marks = {s: (out / s / "stage.json").stat().st_mtime_ns for s in ("profile", "synth")}
    outputs = {
        s: (out / s / f).stat().st_mtime_ns for s, f in (("profile", "samples.parquet"), ("synth", "synthetic.parquet"))
    }

    (out / "calib" / "stage.json").unlink()  # as if the run died inside the last stage
    (out / "pipeline.log").unlink()
    res = _cli(model, out, "--tokens", "768")
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "pipeline.log").read_text()
    assert "profile: skipped" in log and "synth: skipped" in log and "calib: running" in log
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in marks} == marks
    assert {
        s: (out / s / f).stat().st_mtime_ns for s, f in (("profile", "samples.parquet"), ("synth", "synthetic.parquet"))
    } == outputs
    ds = load_dataset("parquet", data_files=str(out / "calib" / "calib.parquet"), split="train")
    assert sum(ds["n_tokens"]) <= 768
    man = json.loads((out / "calib" / "manifest.json").read_text())
    assert man["coverage"]["after_balanced"]["synthetic_share"] <= 0.5

    from test_downstream import _same_multiset, gptq_w4a16  # llm-compressor quantizes from this very Parquet

    _same_multiset(gptq_w4a16(model, ds, 64, tmp_path / "q"), ds["input_ids"])


@pytest.mark.slow
def test_build_calib_ctrl_c_says_how_to_resume_and_rerun_resumes(tmp_path):
    """SIGINT (what Ctrl-C sends) in the synthesis stage: one message, exit 130, finished stages kept."""
    import signal
    import time

    model, out = tiny_model(tmp_path / "model"), tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "pascal_moe.cli",
        "build-calib",
        "--model",
        str(model),
        "--out",
        str(out),
        "--max-seed-samples",
        "24",
        "--no-sensitivity",
        "--rounds",
        "2",
        "--samples-per-target",
        "4",
        "--top-sensitive",
        "4",
        "--self-tokens",
        "48",
        "--tokens",
        "1024",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
    ]
    env = {**os.environ, "OPENAI_BASE_URL": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 300
    while not (out / "synth" / ".stage-started.json").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "synthesis never started"
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted: " + proc.stderr.read()[-2000:]
    time.sleep(1.0)  # inside the self-sampling loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err
    assert (out / "profile" / "stage.json").is_file() and not (out / "synth" / "stage.json").is_file()
    profile_mark = (out / "profile" / "stage.json").stat().st_mtime_ns

    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "pipeline.log").read_text()
    assert "profile: skipped" in log and "synth: resuming an unfinished run" in log
    assert (out / "profile" / "stage.json").stat().st_mtime_ns == profile_mark
    assert (out / "calib" / "calib.parquet").is_file()
