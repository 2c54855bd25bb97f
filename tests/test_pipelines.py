"""build-calib's settings come from the stage dataclasses, and every file under pipelines/ passes the preflight.

Why: a second list of stage options drifts (different defaults, unreachable flags), and a run config
that fails at stage 2 after an hour of profiling is found only by running it.  Here each stage's
defaults inside build-calib are compared with the stage alone, and every pipelines/*.yaml is loaded
and preflighted (`--dry-run`); endpoint checks are skipped where no endpoint is given.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pascal_moe.errors import PascalError
from pascal_moe.pipeline import stage_settings
from pascal_moe.pipeline_config import OVERRIDES, OWNERS, RENAMED, SHARED, STAGES, WIRED, BuildCalibConfig
from pascal_moe.preflight import preflight
from pascal_moe.settings import from_mapping, load_yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))
BUILD_CALIB = [p for p in PIPELINES if "build-calib" in (yaml.safe_load(p.read_text()) or {})]
BENCHMARK = [p for p in PIPELINES if p not in BUILD_CALIB]
ENV = {
    **os.environ,
    "OPENAI_BASE_URL": "",
    "HF_HUB_OFFLINE": "1",
    "NO_COLOR": "1",
    "COLUMNS": "200",
    "PYTHONPATH": str(ROOT),
}


def cli(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pascal_moe.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def _defaults(cls: type) -> dict:
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


# --------------------------------------------------------------------------- one source of options


def test_stage_defaults_are_the_same_inside_build_calib(tmp_path: Path) -> None:
    """Every stage field build-calib passes by default equals the stage's own default, unless listed in OVERRIDES."""
    stages = stage_settings(BuildCalibConfig(model="m", out=str(tmp_path)))
    checked = 0
    for name, cls in STAGES.items():
        alone = _defaults(cls)
        for field, value in dataclasses.asdict(stages[name]).items():
            if field in WIRED[name] or field == "model" or (name, field) in OVERRIDES:
                continue
            assert value == alone[field], f"build-calib passes {name}.{field}={value!r}, alone {alone[field]!r}"
            checked += 1
    assert checked > 40
    assert all(why.strip() for why in OVERRIDES.values())
    assert (stages["profile"].max_samples, stages["profile"].seq_len, stages["profile"].split) == (None, 2048, "train")
    assert stages["profile"].max_tokens == 3 * stages["balance"].tokens  # the pool: a few times the set, in tokens
    assert stages["synthesize"].seq_len == stages["balance"].seq_len == 2048


def test_every_stage_option_is_reachable_with_one_owner() -> None:
    flags = {f.name for f in dataclasses.fields(BuildCalibConfig) if f.metadata.get("cli") is not False}
    for name, cls in STAGES.items():
        for f in dataclasses.fields(cls):
            if f.name in WIRED[name] or (name, f.name) in RENAMED:
                continue
            assert f.name in flags, f"{name}.{f.name} cannot be set from the build-calib command line"
            assert f.name in SHARED or OWNERS[f.name] == name
    for flag_ in ("request_seed", "accept_ratio", "sensitivity_weight", "boundary_weight", "weight_error_tokens"):
        assert flag_ in flags


def test_flags_yaml_and_sections_reach_the_stages(tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "build-calib:\n  model: m\n  rounds: 1\n  batch_size: 4\n"
        "  profile: {batch_size: 2, top_triggers: 7}\n  balance: {boundary_weight: 0.5}\n"
    )
    cfg = from_mapping(BuildCalibConfig, load_yaml(str(cfg_file), "build-calib"), str(cfg_file))
    st = stage_settings(cfg)
    assert (st["profile"].batch_size, st["synthesize"].batch_size, st["synthesize"].rounds) == (2, 4, 1)
    assert (st["profile"].top_triggers, st["balance"].boundary_weight) == (7, 0.5)
    st = stage_settings(BuildCalibConfig(model="m", request_seed=False, accept_ratio=2.0, split="heldout"))
    assert (st["synthesize"].request_seed, st["synthesize"].accept_ratio) == (False, 2.0)
    assert st["profile"].split == "heldout"  # a given split wins over the bundled-corpus override
    with pytest.raises(PascalError, match="top_trigers"):
        stage_settings(BuildCalibConfig(model="m", profile={"top_trigers": 3}))
    with pytest.raises(PascalError, match="out"):
        stage_settings(BuildCalibConfig(model="m", balance={"out": "x"}))


def test_build_calib_help_documents_the_union() -> None:
    proc = cli("build-calib", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.replace("│", " ").split())
    for needle in (
        "--no-request-seed",
        "--accept-ratio",
        "--boundary-weight",
        "(synthesize)",
        "(balance)",
        "shared",
        "--dry-run",
    ):
        assert needle in text, needle


# --------------------------------------------------------------------------- every pipelines/*.yaml


@pytest.mark.parametrize("path", [p for p in BUILD_CALIB if "qwen3-30b" not in p.name], ids=lambda p: p.name)
def test_bundled_pipeline_passes_dry_run(path: Path, tmp_path: Path) -> None:
    proc = cli("build-calib", "--config", str(path), "--out", str(tmp_path / "run"), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preflight passed" in proc.stderr and "skipped endpoint" in " ".join(proc.stderr.split())
    assert "profile" in proc.stderr and "balance" in proc.stderr and "total" in proc.stderr
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_qwen3_30b_without_endpoint_fails_fast_naming_it(tmp_path: Path) -> None:
    """No endpoint at base_url: one line naming it, in seconds, before stage 1 (and with or without --dry-run)."""
    path = ROOT / "pipelines" / "qwen3-30b-a3b.yaml"
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    for extra in ([], ["--dry-run"]):
        t0 = time.monotonic()
        proc = cli(
            "build-calib",
            "--config",
            str(path),
            "--base-url",
            url,
            "--out",
            str(tmp_path / "run"),
            *extra,
            cwd=tmp_path,
        )
        assert time.monotonic() - t0 < 30
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and url in lines[-1] and "Traceback" not in proc.stderr
        assert len(lines) == 1 if not extra else len(lines) > 5  # --dry-run also prints every finding
        assert not (tmp_path / "run").exists()


def test_qwen3_30b_passes_with_an_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # offline, with the hub cache holding only the real config.json (data/configs): shapes checked, nothing fetched
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-30B-A3B"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("c" * 40)
    (snap / "snapshots" / ("c" * 40)).mkdir(parents=True)
    conf = (ROOT / "data" / "configs" / "Qwen3-30B-A3B" / "config.json").read_text()
    (snap / "snapshots" / ("c" * 40) / "config.json").write_text(conf)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_openai import FakeOpenAI

    path = ROOT / "pipelines" / "qwen3-30b-a3b.yaml"
    with FakeOpenAI() as server:
        values = load_yaml(str(path), "build-calib")
        cfg = from_mapping(
            BuildCalibConfig,
            {**values, "base_url": server.url, "device": "cpu", "out": str(tmp_path / "run")},
            path.name,
        )
        rep = preflight(cfg)
    assert not rep.errors, [f.detail for f in rep.errors]
    assert any(f.what == "model" and "30.5B params" in f.detail for f in rep.findings)
    ep = [f for f in rep.findings if f.what == "endpoint"]
    assert ep and ep[0].status == "ok" and "fake-agent" in ep[0].detail


@pytest.mark.parametrize("path", BENCHMARK, ids=lambda p: p.name)
def test_benchmark_pipeline_settings_pass_preflight(path: Path, tmp_path: Path) -> None:
    """The benchmark configs: each stage's section builds that stage's settings, and each passes the preflight."""
    from pascal_moe.evaluate.config import EvalConfig
    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.quant.config import QuantizeConfig

    s = yaml.safe_load(path.read_text())
    for model in s["models"]:
        calib = str(tmp_path / "calib")
        cfgs = [
            from_mapping(
                ProfileConfig,
                {"model": model, "out": str(tmp_path / "p"), "scheme": s["calib_scheme"], **s["profile"]},
                path.name,
            ),
            from_mapping(
                BuildCalibConfig,
                {"model": model, "out": str(tmp_path / "b"), "seq_len": s["seq_len"], **s["build_calib"]},
                path.name,
            ),
            *[
                from_mapping(
                    QuantizeConfig,
                    {
                        "model": model,
                        "calib": calib,
                        "out": str(tmp_path / "q"),
                        "scheme": scheme,
                        "seq_len": s["seq_len"],
                        **s["quantize"],
                    },
                    path.name,
                )
                for scheme in s["schemes"]
            ],
            from_mapping(EvalConfig, {"model": model, "out": str(tmp_path / "e"), **s["eval"]}, path.name),
        ]
        for cfg in cfgs:
            rep = preflight(cfg, full=True, produced={calib})
            assert not rep.errors, f"{path.name} {type(cfg).__name__}: {[f.detail for f in rep.errors]}"
