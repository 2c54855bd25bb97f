"""Placement and offload (issue #15): offloading changes where weights live, never what comes out.

- The bundled qwen3-moe-tiny quantized with and without `--offload-dir D --max-memory cpu=1MB`
  (decoder blocks on disk, one onloaded at a time, the export streamed one shard per block)
  gives bit-identical checkpoint tensors, and both exports load through transformers to the same
  logits (pack-quantized at g64; fake-quantized at g128, where the 192-wide experts cannot pack).
- Full-forward stages: a budget below the model's size streams the blocks that do not fit from
  the checkpoint (read before each block's forward, dropped after) with bit-identical logits; without --offload-dir it is a one-line error naming it.
- Bad --max-memory strings are one-line PascalErrors, on the command line too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pascal_moe.errors import PascalError
from pascal_moe.models.placement import make_placement, parse_max_memory, parse_size
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.run import run

REPO = Path(__file__).resolve().parents[1]


def _tensors(qdir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(qdir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _logits(qdir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(qdir).eval()(ids).logits


@pytest.mark.parametrize(
    ("method", "scheme", "fmt"),
    [
        ("rtn", "int4-g64", "pack-quantized"),
        ("autoround", "int4-g64", "pack-quantized"),
        ("rtn", "int4-g128", "fake-quantized"),
    ],
)
def test_offloaded_quantization_is_bit_identical(qwen_dir, text_calib, tmp_path, method, scheme, fmt) -> None:
    calib = text_calib(6)
    common = dict(model=str(qwen_dir), calib=str(calib), method=method, scheme=scheme, iters=3, seq_len=64, tokens=384)
    plain = run(QuantizeConfig(out=str(tmp_path / "plain"), **common))
    off = run(
        QuantizeConfig(out=str(tmp_path / "off"), offload_dir=str(tmp_path / "od"), max_memory="cpu=1MB", **common)
    )
    a, b = _tensors(plain), _tensors(off)
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    meta_off = json.loads((off / "quantize.json").read_text())
    assert meta_off["export"]["format"] == fmt
    assert meta_off["export"]["streamed_shards"] == 5  # 4 blocks + embeddings/norm/lm_head
    assert len(list(off.glob("model-*-of-00005.safetensors"))) == 5
    assert "streamed_shards" not in json.loads((plain / "quantize.json").read_text())["export"]
    assert meta_off["placement"] == {"offloaded": True, "blocks_from": "checkpoint"}  # read block by block
    assert json.loads((plain / "quantize.json").read_text())["placement"]["offloaded"] is False
    ids = torch.arange(3, 43).unsqueeze(0)
    assert torch.equal(_logits(plain, ids), _logits(off, ids))


def test_full_forward_offload_same_logits(qwen_dir, tmp_path) -> None:
    from pascal_moe.models.loading import load_model

    ids = torch.arange(3, 43).unsqueeze(0)
    ref = load_model(str(qwen_dir), "cpu")
    off = load_model(str(qwen_dir), "cpu", max_memory="cpu=8MB", offload_dir=str(tmp_path / "od"))
    streamed = [i for i, lay in enumerate(off.model.layers) if next(lay.parameters()).device.type == "meta"]
    assert streamed  # those blocks are read from the checkpoint at each forward, then dropped
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, off(ids).logits)
    assert all(next(off.model.layers[i].parameters()).device.type == "meta" for i in streamed)
    with pytest.raises(PascalError, match="--offload-dir"):
        load_model(str(qwen_dir), "cpu", max_memory="cpu=8MB")


def test_max_memory_parsing() -> None:
    assert parse_max_memory("0=70GiB, cpu=1.5GB") == {0: 70 << 30, "cpu": 1_500_000_000}
    assert parse_max_memory(None) == {} and parse_size("512MiB") == 512 << 20
    assert make_placement("cpu", "cpu=2GiB").max_memory == {"cpu": 2 << 30}
    for bad in ("cpu", "cpu=lots", "gpu0=1GB", "cpu=1XB", "=1GB"):
        with pytest.raises(PascalError) as e:
            parse_max_memory(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["cpu=12parsecs", "disk:1GB"])
def test_bad_max_memory_cli_is_one_line(qwen_dir, text_calib, tmp_path, bad) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "NO_COLOR": "1"}
    args = ["--model", str(qwen_dir), "--calib", str(text_calib(2)), "--out", str(tmp_path / "q"), "--max-memory", bad]
    proc = subprocess.run(
        [sys.executable, "-m", "pascal_moe.cli", "quantize", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "--max-memory" in err


def test_profile_sensitivity_streamed_is_identical(qwen_dir, tmp_path) -> None:
    """`pascal profile` (with its layer-wise RTN sensitivity pass) on streamed blocks writes the same experts.parquet.

    Streamed blocks get new parameter objects each time they are read, so the RTN swap must look them up per
    forward; with stale references the sensitivity pass fails or measures the wrong tensors."""
    import pandas as pd

    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.profile.run import run as profile

    common = dict(model=str(qwen_dir), max_samples=12, seq_len=48, batch_size=4, sensitivity=True)
    a = profile(ProfileConfig(out=str(tmp_path / "a"), **common))
    b = profile(
        ProfileConfig(out=str(tmp_path / "b"), offload_dir=str(tmp_path / "od"), max_memory="cpu=1MB", **common)
    )
    ea, eb = pd.read_parquet(a / "experts.parquet"), pd.read_parquet(b / "experts.parquet")
    assert ea["weight_error"].notna().any() and (ea["reroute_rate"] > 0).any()
    pd.testing.assert_frame_equal(ea, eb)
