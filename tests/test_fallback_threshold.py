"""`--fallback-threshold`: GPTQModel's share-of-routed-slots RTN fallback beside the token-count floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pascal_moe.errors import PascalError
from pascal_moe.quant import run as qrun
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.fallback import min_tokens


def test_floor_is_the_larger_of_both_rules() -> None:
    counts = torch.tensor([500, 300, 150, 40, 10])  # 1000 routed slots = 500 tokens at top-2
    assert min_tokens(counts, 8, None, 2) == 8
    assert min_tokens(counts, 8, 0.005, 2) == 8  # 0.005 x 500 = 2.5 < 8
    assert min_tokens(counts, 8, 0.05, 2) == 25  # a share of tokens, not of routed slots
    assert min_tokens(counts, 8, 0.05, 1) == 50
    assert min_tokens(counts, 0, 0.0451, 2) == 23  # ceil(22.55): count < floor <=> count < share x tokens
    assert min_tokens(None, 8, 0.5, 2) == 8  # a dense layer has no experts


def test_quantize_falls_back_on_share(tiny_moe_dir, text_calib, tmp_path: Path) -> None:
    calib = text_calib(8)
    share = 0.24  # just under an expert's uniform share of tokens at top-2 of 8 (0.25): the less-used fall back
    cfg = QuantizeConfig(
        model=str(tiny_moe_dir("qwen3_moe")),
        calib=str(calib),
        out=str(tmp_path / "q"),
        scheme="int4-g32",
        method="autoround",
        iters=1,
        tokens=256,
        seq_len=32,
        batch_size=4,
        min_expert_tokens=0,
        fallback_threshold=share,
        device="cpu",
    )
    meta = json.loads((qrun.run(cfg) / "quantize.json").read_text())
    moe = [b for b in meta["blocks"] if b["moe"]]
    assert moe
    for b in moe:
        total = sum(b["expert_tokens"]) / 2  # calibration tokens of the layer (top-2)
        want = [e for e, c in enumerate(b["expert_tokens"]) if c < share * total]
        assert b["fallback_experts"] == want and 0 < len(want) < 8
        assert b["fallback_floor"] >= share * total
    assert meta["hyperparameters"]["fallback_threshold"] == share


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_threshold_outside_unit_interval_fails_in_one_line(bad: float, tmp_path: Path) -> None:
    cfg = QuantizeConfig(model="nowhere", calib="nowhere", out=str(tmp_path / "q"), fallback_threshold=bad)
    with pytest.raises(PascalError, match="--fallback-threshold"):
        qrun.run(cfg)
