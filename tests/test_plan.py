"""`pascal plan`: exact parameter counts from the meta model, the real Qwen3-30B-A3B sizes, placement decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pascal_moe.cli import app
from pascal_moe.errors import PascalError
from pascal_moe.models.base import decoder_layers
from pascal_moe.models.loading import load_model
from pascal_moe.models.placement import parse_max_memory
from pascal_moe.plan import GIB, PlanConfig, run
from pascal_moe.preflight.checks import check_model

ROOT = Path(__file__).resolve().parents[1]
QWEN30B = str(ROOT / "data" / "configs" / "Qwen3-30B-A3B")
BUNDLED = sorted(p for p in (ROOT / "data" / "models").iterdir() if (p / "model.safetensors").exists())


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_meta_counts_equal_the_loaded_model(path: Path) -> None:
    _, info = check_model(str(path), full=False)
    model = load_model(str(path), "cpu", "float32")
    assert info is not None and info.params == sum(p.numel() for p in model.parameters())
    assert info.block_params == [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    assert 0 < max(info.block_quantized) < max(info.block_params)  # routers and norms stay full precision


def test_qwen3_30b_sizes_from_the_checked_in_config() -> None:
    _, info = check_model(QWEN30B, full=False)
    assert info is not None
    assert 30.4e9 < info.params < 30.6e9  # the model card: 30.5B
    assert 3.2e9 < info.active_params < 3.4e9  # the model card: 3.3B activated
    assert len(info.block_params) == 48
    assert info.largest_target == 128 * 2 * 768 * 2048  # fused gate_up of all experts of one layer


def plan(max_memory: str, **kw) -> dict:
    rows = run(PlanConfig(model=QWEN30B, device="cuda", max_memory=max_memory, **kw))
    return {r.stage: r for r in rows}


def test_one_80gb_gpu_fits_every_stage() -> None:
    rows = plan("0=80GiB,cpu=200GiB")
    assert all(r.fits for r in rows.values()), {s: r.why for s, r in rows.items() if not r.fits}
    assert rows["profile"].placement == "all on cuda:0"
    assert 57 * GIB < rows["profile"].device_peak < 80 * GIB  # 56.9 GiB of bf16 weights + activations
    assert rows["eval"].placement.startswith("device map")  # two models do not fit 80 GiB side by side
    assert rows["quantize"].disk > 0  # 24 GiB of caches, 3 GiB in memory at --cache-limit-gb 2


def test_fit_decisions_flip_with_max_memory(tmp_path: Path) -> None:
    small = plan("0=30GiB,cpu=20GiB")
    assert small["profile"].placement.startswith("device map") and "on disk" in small["profile"].placement
    assert not small["profile"].fits and "--offload-dir" in small["profile"].why
    assert not small["quantize"].fits and "--offload-dir" in small["quantize"].why
    roomy_cpu = plan("0=40GiB,cpu=200GiB")
    assert roomy_cpu["profile"].fits and "on disk" not in roomy_cpu["profile"].placement
    assert roomy_cpu["quantize"].fits and roomy_cpu["quantize"].placement.endswith("others on cpu")
    assert roomy_cpu["quantize"].device_peak < 40 * GIB
    disk = plan("0=30GiB,cpu=20GiB", offload_dir=str(tmp_path / "off"))
    assert disk["profile"].fits and disk["quantize"].fits and disk["quantize"].placement.endswith("on disk")
    tiny_gpu = plan("0=2GiB,cpu=200GiB")
    assert not tiny_gpu["profile"].fits and "one block" in tiny_gpu["profile"].why


def test_cli_prints_the_plan_and_bad_budgets_are_one_line() -> None:
    r = CliRunner().invoke(
        app,
        ["plan", "--model", QWEN30B, "--device", "cuda", "--max-memory", "0=80GiB,cpu=200GiB"],
        env={"COLUMNS": "160"},
    )
    assert r.exit_code == 0, r.output
    assert "30.53B total, 3.35B active" in r.output and "48 x 128 x 8" in r.output
    assert sum(line.rstrip().endswith("yes") for line in r.output.splitlines()) == 5
    with pytest.raises(PascalError, match="bad --max-memory entry"):
        parse_max_memory("gpu0=80GiB")
    with pytest.raises(PascalError, match="bad size"):
        parse_max_memory("0=80 parsecs")
    assert parse_max_memory("0=80GiB, cpu=1.5GB") == {0: 80 * GIB, "cpu": 1_500_000_000}


def test_dry_run_reports_each_stage_memory(tmp_path: Path) -> None:
    from pascal_moe.preflight import preflight
    from pascal_moe.profile.config import ProfileConfig

    cfg = ProfileConfig(model=str(ROOT / "data/models/qwen3-moe-fine"), out=str(tmp_path / "p"), device="cpu")
    mem = [f for f in preflight(cfg, full=False).findings if f.what == "memory"]
    assert mem and mem[0].status == "ok" and mem[0].detail.startswith("all on cpu; peak device")
    gpu = ProfileConfig(model=QWEN30B, out=str(tmp_path / "p"), device="cuda:97")  # no GPU 97 here: no budget
    mem = [f for f in preflight(gpu, full=False).findings if f.what == "memory"]
    assert mem[0].status == "skipped" and "--max-memory 97=80GiB" in mem[0].detail
