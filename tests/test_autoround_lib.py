"""benchmarks/autoround_lib.py: the auto-round library on the bundled Qwen3-MoE, its dense output read by `pascal eval`.

The checks that matter for the evidence matrix: the library quantizes every expert weight (not only the
attention Linears), the written checkpoint loads into transformers' fused experts with values on the
scheme's int grid, and `pascal eval` measures it like any other quantized model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import benchmark_module

from pascal_moe.errors import PascalError

pytestmark = pytest.mark.downstream
ROOT = Path(__file__).resolve().parents[1]


arl = benchmark_module("autoround_lib")


@pytest.fixture(scope="module")
def calib(tmp_path_factory, seed_parquet, qwen_dir) -> Path:
    """calib.parquet: 6 windows of 64 tokens of seed text (EOS-joined), as `pascal balance` writes them."""
    import pandas as pd

    from pascal_moe.models.loading import load_tokenizer

    tok = load_tokenizer(str(qwen_dir))
    texts = pd.read_parquet(seed_parquet, columns=["text"])["text"].head(40).tolist()
    stream = [t for text in texts for t in [*tok(text)["input_ids"], tok.eos_token_id]]
    rows = [stream[i * 64 : (i + 1) * 64] for i in range(6)]
    path = tmp_path_factory.mktemp("arl") / "calib.parquet"
    pq.write_table(
        pa.table(
            {
                "text": [tok.decode(r) for r in rows],
                "n_tokens": pa.array([len(r) for r in rows], pa.int32()),
                "input_ids": pa.array(rows, pa.list_(pa.int32())),
            }
        ),
        path,
    )
    return path


@pytest.fixture(scope="module")
def quantized(calib, qwen_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arlq") / "q"
    return arl.quantize(arl.AutoRoundLibConfig(str(qwen_dir), str(calib), str(out), "int2-g64", iters=2, batch_size=2))


def _grid_codes(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per group of a [..., in] weight: its values divided by the group's smallest non-zero magnitude.

    A symmetric int grid {q * s} makes these integers (up to the fp16 scale's rounding in fp32) whatever
    scale convention the quantizer used; off-grid weights give fractions.
    """
    g = w.reshape(-1, group).float()  # [R * G, gs]
    mag = g.abs().masked_fill(g == 0, float("inf")).amin(-1, keepdim=True)
    return g / mag


def test_library_quantizes_every_expert_onto_the_int2_grid(quantized, qwen_dir) -> None:
    from pascal_moe.models.loading import load_model

    meta = json.loads((quantized / "quantize.json").read_text())
    assert meta["method"] == "autoround-lib" and meta["scheme"] == "int2-g64"
    assert meta["expert_linears"] == 4 * 16 * 3 == meta["expert_linears_quantized"]  # fused experts unfused
    assert meta["unquantized"] == ["lm_head"]  # the router is no Linear here; it stays full precision
    assert meta["grid"]["max_offset"] < 1e-4 and -2 <= meta["grid"]["codes"][0] <= meta["grid"]["codes"][1] <= 1
    assert meta["calib"]["export"]["rows"] == 6 and meta["calib"]["export"]["tokens_in"] == 6 * 64
    q, fp = load_model(str(quantized), "cpu", "float32"), load_model(str(qwen_dir), "cpu", "float32")
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(q.model.layers[1].mlp.experts, name).data  # [E, O, I], transformers' fused layout
        codes = _grid_codes(w, 64)
        assert (codes - codes.round()).abs().max() < 1e-3
        assert max(torch.unique(c).numel() for c in codes.round()) <= 4  # 2 bits: at most 4 levels per group
        assert not torch.allclose(w, getattr(fp.model.layers[1].mlp.experts, name).data)
    assert torch.equal(q.model.layers[1].mlp.gate.weight, fp.model.layers[1].mlp.gate.weight)  # router untouched


def test_pascal_eval_reads_the_library_output(quantized, qwen_dir, tmp_path) -> None:
    from pascal_moe.evaluate.config import EvalConfig
    from pascal_moe.evaluate.run import run

    out = run(
        EvalConfig(
            model=str(qwen_dir),
            out=str(tmp_path / "eval"),
            quantized=[str(quantized)],
            max_tokens=512,
            seq_len=64,
            generate_tokens=0,
            domains="code",
        )
    )
    q = json.loads((out / "eval.json").read_text())["summary"][1]
    assert (q["method"], q["scheme"]) == ("autoround-lib", "int2-g64") and q["kl"] > 0 and 0 < q["jaccard"] < 1


def test_bad_inputs_are_one_line(calib, tmp_path) -> None:
    with pytest.raises(PascalError, match="unknown --scheme"):
        arl.quantize(arl.AutoRoundLibConfig(str(tmp_path), str(calib), str(tmp_path / "q"), "int5-g7"))
    with pytest.raises(PascalError, match="no \\*.safetensors"):
        arl.quantize(arl.AutoRoundLibConfig(str(tmp_path), str(calib), str(tmp_path / "q"), "int2-g64"))
