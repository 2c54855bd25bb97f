"""`pascal quantize` end to end on tiny random MoEs: grids, export/reload, fallback experts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import sha256_file
from pascal_moe.quant import run as qrun
from pascal_moe.quant.blocks import TensorCache
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.export import decompress_state_dict
from pascal_moe.quant.schemes import (
    FP4_GRID,
    fake_quantize,
    int_codes,
    int_scale,
    nvfp4_scales,
    parse_scheme,
    to_groups,
)


@pytest.fixture
def calib(text_calib) -> Path:
    return text_calib(8)


def cfg(model: Path, calib: Path, out: Path, **kw) -> QuantizeConfig:
    base = dict(
        model=str(model),
        calib=str(calib),
        out=str(out),
        scheme="int4-g32",
        method="vsraq",
        iters=3,
        tokens=256,
        seq_len=32,
        batch_size=4,
        min_expert_tokens=4,
        device="cpu",
    )
    return QuantizeConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("name", ["int4-g128", "int3-g128", "int2-g64", "int4-g32", "int2-g64-full", "int3-g32-full"])
def test_int_weights_exactly_on_grid(name: str) -> None:
    torch.manual_seed(0)
    s = parse_scheme(name)
    w = torch.randn(24, 200)  # a ragged last group when 200 % gs != 0
    g, _ = to_groups(w, 1, s.group_size)
    v = torch.rand_like(g) - 0.5
    a, b = torch.rand(g.shape[0], g.shape[1], 1) * 0.5 + 0.5, torch.rand(g.shape[0], g.shape[1], 1) * 0.5 + 0.5
    deq = fake_quantize(w, s, 1, v, a, b)
    scale = int_scale(g, s, a, b)  # [R, G, 1]
    codes = to_groups(deq, 1, s.group_size)[0] / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= s.qmin and codes.round().max() <= s.qmax
    ic = int_codes(w, s, v, a, b)
    assert torch.equal(ic.q.float() * ic.scale.repeat_interleave(s.group_size, 1)[:, :200], deq)


@pytest.mark.parametrize("ct_name", ["int2-g64", "int3-g128"])
def test_full_grid_has_less_rtn_error_and_keeps_codes_in_range(ct_name: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 512) * torch.rand(64, 1)  # rows of different spread
    ct, full = parse_scheme(ct_name), parse_scheme(ct_name + "-full")
    assert (ct.grid, full.grid, full.name, (full.qmin, full.qmax)) == (
        "ct",
        "full",
        ct_name + "-full",
        (ct.qmin, ct.qmax),
    )
    err = {s.grid: float(((fake_quantize(w, s, 1) - w) ** 2).sum() / (w**2).sum()) for s in (ct, full)}
    assert err["full"] < 0.85 * err["ct"]  # measured on this tensor: 0.60x at int2, 0.76x at int3
    ic = int_codes(w, full)
    assert int(ic.q.min()) == full.qmin and int(ic.q.max()) <= full.qmax
    g, _ = to_groups(w, 1, full.group_size)
    larger = torch.where(g.amax(-1) >= -g.amin(-1), g.amax(-1), g.amin(-1))  # [R, G] the group's extreme weight
    assert torch.equal(ic.scale * full.qmin, larger)  # it is exactly on the grid, at the extra level qmin
    assert (ic.scale < 0).any() and (ic.scale > 0).any()


def test_full_grid_matches_auto_round_int_sym() -> None:
    int_sym = pytest.importorskip("auto_round.data_type.int").quant_tensor_sym
    torch.manual_seed(2)
    w, a, b = torch.randn(16, 256), torch.rand(16, 4) * 0.5 + 0.5, torch.rand(16, 4) * 0.5 + 0.5
    flat = dict(min_scale=b.reshape(-1), max_scale=a.reshape(-1))  # the library works on [R * G, gs] rows
    lib = int_sym(w, bits=2, group_size=64, scale_dtype=torch.float32, **flat)[0]
    ours = fake_quantize(w, parse_scheme("int2-g64-full"), 1, alpha=a.unsqueeze(-1), beta=b.unsqueeze(-1))
    assert torch.equal(ours, lib)


def test_nvfp4_weights_on_e2m1_grid_with_fp8_scales() -> None:
    torch.manual_seed(0)
    s = parse_scheme("nvfp4")
    w = torch.randn(8, 64) * 3
    deq = fake_quantize(w, s, 1)
    g, _ = to_groups(w, 1, 16)
    block, gscale = nvfp4_scales(g, w.abs().amax())
    assert torch.equal(block, block.to(torch.float8_e4m3fn).float())  # block scales FP8-representable
    vals = (to_groups(deq, 1, 16)[0] / (block * gscale)).abs()
    nearest = (vals.unsqueeze(-1) - FP4_GRID).abs().min(-1).values
    assert nearest.max() < 1e-5


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["rtn", "autoround", "vsraq"])
def test_run_reloads_and_matches(method: str, tiny_moe_dir, calib: Path, tmp_path: Path, captured: dict) -> None:
    from transformers import AutoModelForCausalLM

    out = qrun.run(cfg(tiny_moe_dir("qwen3_moe"), calib, tmp_path / "q", method=method))
    meta = json.loads((out / "quantize.json").read_text())
    assert meta["method"] == method and meta["export"]["format"] == "pack-quantized"
    assert set(meta["fallback_experts"]) == {"layer0", "layer2"}  # layer 1 is dense in the tiny config
    assert meta["calib_tokens_used"] == 256 and meta["calib_rows_used"] >= 2 and len(meta["blocks"]) == 3
    moe_blocks = [b for b in meta["blocks"] if b["moe"]]
    if method == "autoround":  # lambda = 0: the router terms never enter
        assert all(b["router_first"] == 0.0 and b["loss_first"] == b["recon_first"] for b in moe_blocks)
    if method == "vsraq":
        assert all(b["router_first"] > 0.0 and b["loss_first"] > b["recon_first"] for b in moe_blocks)
    mine = captured["model"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(mine(ids).logits, reloaded(ids).logits, atol=1e-5)
    # compressed-tensors' own decompressor gives back our weights bit for bit
    dec = decompress_state_dict(out)
    q_proj = mine.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(dec["model.layers.0.self_attn.q_proj.weight"].float(), q_proj)
    gate_up = mine.model.layers[2].mlp.experts.gate_up_proj  # [E, 2I, H]
    inter = gate_up.shape[1] // 2
    assert torch.equal(dec["model.layers.2.mlp.experts.3.up_proj.weight"].float(), gate_up[3, inter:])
    router = reloaded.model.layers[0].mlp.gate.weight
    assert router.dtype == torch.float32 and torch.equal(router, mine.model.layers[0].mlp.gate.weight)
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])  # the model card the hub reads
    assert "base_model" not in front  # a local directory is no hub id: named under pascal_moe instead
    assert front["library_name"] == "transformers" and {method, "int4-g32", "compressed-tensors"} <= set(front["tags"])
    p = front["pascal_moe"]
    assert (p["scheme"], p["method"], p["base_model_fingerprint"]) == (
        meta["scheme"],
        method,
        meta["model_fingerprint"],
    )
    assert p["calibration"]["sha256"] == meta["calib"]["sha256"] == sha256_file(calib)


def test_full_grid_exports_negative_scales_that_reload_exactly(text_calib, tmp_path: Path, captured: dict) -> None:
    """The bundled model at int2-g64-full: codes in range, negative scales packed, reloaded bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = Path(__file__).resolve().parents[1] / "data" / "models" / "qwen3-moe-tiny"
    out = qrun.run(
        cfg(src, text_calib(8), tmp_path / "q", scheme="int2-g64-full", method="autoround", iters=2, tokens=128)
    )
    meta = json.loads((out / "quantize.json").read_text())
    assert (meta["scheme"], meta["grid"], meta["export"]["format"]) == ("int2-g64-full", "full", "pack-quantized")
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["pascal_moe"]["grid"] == "full" and "int2-g64-full" in front["tags"]
    sd = load_file(out / "model.safetensors")
    scale = sd["model.layers.1.mlp.experts.5.down_proj.weight_scale"]
    assert (scale < 0).any() and (scale > 0).any()
    mine, dec = captured["model"], decompress_state_dict(out)
    down = mine.model.layers[1].mlp.experts.down_proj  # [E, H, I]
    assert torch.equal(dec["model.layers.1.mlp.experts.5.down_proj.weight"].float(), down[5])
    codes = dec["model.layers.1.mlp.experts.5.down_proj.weight"].float() / scale.repeat_interleave(64, 1)
    assert torch.equal(codes, codes.round()) and codes.min() == -2 and codes.max() <= 1
    q_proj = mine.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(dec["model.layers.0.self_attn.q_proj.weight"].float(), q_proj)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(reloaded.model.layers[1].mlp.experts.down_proj, down)
    ids = torch.randint(2, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(mine(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_model_card_links_a_hub_base_model() -> None:
    from pascal_moe.quant.card import model_card

    meta = {
        "scheme": "int4-g128",
        "method": "vsraq",
        "model_fingerprint": "f" * 8,
        "export": {"format": "fake-quantized", "reason": "nvfp4"},
        "calib": {"path": "runs/x/calib/calib.parquet", "sha256": "c" * 64, "tokens": 9},
    }
    card = model_card(meta, "Qwen/Qwen3-30B-A3B")
    front = yaml.safe_load(card.split("---\n")[1])
    assert (front["base_model"], front["base_model_relation"]) == ("Qwen/Qwen3-30B-A3B", "quantized")
    assert "compressed-tensors" not in front["tags"] and "c" * 64 in card and "runs/x/calib/calib.parquet" in card


def test_vsraq_deepseek_downstream_selective(tiny_moe_dir, calib: Path, tmp_path: Path, captured: dict) -> None:
    from transformers import AutoModelForCausalLM

    # num_key_value_heads = num_attention_heads as in real DeepSeek-V3: the shared tiny config's 2 kv heads
    # break MLA attention as soon as a batch is padded (repeat_kv doubles the 4 expanded heads)
    out = qrun.run(
        cfg(
            tiny_moe_dir("deepseek_v3", num_key_value_heads=4),
            calib,
            tmp_path / "q",
            downstream_router=True,
            selective_tokens=True,
        )
    )
    meta = json.loads((out / "quantize.json").read_text())
    assert 0.0 < meta["selected_share_mean"] <= 1.0
    dense = meta["blocks"][0]  # dense block: downstream term only
    assert dense["moe"] is False and dense["router_first"] == 0 and dense["downstream_first"] > 0
    assert "model.layers.0.self_attn.kv_b_proj" in meta["export"]["dequantized_on_grid"]  # 16 cols < group 32
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 4000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(captured["model"](ids).logits, reloaded(ids).logits, atol=1e-5)


def test_fallback_experts_are_plain_rtn(tiny_moe_dir, calib: Path, tmp_path: Path, captured: dict) -> None:
    from transformers import AutoModelForCausalLM

    src = tiny_moe_dir("qwen3_moe")
    fp = AutoModelForCausalLM.from_pretrained(src)
    out = qrun.run(cfg(src, calib, tmp_path / "q", method="autoround", min_expert_tokens=10**6))
    meta = json.loads((out / "quantize.json").read_text())
    assert meta["fallback_experts"] == {"layer0": 8, "layer2": 8}
    s = parse_scheme("int4-g32")
    for li in (0, 2):
        rtn = fake_quantize(fp.model.layers[li].mlp.experts.down_proj.detach(), s, 2)
        assert torch.equal(captured["model"].model.layers[li].mlp.experts.down_proj, rtn)
    assert all(len(b["expert_tokens"]) == 8 for b in meta["blocks"] if b["moe"])


def test_nvfp4_path_runs(tiny_moe_dir, calib: Path, tmp_path: Path, captured: dict) -> None:
    from transformers import AutoModelForCausalLM

    out = qrun.run(cfg(tiny_moe_dir("qwen3_moe"), calib, tmp_path / "q", scheme="nvfp4", method="topk", iters=2))
    meta = json.loads((out / "quantize.json").read_text())
    assert meta["export"]["format"] == "fake-quantized" and "reason" in meta["export"]
    w = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.experts.gate_up_proj.detach()
    assert torch.equal(w, captured["model"].model.layers[0].mlp.experts.gate_up_proj)
    assert torch.equal(fake_quantize(w, parse_scheme("nvfp4"), 2), w)  # on the grid: re-quantizing is a no-op


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, match",
    [
        ({"method": "gptq"}, "unknown --method"),
        ({"scheme": "int9-g7"}, "unknown scheme"),
        ({"calib": "/nonexistent/calib.parquet"}, "not found"),
        ({"lr": "fast"}, "--lr must be"),
    ],
)
def test_bad_input_is_one_line_error(change: dict, match: str, tiny_moe_dir, calib: Path, tmp_path: Path) -> None:
    args = {"calib": calib, **change}
    with pytest.raises(PascalError, match=match) as e:
        qrun.run(cfg(tiny_moe_dir("qwen3_moe"), args.pop("calib"), tmp_path / "q", **args))
    assert "\n" not in str(e.value)


def test_calib_without_text_column(tiny_moe_dir, tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"body": ["x y z"]}).to_parquet(bad)
    with pytest.raises(PascalError, match="neither a text nor an input_ids"):
        qrun.run(cfg(tiny_moe_dir("qwen3_moe"), bad, tmp_path / "q"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(PascalError, match="malformed"):
        qrun.run(cfg(tiny_moe_dir("qwen3_moe"), tmp_path / "junk.parquet", tmp_path / "q"))


def test_tensor_cache_spills_to_disk() -> None:
    cache = TensorCache(limit_bytes=0)
    x = torch.randn(2, 3, 4)
    cache.append(x)
    assert cache.spilled == 1 and torch.equal(cache[0], x)
    cache[0] = x * 2
    assert torch.equal(cache[0], x * 2)
    cache.close()
