"""Downstream quantizers consume the calibration set for real, and see every token we selected.

Each consumer runs the bundled softmax MoE (a tiny random Qwen3-MoE with the same tokenizer until the
trained weights exist) with a hook on the token embedding that records every sequence it is fed; the
test compares those sequences with ours (llm-compressor: the calib.parquet rows; AutoRound: the packed
export rows), so a dropped, truncated or padded sample fails the test.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pascal_moe.balance.config import BalanceConfig, ExportConfig
from pascal_moe.balance.export import autoround_dataset, join_short, pack
from pascal_moe.balance.export import run as export_run
from test_balance import write_fake_profile
from test_build_calib import tiny_model

SEQ_LEN = 48


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A balanced set written by `pascal balance` (fake routing, real seed text and bundled tokenizer)."""
    from pascal_moe.balance.run import run

    d = tmp_path_factory.mktemp("calib")
    prof, syn = write_fake_profile(d, n_seed=80, n_synth=30)
    run(
        BalanceConfig(
            profile=str(prof),
            out=str(d / "out"),
            candidates=[str(syn)],
            tokens=12 * SEQ_LEN,
            seq_len=SEQ_LEN,
            min_tokens_per_expert=4,
        )
    )
    return d / "out"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@contextmanager
def seen_sequences(model):
    """Record every row of input ids the model's embedding receives (pads excluded)."""
    seen: Counter = Counter()
    pad = model.config.pad_token_id

    def hook(_mod, args, _out):
        for row in args[0].reshape(-1, args[0].shape[-1]).tolist():
            seen[tuple(t for t in row if t != pad)] += 1

    h = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield seen
    finally:
        h.remove()


def _same_multiset(seen: Counter, ours: list[list[int]]) -> int:
    """seen == passes x ours for one integer `passes` >= 1 (a quantizer may replay its data); returns passes."""
    want = Counter(tuple(r) for r in ours)
    passes = {seen[k] / v for k, v in want.items()}
    assert set(seen) == set(want), f"{len(set(want) - set(seen))} of our rows never reached the model"
    assert len(passes) == 1 and next(iter(passes)).is_integer() and next(iter(passes)) >= 1, passes
    return int(next(iter(passes)))


def test_pack_and_join_keep_every_token():
    ids = [[5, 6, 7], [8] * 9, [9, 10], list(range(20, 40))]
    ex = pack(ids, 8, sep_id=0)
    assert all(len(r) == 8 for r in ex.rows)
    flat = [t for r in ex.rows for t in r]
    assert ex.tokens_out == len(flat) == ex.tokens_in + ex.separators + ex.wrapped
    stream = [5, 6, 7, 0, *[8] * 9, 0, 9, 10, 0, *range(20, 40)]
    assert flat[: len(stream)] == stream and flat[len(stream) :] == stream[: ex.wrapped]
    j = join_short(ids, 11, sep_id=0)
    assert all(len(r) >= 11 for r in j.rows) and j.joined == 2
    assert sorted(t for r in j.rows for t in r if t != 0) == sorted(t for r in ids for t in r if t != 0)


def test_export_formats_and_hf_datasets_load(calib, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(calib / "calib.parquet"), split="train")
    for fmt in ("llmcompressor", "autoround", "gptqmodel", "jsonl"):
        path = export_run(ExportConfig(calib=str(calib), format=fmt, out=str(tmp_path / fmt)))
        info = json.loads((path.parent / "export.json").read_text())
        assert info["tokens_in"] == sum(ds["n_tokens"]) and info["samples"] == len(ds)
        if fmt == "llmcompressor":
            assert load_dataset("parquet", data_files=str(path), split="train")["input_ids"] == ds["input_ids"]
        if fmt == "autoround":
            assert {len(r["input_ids"][0]) for r in autoround_dataset(path)} == {max(ds["n_tokens"])}
        if fmt == "jsonl":
            assert [json.loads(x)["text"] for x in path.read_text().splitlines()] == ds["text"]


def gptq_w4a16(model_dir: Path, ds, seq_len: int, out: Path) -> Counter:
    """llm-compressor GPTQ W4A16 on `ds` (an HF dataset with input_ids); saves to `out`; returns the rows it ran."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # W4A16 (int4 symmetric weights, 16-bit activations) with groups of 64, not the preset's 128: the bundled
    # model's expert width (moe_intermediate_size 192) is not a multiple of 128, and llm-compressor refuses that.
    w4 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=w4)},
        ignore=["lm_head", "re:.*mlp.gate$"],
    )
    with seen_sequences(model) as seen:
        oneshot(
            model=model,
            processor=AutoTokenizer.from_pretrained(model_dir),
            recipe=recipe,
            dataset=ds.select_columns(["input_ids"]),
            num_calibration_samples=len(ds),
            max_seq_length=seq_len,
            batch_size=1,
        )
    assert any(n.endswith("weight_scale") and "experts" in n for n, _ in model.named_parameters()), (
        "no expert Linear was quantized"
    )
    model.save_pretrained(out, save_compressed=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    return seen


def test_llmcompressor_oneshot_gptq_w4a16_sees_every_token(calib, model_dir, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(calib / "calib.parquet"), split="train")
    seen = gptq_w4a16(model_dir, ds, SEQ_LEN, tmp_path / "q")
    passes = _same_multiset(seen, ds["input_ids"])
    assert sum(len(k) * v for k, v in seen.items()) == passes * sum(ds["n_tokens"])  # tokens used = ours


def test_autoround_consumes_the_packed_export(calib, model_dir, tmp_path):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = export_run(ExportConfig(calib=str(calib), format="autoround", out=str(tmp_path / "ar")))
    info = json.loads((path.parent / "export.json").read_text())
    rows = autoround_dataset(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with seen_sequences(model) as seen:
        ar = AutoRound(
            model,
            tok,
            scheme="W4A16",
            dataset=rows,
            seqlen=info["seq_len"],
            nsamples=len(rows),
            iters=1,
            batch_size=1,
            enable_torch_compile=False,
            device_map="cpu",
        )
        ar.quantize()
    packed = [r["input_ids"][0].tolist() for r in rows]
    _same_multiset(seen, [[t for t in r if t != model.config.pad_token_id] for r in packed])
    assert info["tokens_out"] == len(packed) * info["seq_len"] >= info["tokens_in"]


def test_pascal_quantize_consumes_calib(calib, model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("pascal_moe.quant.run") is None:
        pytest.skip("pascal_moe.quant.run (pascal quantize) is not built yet")
    import pandas as pd

    from pascal_moe.quant.config import QuantizeConfig
    from pascal_moe.quant.run import run as quantize

    df = pd.read_parquet(calib / "calib.parquet")
    quantize(
        QuantizeConfig(
            model=str(model_dir), calib=str(calib), out=str(tmp_path / "q"), method="rtn", seq_len=SEQ_LEN, iters=1
        )
    )
    used = json.loads((tmp_path / "q" / "quantize.json").read_text())["calib"]
    assert used["samples"] == len(df) and used["tokens"] == int(df["n_tokens"].sum())
