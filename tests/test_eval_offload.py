"""`pascal eval` with an over-budget quantized model (issue #15): a pack-quantized checkpoint is streamed
block by block (its packed tensors decompressed per block) and gives exactly the whole-model load's logits.

- The bundled qwen3-moe-tiny quantized rtn int4-g64 (pack-quantized) loaded with
  `--max-memory cpu=1MB --offload-dir D` streams every block (dense, no quantization_config) and its
  logits equal transformers' whole-model load of the same checkpoint bit for bit.
- `pascal eval` with and without that budget writes the same metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.evaluate.run import run as evaluate
from pascal_moe.models.loading import load_model
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.run import run as quantize

OFF = {"device": "cpu", "max_memory": "cpu=1MB"}


@pytest.fixture(scope="module")
def packed(qwen_dir, seed_parquet, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    df = pd.read_parquet(seed_parquet, columns=["text", "split"])
    calib = root / "calib.parquet"
    pd.DataFrame({"text": df[df["split"] == "train"]["text"].head(4).tolist()}).to_parquet(calib)
    cfg = QuantizeConfig(
        model=str(qwen_dir), calib=str(calib), out=str(root / "q"), method="rtn", scheme="int4-g64", seq_len=64
    )
    out = quantize(cfg)
    assert json.loads((out / "quantize.json").read_text())["export"]["format"] == "pack-quantized"
    return out


def test_streamed_quantized_logits_equal_whole_load(packed, tmp_path) -> None:
    ids = torch.arange(3, 43).unsqueeze(0)
    whole = load_model(str(packed), "cpu")
    assert getattr(whole.config, "quantization_config", None) is not None  # transformers' own decompression
    off = load_model(str(packed), offload_dir=str(tmp_path / "od"), **OFF)
    layers = off.model.layers
    assert all(next(lay.parameters()).device.type == "meta" for lay in layers)  # every block streamed
    assert getattr(off.config, "quantization_config", None) is None  # a dense model, decompressed per block
    with torch.no_grad():
        a, b = whole(ids).logits, off(ids).logits
    assert torch.equal(a, b)
    assert all(next(lay.parameters()).device.type == "meta" for lay in layers)  # dropped after their forward


def test_eval_metrics_equal_with_offload(qwen_dir, packed, tmp_path) -> None:
    common = dict(
        model=str(qwen_dir),
        quantized=[str(packed)],
        max_tokens=512,
        seq_len=64,
        batch_size=4,
        generate_tokens=4,
        prompts=2,
        prompt_tokens=8,
        device="cpu",
    )
    a = evaluate(EvalConfig(out=str(tmp_path / "a"), **common))
    b = evaluate(EvalConfig(out=str(tmp_path / "b"), offload_dir=str(tmp_path / "od"), max_memory="cpu=1MB", **common))
    pa, pb = pd.read_parquet(a / "eval.parquet"), pd.read_parquet(b / "eval.parquet")
    assert (pa["metric"] == "kl").any() and (pa["value"][pa["metric"] == "kl"] > 0).all()
    pd.testing.assert_frame_equal(pa, pb)
