"""The preflight: what would fail later is found first, in seconds, as one line.

Why: the expensive stages (profiling a 30B model, an agent run) should never be the place where a
bad scheme, an uncreatable output directory, a missing package or a dead endpoint is discovered.
Endpoint tests use a real HTTP server (tests/fake_openai.py) and a closed localhost port.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.balance.config import BalanceConfig, ExportConfig
from pascal_moe.errors import PascalError
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.pipeline_config import BuildCalibConfig
from pascal_moe.preflight import preflight, quick
from pascal_moe.preflight.checks import check_endpoint, check_model, check_out, check_scheme
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.quant.config import QuantizeConfig

ROOT = Path(__file__).resolve().parents[1]
QWEN = str(ROOT / "data" / "models" / "qwen3-moe-tiny")  # config.json is enough: no weights are read
sys.path.insert(0, str(ROOT / "tests"))
from fake_openai import FakeOpenAI  # noqa: E402


def configs(out: str, tmp: Path) -> dict[str, object]:
    """One valid settings object per command, writing to `out`."""
    prof = tmp / "prof"
    prof.mkdir(exist_ok=True)
    (prof / "profile.json").write_text("{}")
    return {
        "profile": ProfileConfig(model=QWEN, out=out),
        "synthesize": SynthesizeConfig(model=QWEN, profile=str(prof), out=out, agent="self"),
        "balance": BalanceConfig(profile=str(prof), out=out),
        "build-calib": BuildCalibConfig(model=QWEN, out=out, agent="self"),
        "quantize": QuantizeConfig(model=QWEN, calib=str(prof), out=out),
        "eval": EvalConfig(model=QWEN, out=out),
        "export-calib": ExportConfig(calib=str(prof), format="jsonl", out=out),
    }


@pytest.mark.parametrize(
    "command", ["profile", "synthesize", "balance", "build-calib", "quantize", "eval", "export-calib"]
)
def test_uncreatable_output_is_one_line_for_every_command(command: str, tmp_path: Path) -> None:
    cfg = configs("/proc/x/y", tmp_path)[command]
    with pytest.raises(PascalError) as err:
        quick(cfg) if command != "build-calib" else preflight(cfg).raise_if_errors()
    msg = str(err.value)
    assert "/proc/x/y" in msg and "\n" not in msg


def test_output_checks(tmp_path: Path) -> None:
    assert check_out(str(tmp_path / "a" / "b")).status == "ok" and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    assert check_out(str(tmp_path / "file" / "sub")).status == "error"
    assert check_out(str(tmp_path / "file")).status == "error"  # a file where a directory should go
    assert check_out(str(tmp_path / "export.jsonl")).status == "ok"  # export-calib writes a file
    assert "GB free" in check_out(str(tmp_path), need_bytes=10**18).detail


def test_scheme_checked_against_the_model_shapes() -> None:
    found, info = check_model(QWEN, full=False)
    assert found[0].status == "ok" and info is not None and {128, 192} <= info.in_dims
    assert 0 < info.active_params < info.params
    bad = check_scheme("int5-g7", info, 4)  # padded width 133 (fp32): the grouped kernel's stride error
    assert bad.status == "error" and "133" in bad.detail and "multiple of 4" in bad.detail
    assert check_scheme("int4-g6", info, 4).status == "ok"  # 132 and 192: 16-byte rows in fp32 (it runs)
    assert check_scheme("int5-g7", info, 2).status == "ok"  # bf16: the cast back copies contiguously (it runs)
    assert check_scheme("int5-g7", None).status == "error"  # shapes unknown: the group size itself
    assert check_scheme("int9-g128", info).status == "error"
    ok = check_scheme("int4-g128", info)  # 192 is not a multiple of 128: a partial last group, padded to 256
    assert ok.status == "ok" and "partial" in ok.detail
    assert check_scheme("nvfp4", info).status == "ok"


def test_model_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    found, _ = check_model(str(tmp_path / "llama"), full=True)
    assert found[0].status == "error" and "qwen3_moe" in found[0].detail
    found, _ = check_model(str(tmp_path / "absent"), full=True)
    assert found[0].status == "error" and "absent" in found[0].detail
    found, info = check_model("some-org/not-cached-model", full=True)  # offline: an error naming the fetch command
    assert found[0].status == "error" and "hf download some-org/not-cached-model" in found[0].detail and info is None


def test_option_values_are_checked_by_name(tmp_path: Path) -> None:
    cfg = BalanceConfig(profile=str(tmp_path), out=str(tmp_path / "o"), seq_len=0, natural_share=1.5)
    msgs = [f.detail for f in preflight(cfg, full=False).errors]
    assert any("--seq-len must be at least 1" in m for m in msgs)
    assert any("--natural-share must be a share in [0, 1]" in m for m in msgs)
    assert any("profile.json" in m for m in msgs)  # the profile dir holds no profile
    cfg = QuantizeConfig(model=QWEN, calib=str(tmp_path), out=str(tmp_path / "q"), method="gptq", batch_size=0)
    msgs = " ".join(f.detail for f in preflight(cfg, full=False).errors)
    assert "--method must be one of rtn" in msgs and "--batch-size must be at least 1" in msgs


def test_missing_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else real(name, *a)
    )
    (tmp_path / "calib.parquet").write_text("")
    cfg = QuantizeConfig(model=QWEN, calib=str(tmp_path), out=str(tmp_path / "q"))
    msgs = [f.detail for f in preflight(cfg, full=False).errors]
    assert msgs and "compressed_tensors is not installed" in msgs[0] and "--export-format fake" in msgs[0]
    assert not preflight(
        QuantizeConfig(model=QWEN, calib=str(tmp_path), out=str(tmp_path / "q"), export_format="fake"), full=False
    ).errors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_fails_in_seconds_naming_it() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    t0 = time.monotonic()
    found = check_endpoint(url, None, "EMPTY")
    assert time.monotonic() - t0 < 10
    assert found[0].status == "error" and url in found[0].detail


def test_endpoint_up_lists_models_and_answers() -> None:
    with FakeOpenAI(model="agent-x") as server:
        found = check_endpoint(server.url, None, "EMPTY")
        assert found[0].status == "ok" and "agent-x" in found[0].detail
        wrong = check_endpoint(server.url, "other-model", "EMPTY")
        assert wrong[0].status == "error" and "agent-x" in wrong[0].detail


def test_agent_settings_that_would_fail_at_stage_two(tmp_path: Path) -> None:
    prof = tmp_path / "p"
    prof.mkdir()
    (prof / "profile.json").write_text("{}")
    cfg = SynthesizeConfig(
        model=QWEN, profile=str(prof), out=str(tmp_path / "s"), agent="vllm", base_url="http://127.0.0.1:8000/v1"
    )
    msgs = " ".join(f.detail for f in preflight(cfg, full=True).errors)
    assert "--agent-model" in msgs and "ignores --base-url" in msgs
    cfg = SynthesizeConfig(model=QWEN, profile=str(prof), out=str(tmp_path / "s"), agent="openai")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_BASE_URL", "")
        assert "needs an endpoint" in " ".join(f.detail for f in preflight(cfg, full=False).errors)
    skipped = preflight(SynthesizeConfig(model=QWEN, profile=str(prof), out=str(tmp_path / "s"), agent="self"))
    assert not skipped.errors and any(f.what == "endpoint" and f.status == "skipped" for f in skipped.findings)


def test_dry_run_prints_plan_and_writes_nothing(tmp_path: Path) -> None:
    import os
    import subprocess

    out = tmp_path / "prof"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pascal_moe.cli",
            "profile",
            "--model",
            QWEN,
            "--out",
            str(out),
            "--max-samples",
            "100",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preflight passed" in proc.stderr and "100 samples" in proc.stderr and "tokens" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_model_shapes_from_config_for_every_architecture(arch: str, tiny_moe_dir) -> None:
    """The meta-device skeleton finds every grouped input width (fused and transposed expert tensors included)."""
    path = tiny_moe_dir(arch)
    found, info = check_model(str(path), full=False)
    assert found[0].status == "ok", found[0].detail
    assert info is not None and 64 in info.in_dims and 0 < info.active_params < info.params
    assert check_scheme("int4-g16", info).status == "ok"
    bad = check_scheme("int4-g7", info, 4)  # in fp32 some width pads to no multiple of 4 (e.g. 64 -> 70)
    padded = [-(-d // 7) * 7 for d in info.in_dims]
    assert bad.status == "error" and any(str(w) in bad.detail for w in padded if w % 4)
