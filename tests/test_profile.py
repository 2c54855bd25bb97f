"""`pascal profile`: exact counts, the block's real selection, padding, sensitivity, errors, no leaked hooks.

Models: the bundled trained MoEs when their weights exist, else tiny random ones
built from configs with the bundled tokenizers (same architectures and routing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pascal_moe.errors import PascalError
from pascal_moe.io.batches import tokenize
from pascal_moe.io.texts import load_texts
from pascal_moe.models import moe_layers
from pascal_moe.models.base import router_logits, select
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.capture import capture_routing, expert_totals, forward, iter_batches, route_counts, routed_batch
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.profile.run import collect, profile_texts, run
from pascal_moe.profile.sensitivity import EDGES, MarginStats, expert_mlp, fused_pair

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = {"qwen": ROOT / "data/models/qwen3-moe-tiny", "deepseek": ROOT / "data/models/deepseek-v3-tiny"}
ENV = {"qwen": "PASCAL_TEST_QWEN_DIR", "deepseek": "PASCAL_TEST_DEEPSEEK_DIR"}  # as in conftest.py
SEQ = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread_module):
    """2 shared cores: one intra-op thread for every test and module fixture here (see conftest)."""


def _tiny_config(arch: str):
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=4096,
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    if arch == "qwen":
        return Qwen3MoeConfig(
            **common,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    return DeepseekV3Config(
        **common,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )


@pytest.fixture(scope="module", params=["qwen", "deepseek"])
def model_dir(request, tmp_path_factory) -> Path:
    """The bundled trained model if present, else a tiny random one of the same architecture."""
    src = Path(os.environ.get(ENV[request.param]) or BUNDLED[request.param])
    if (src / "model.safetensors").exists():
        return src
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(_tiny_config(request.param)).save_pretrained(d)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir), "cpu"), load_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    ts = load_texts(None, max_samples=400, split="train").texts
    return [t[: 40 + 37 * i] for i, t in enumerate(ts[::40][:10])]  # unequal lengths, some below SEQ tokens


def _cfg(out: Path, **kw) -> ProfileConfig:
    return ProfileConfig(
        model="test", out=str(out), seq_len=SEQ, batch_size=4, min_token_count=1, top_triggers=5, contexts=2, **kw
    )


def _block_indices(model, tokenizer, texts: list[str]) -> list[list[torch.Tensor]]:
    """Independent routing: the top_k_index each experts module actually receives, one text per forward."""
    layers = moe_layers(model)
    got: list[list[torch.Tensor]] = []
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.block.experts.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[1].clone()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for ids in tokenize(texts, tokenizer, SEQ):
                seen.clear()
                model(input_ids=torch.tensor([ids]), use_cache=False)
                got.append([seen[i] for i in range(len(layers))])  # L x [n, k]
    finally:
        for h in hooks:
            h.remove()
    return got


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_counts_exact_and_padding_free(loaded, texts, tmp_path):
    model, tok = loaded
    layers = moe_layers(model)
    L, E, k = len(layers), layers[0].spec.n_experts, layers[0].spec.top_k
    out = profile_texts(model, tok, texts, tmp_path / "p", cfg=_cfg(tmp_path / "p"), progress=False)
    experts = pd.read_parquet(out / "experts.parquet")
    samples = pd.read_parquet(out / "samples.parquet")
    n_tok = [len(ids) for ids in tokenize(texts, tok, SEQ)]
    assert len(set(n_tok)) > 3 and samples.n_tokens.tolist() == n_tok  # unequal lengths, padding not counted
    per_layer = experts.groupby("layer").tokens.sum()
    assert (per_layer == sum(n_tok) * k).all()
    assert np.allclose(experts.groupby("layer").share.sum(), 1.0)
    # independent recomputation: one text per forward (no padding), indices the experts module received
    block = _block_indices(model, tok, texts)
    expect = np.zeros((L, E), np.int64)
    for s, per in enumerate(block):
        dense = np.zeros(L * E, np.int64)
        for li, idx in enumerate(per):
            dense[li * E : (li + 1) * E] = np.bincount(idx.reshape(-1).numpy(), minlength=E)
        expect += dense.reshape(L, E)
        row = samples.iloc[s]
        assert row["keys"].tolist() == np.flatnonzero(dense).tolist()
        assert row["counts"].tolist() == dense[dense > 0].tolist()
    assert (experts.tokens.to_numpy().reshape(L, E) == expect).all()
    # trigger lift recomputed from the independent routing
    trig = pd.read_parquet(out / "triggers.parquet")
    t = trig[(trig.kind == "token") & (trig.layer == L - 1)].iloc[0]
    ids = torch.tensor([i for ids in tokenize(texts, tok, SEQ) for i in ids])
    idx = torch.cat([per[L - 1] for per in block])  # [N, k]
    occ = ids == int(t.token_id)
    hit = (idx[occ] == int(t.expert)).any(-1).sum().item()
    base = expect[L - 1, int(t.expert)] / sum(n_tok)
    assert hit == t["count"] and np.isclose(t.lift, hit / occ.sum().item() / base)
    assert _hooks(model) == 0
    # route_counts gives the same per-sample counts
    rc = route_counts(model, tok, texts, SEQ, batch_size=3)
    assert [r.n_tokens for r in rc] == n_tok and all((r.keys == s).all() for r, s in zip(rc, samples["keys"]))
    empty, one = route_counts(model, tok, ["", texts[0]], SEQ)
    assert empty.n_tokens == 0 and len(empty.keys) == 0 and one.counts.tolist() == samples["counts"][0].tolist()
    # expert_totals (eval's calibration coverage) gives the same [L, E] totals
    assert (expert_totals(model, tokenize(texts, tok, SEQ), batch_size=3).numpy() == expect).all()


def test_schema_and_report(loaded, texts, tmp_path):
    model, tok = loaded
    out = profile_texts(model, tok, texts, tmp_path / "p", cfg=_cfg(tmp_path / "p"), source="synthetic", progress=False)
    assert pd.read_parquet(out / "samples.parquet").source.unique().tolist() == ["synthetic"]
    meta = json.loads((out / "profile.json").read_text())
    for key in (
        "model",
        "model_fingerprint",
        "tokenizer",
        "data",
        "data_fingerprint",
        "settings",
        "versions",
        "n_layers",
        "layer_indices",
        "n_experts",
        "top_k",
        "routing",
        "seq_len",
        "scheme",
        "totals",
        "layer_jaccard",
    ):
        assert key in meta
    assert len(meta["layer_jaccard"]) == meta["n_layers"] and all(0 < j <= 1 for j in meta["layer_jaccard"])
    experts = pd.read_parquet(out / "experts.parquet")
    assert list(experts.columns) == [
        "layer",
        "layer_index",
        "expert",
        "tokens",
        "share",
        "weight_mass",
        "boundary_tokens",
        "margin_mean",
        "margin_p10",
        "margin_p50",
        "weight_error",
        "reroute_rate",
        "sensitivity",
    ]
    assert experts.sensitivity.between(0, 1).all() and experts.sensitivity.nunique() > 5
    # each token has exactly one k-th and one (k+1)-th choice (when the (k+1)-th is not group-masked)
    assert (experts.groupby("layer").boundary_tokens.sum() <= 2 * meta["totals"]["tokens"]).all()
    assert experts.boundary_tokens.sum() > meta["totals"]["tokens"]
    b = experts[experts.boundary_tokens > 0]
    assert (b.margin_p10 <= b.margin_p50 + 1e-12).all() and (b.margin_mean > 0).all()
    schema = pq.read_schema(out / "samples.parquet")
    assert all(str(schema.field(c).type.value_type) == "int32" for c in ("keys", "counts"))
    trig = pd.read_parquet(out / "triggers.parquet")
    assert list(trig.columns) == [
        "layer",
        "expert",
        "kind",
        "rank",
        "token_id",
        "token",
        "count",
        "lift",
        "context",
        "weight",
    ]
    ctx = trig[trig.kind == "context"]
    assert len(ctx) > 0 and ctx.context.str.contains(r"\[\[[\s\S]+\]\]", regex=True).all()
    for f in ("report.md", "share_heatmap.png", "sensitivity_heatmap.png", "jaccard.png"):
        assert (out / f).stat().st_size > 100
    assert not list(out.glob(".*tmp"))


def test_selection_equals_block_with_deepseek_bias(loaded, texts):
    model, tok = loaded
    layers = moe_layers(model)
    gens = torch.Generator().manual_seed(1)
    saved = [getattr(layer.router, "e_score_correction_bias", None) for layer in layers]
    saved = [b.clone() if b is not None else None for b in saved]
    try:
        for layer in layers:
            if saved[0] is not None:  # make the bias decide: comparable to the sigmoid score spread
                layer.router.e_score_correction_bias.copy_(torch.randn(layer.spec.n_experts, generator=gens) * 0.05)
        got, logits = [], []  # the block's chosen indices and the router logits of each layer

        def keep(_m, _a, o):
            got.append(o[2])
            logits.append(router_logits(o))

        hooks = [layer.router.register_forward_hook(keep) for layer in layers]
        _, it = iter_batches(tok, texts, SEQ, 4)
        differs = 0
        with torch.no_grad(), capture_routing(model, layers) as rec:
            for batch in it:
                rec.clear()
                got.clear()
                logits.clear()
                forward(model, batch)
                rb = routed_batch(batch, rec, layers)
                real = batch.attention_mask.reshape(-1).bool()
                for li, layer in enumerate(layers):
                    block_idx = got[li][real].sort(-1).values  # what the block's experts receive
                    assert torch.equal(rb.indices[li].sort(-1).values, block_idx)
                    if layer.spec.kind == "sigmoid":
                        unbiased = replace(layer.spec, bias=None)
                        differs += (select(logits[li][real], unbiased)[1].sort(-1).values != block_idx).any(-1).sum()
        for h in hooks:
            h.remove()
        if saved[0] is not None:
            assert differs > 0  # the bias changed the selection, and we still matched the block
    finally:
        for layer, b in zip(layers, saved):
            if b is not None:
                layer.router.e_score_correction_bias.copy_(b)
    assert _hooks(model) == 0


def test_expert_mlp_matches_module(loaded):
    from transformers.activations import ACT2FN

    model, _ = loaded
    torch.manual_seed(0)
    for layer in moe_layers(model):
        gu, dn = fused_pair(layer)
        x = torch.randn(5, gu.shape[-1])
        e = 3
        assert type(layer.block.experts.act_fn) is type(ACT2FN[model.config.hidden_act])
        ref = layer.block.experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        assert torch.allclose(expert_mlp(x, gu[e], dn[e], layer.block.experts.act_fn), ref, atol=1e-5)
        batched = expert_mlp(x.expand(gu.shape[0], 5, -1), gu, dn, layer.block.experts.act_fn)  # [E, 5, H]
        assert torch.allclose(batched[e], ref, atol=1e-5)


def test_int2_more_sensitive_than_int4(loaded, texts, tmp_path):
    model, tok = loaded
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = {
        s: collect(model, tok, texts, _cfg(tmp_path, scheme=s, weight_error_tokens=0), progress=False)
        for s in ("int4-g128", "int2-g64")
    }
    w4, w2 = (np.nanmean(res[s].weight_error) for s in ("int4-g128", "int2-g64"))
    r4, r2 = (np.mean(res[s].layer_reroute) for s in ("int4-g128", "int2-g64"))
    assert 0 < w4 < w2 and 0 < r4 < r2
    assert np.mean(res["int2-g64"].layer_jaccard) < np.mean(res["int4-g128"].layer_jaccard)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights restored
    assert _hooks(model) == 0


def test_margin_quantiles_from_histogram():
    rng = np.random.default_rng(0)
    gaps = rng.lognormal(-3, 1, 5000)
    ms = MarginStats(1, 2)
    b = np.searchsorted(EDGES[1:], gaps, side="right")
    ms.hist[0, : len(EDGES)] = torch.tensor(np.bincount(b, minlength=len(EDGES)), dtype=torch.float64)
    for q, col in ((0.1, 0), (0.5, 0)):
        assert np.isclose(ms.quantile(q)[0, col], np.quantile(gaps, q), rtol=0.08)
    assert np.isnan(ms.quantile(0.5)[0, 1])


def test_interrupt_leaves_no_file_and_no_hook(loaded, texts, tmp_path, monkeypatch):
    model, tok = loaded
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    import pascal_moe.profile.accumulate as prun  # the pass loop lives there (run.py only writes)

    calls = {"n": 0}
    real = prun.forward

    def interrupted(*a, **kw):
        calls["n"] += 1
        real(*a, **kw)
        if calls["n"] == 4:  # Ctrl-C right after the quantized forward of batch 2, with RTN weights swapped in
            assert any(p.data_ptr() != before[n] for n, p in model.named_parameters())
            raise KeyboardInterrupt

    monkeypatch.setattr(prun, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile_texts(model, tok, texts, tmp_path / "p", cfg=_cfg(tmp_path / "p"), progress=False)
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    assert _hooks(model) == 0 and {n: p.data_ptr() for n, p in model.named_parameters()} == before


def test_user_errors_are_one_line(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    other = tmp_path / "d.jsonl"
    other.write_text('{"content": "hello world"}\n')
    cfg = ProfileConfig(model=str(model_dir), out=str(tmp_path / "o"), seq_len=16, max_samples=2, device="cpu")
    cases = [
        replace(cfg, data=str(empty)),
        replace(cfg, data=str(other)),
        replace(cfg, data=str(tmp_path / "no.txt")),
        replace(cfg, data=str(other), text_column="content", seq_len=100_000),
        replace(cfg, data=str(other), text_column="content", scheme="int9"),
        replace(cfg, model=str(tmp_path)),
    ]
    for c in cases:
        with pytest.raises(PascalError) as e:
            run(c)
        assert "\n" not in str(e.value) and len(str(e.value)) < 300
    assert not (tmp_path / "o").exists()


def test_dense_or_unsupported_model_is_rejected(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    c = _tiny_config("qwen")
    dense = Qwen3MoeConfig(**{**c.to_dict(), "mlp_only_layers": [0, 1, 2]})
    llama = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        pad_token_id=1,
    )
    d = tmp_path / "d.txt"
    d.write_text("some text here\n\nmore text")
    for name, conf, msg in (("dense", dense, "no MoE layers"), ("llama", llama, "unsupported architecture")):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / name)
        for f in BUNDLED["qwen"].glob("tokenizer*"):
            shutil.copy(f, tmp_path / name / f.name)
        with pytest.raises(PascalError, match=msg):
            run(
                ProfileConfig(
                    model=str(tmp_path / name), out=str(tmp_path / "o"), data=str(d), seq_len=16, device="cpu"
                )
            )
    assert not (tmp_path / "o").exists()


def test_cli_exit_code_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pascal_moe.cli",
            "profile",
            "--model",
            str(tmp_path),
            "--data",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "data not found" in lines[0]
