"""benchmarks/downstream_quant.py: llm-compressor GPTQ fed calib.parquet, all-experts on and off, reloaded, evaluated.

The tiny model has 64-wide experts under 128-wide groups (the fine-grained bundled model's shape), so int3-g128
exercises the mixed-group reload and int2-g64 transformers' own loader; the two loaders must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import benchmark_module, save_tiny_moe

from pascal_moe.errors import PascalError

pytestmark = pytest.mark.downstream
ROOT = Path(__file__).resolve().parents[1]


dq = benchmark_module("downstream_quant")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, calib.parquet): a random Qwen3-MoE with 64-wide experts and 8 rows of 32 token ids."""
    d = tmp_path_factory.mktemp("dq")
    wide = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=32, num_hidden_layers=2)
    save_tiny_moe("qwen3_moe", d / "m", mlp_only_layers=[], **wide)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, 4000, (32,), generator=g).tolist() for _ in range(8)]
    pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), d / "calib.parquet")
    return d / "m", d / "calib.parquet"


@pytest.fixture(scope="module")
def int3(base, tmp_path_factory) -> dict[bool, Path]:
    model, calib = base
    d = tmp_path_factory.mktemp("int3")
    return {
        on: dq.quantize(dq.DownstreamConfig(str(model), str(calib), str(d / f"on{on}"), "int3-g128", on))
        for on in (True, False)
    }


def _levels_per_group(w: torch.Tensor, group: int) -> int:
    """Most distinct values in one group of a [..., in] weight (<= 2**bits when it lies on an int grid)."""
    g = w.reshape(-1, w.shape[-1] // group if w.shape[-1] >= group else 1, min(group, w.shape[-1]))
    return max(torch.unique(x).numel() for x in g.reshape(-1, g.shape[-1])[:64])


def test_all_experts_on_and_off_quantize_differently_on_the_int3_grid(int3) -> None:
    from pascal_moe.models.loading import load_model

    metas = {on: json.loads((q / "quantize.json").read_text()) for on, q in int3.items()}
    assert metas[True]["method"] == "llmc-gptq" and metas[False]["method"] == "llmc-gptq-noall"
    assert metas[True]["moe_calibrate_all_experts"] is True and metas[False]["moe_calibrate_all_experts"] is False
    assert metas[True]["calib"]["samples"] == 8 and metas[True]["calib"]["tokens"] == 256
    assert metas[True]["reloaded_with"].startswith("compressed-tensors per module")  # 64-wide down_proj, g128 gate/up
    ms = {on: load_model(str(q), "cpu", "float32") for on, q in int3.items()}
    ex = [m.model.layers[1].mlp.experts for m in ms.values()]
    assert _levels_per_group(ex[0].down_proj, 64) <= 8 and _levels_per_group(ex[0].gate_up_proj, 128) <= 8
    assert not torch.equal(ex[0].down_proj, ex[1].down_proj)  # every token through every expert changes GPTQ


def test_int2_reload_through_transformers_matches_per_module_decompression(base, tmp_path) -> None:
    model, calib = base
    q = dq.quantize(dq.DownstreamConfig(str(model), str(calib), str(tmp_path / "q2"), "int2-g64", True))
    assert json.loads((q / "quantize.json").read_text())["reloaded_with"] == "transformers+compressed-tensors"
    from pascal_moe.models.loading import load_model

    native = load_model(str(q), "cpu", "float32")
    manual = dq._decompress_per_module(q / "compressed", str(model))
    a, b = native.state_dict(), manual.state_dict()
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert _levels_per_group(native.model.layers[0].mlp.experts.down_proj, 64) <= 4


def test_pascal_eval_reads_the_reloaded_model(base, int3, tmp_path) -> None:
    from pascal_moe.evaluate.config import EvalConfig
    from pascal_moe.evaluate.run import run

    model, _ = base
    out = run(
        EvalConfig(
            model=str(model),
            out=str(tmp_path / "eval"),
            quantized=[str(int3[True])],
            max_tokens=512,
            seq_len=64,
            generate_tokens=0,
            domains="code,math",
        )
    )
    meta = json.loads((out / "eval.json").read_text())
    q = meta["summary"][1]
    assert (q["method"], q["scheme"]) == ("llmc-gptq", "int3-g128") and q["kl"] > 0 and 0 < q["jaccard"] <= 1
    assert {r["domain"] for r in meta["domains"]} == {"code", "math"}


def test_bad_inputs_are_one_line(base, tmp_path) -> None:
    model, _ = base
    plain = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": ["a b c"]}), plain)
    with pytest.raises(PascalError, match="no input_ids column"):
        dq.quantize(dq.DownstreamConfig(str(model), str(plain), str(tmp_path / "q"), "int3-g128"))
    with pytest.raises(PascalError, match="unknown --scheme"):
        dq.quantize(dq.DownstreamConfig(str(model), str(plain), str(tmp_path / "q"), "int5-g7"))
