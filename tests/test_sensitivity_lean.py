"""Sensitivity without a model copy: `LayerwiseRTN` gives the same numbers as a full RTN copy of the decoder.

The reference below is the previous implementation kept small: every decoder weight RTN-quantized
up front (a full copy), swapped in by pointer for the whole-model quantized forward, and the
weight error computed from those copies.  The new pass quantizes one decoder layer at a time
inside the forward; both must agree exactly on the bundled qwen3-moe-tiny and deepseek-v3-tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from pascal_moe.io.batches import Batch
from pascal_moe.io.texts import load_texts
from pascal_moe.models import moe_layers
from pascal_moe.models.base import decoder_layers
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.capture import capture_routing, forward, iter_batches, routed_batch
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.profile.run import collect
from pascal_moe.profile.sensitivity import LayerwiseRTN, Reroute, expert_mlp, fused_pair, per_expert_slots
from pascal_moe.quant.schemes import fake_quantize, parse_scheme


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread_module):
    """2 shared cores: one intra-op thread for every test and module fixture here (see conftest)."""


def _full_copy(model: nn.Module, layers, scheme) -> dict[int, tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
    """The old `quantize_weights`: RTN of every decoder Linear except routers plus every expert tensor."""
    routers = {id(layer.router) for layer in layers}
    out: dict[int, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        for et in layer.experts:
            p = et.tensor
            out.setdefault(id(p), (p, p.data, fake_quantize(p.data, scheme, in_dim=et.in_dim)))
    for mod in decoder_layers(model).modules():
        if isinstance(mod, nn.Linear) and id(mod) not in routers:
            out.setdefault(id(mod.weight), (mod.weight, mod.weight.data, fake_quantize(mod.weight.data, scheme, 1)))
    return out


@torch.no_grad()
def _reference(model, tok, texts, cfg: ProfileConfig):
    """Weight error [L, E], reroute rate [L, E] and layer Jaccard the old way (full RTN copy)."""
    layers = moe_layers(model)
    L, E = len(layers), layers[0].spec.n_experts
    qw = _full_copy(model, layers, parse_scheme(cfg.scheme))
    act = layers[0].experts[0].module.act_fn if hasattr(layers[0].experts[0].module, "act_fn") else ACT2FN["silu"]
    gen = torch.Generator().manual_seed(cfg.seed)
    num, den = torch.zeros(L, E, dtype=torch.float64), torch.zeros(L, E, dtype=torch.float64)
    rer = Reroute(L, E)
    _, it = iter_batches(tok, texts, cfg.seq_len, cfg.batch_size)
    with capture_routing(model, layers, keep_inputs=True, stop_early=True) as rec:
        for bi, batch in enumerate(it):
            gen.manual_seed(cfg.seed * 1_000_003 + bi)  # the subsample is seeded per batch (shard-independent)
            rec.clear()
            forward(model, batch)
            rb = routed_batch(batch, rec, layers)
            for li, layer in enumerate(layers):
                pair = fused_pair(layer)
                if pair is None:
                    continue
                gu, dn = pair
                gu_q, dn_q = qw[id(gu)][2], qw[id(dn)][2]
                ex, slot, t = per_expert_slots(rb.indices[li], E, cfg.weight_error_tokens, gen)
                x = rb.inputs[li]
                X = x.new_zeros(E, int(slot.max()) + 1, x.shape[-1])
                X[ex, slot] = x[t]
                mask = torch.zeros(X.shape[:2] + (1,), dtype=x.dtype)
                mask[ex, slot] = 1
                f, fq = expert_mlp(X, gu, dn, act).double(), expert_mlp(X, gu_q, dn_q, act).double()
                num[li] += ((fq - f).pow(2) * mask).sum((1, 2))
                den[li] += (f.pow(2) * mask).sum((1, 2))
            rec.clear()
            try:
                for p, _, q in qw.values():
                    p.data = q
                forward(model, batch)
            finally:
                for p, fp, _ in qw.values():
                    p.data = fp
            rer.add(rb.indices, routed_batch(batch, rec, layers).indices)
    werr = np.where(den.numpy() > 0, num.numpy() / np.maximum(den.numpy(), 1e-300), np.nan)
    return werr, rer.rate(), rer.jaccard()


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "deepseek-v3-tiny"])
@pytest.mark.parametrize("scheme", ["int4-g128", "int2-g64"])
def test_layerwise_equals_full_copy(name, scheme, qwen_dir, deepseek_dir, seed_parquet):
    d = {"qwen3-moe-tiny": qwen_dir, "deepseek-v3-tiny": deepseek_dir}[name]
    tok, model = load_tokenizer(str(d)), load_model(str(d), "cpu", "float32")
    texts = load_texts(str(seed_parquet), "text", 12, split="train").texts
    cfg = ProfileConfig(model=str(d), out="unused", seq_len=48, batch_size=4, scheme=scheme, weight_error_tokens=4)
    before = {n: p.data.clone() for n, p in model.named_parameters()}
    new = collect(model, tok, texts, cfg, progress=False)
    for n, p in model.named_parameters():  # fp weights restored exactly
        assert torch.equal(p.data, before[n]), n
    werr, rate, jac = _reference(model, tok, texts, cfg)
    assert np.isfinite(werr).sum() > 0 and np.nanmax(rate) > 0  # the comparison has something to compare
    np.testing.assert_array_equal(new.weight_error, werr)
    np.testing.assert_array_equal(new.reroute_rate, rate)
    assert new.layer_jaccard == jac


def test_one_layer_quantized_at_a_time(qwen_dir):
    """While layer d runs, only d's weights hold RTN values, and every weight is fp again afterwards."""
    model = load_model(str(qwen_dir), "cpu", "float32")
    layers = moe_layers(model)
    rtn = LayerwiseRTN(model, layers, parse_scheme("int2-g64"))
    fp = {id(p): p.data_ptr() for p in model.parameters()}  # storage, not the fresh `.data` view
    seen: list[tuple[int, int, int]] = []  # (moe ordinal, params now quantized, params of its layer)

    def check(li: int, fp_of) -> None:
        changed = sum(p.data_ptr() != fp[id(p)] for p in model.parameters())
        seen.append((li, changed, len(rtn._params(layers[li].layer_index))))
        gu, _ = fused_pair(layers[li])
        assert fp_of(gu).data_ptr() == fp[id(gu)] and not torch.equal(gu.data, fp_of(gu))

    ids = torch.randint(3, 500, (2, 16))
    with rtn.applied(check):
        model(input_ids=ids, use_cache=False)
    assert [s[0] for s in seen] == list(range(len(layers)))
    assert all(changed == n > 0 for _, changed, n in seen)
    assert all(p.data_ptr() == fp[id(p)] for p in model.parameters())
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in decoder_layers(model))


def test_restored_when_forward_stops_early(qwen_dir):
    """The router hook's early stop skips the last layer's forward hook: `finally` restores it."""
    model = load_model(str(qwen_dir), "cpu", "float32")
    layers = moe_layers(model)
    fp = {id(p): p.data_ptr() for p in model.parameters()}  # storage, not the fresh `.data` view
    rtn = LayerwiseRTN(model, layers, parse_scheme("int4-g128"))
    with capture_routing(model, layers, stop_early=True), rtn.applied():
        forward(model, Batch(torch.randint(3, 500, (1, 8)), torch.ones(1, 8, dtype=torch.long), [0]))
        assert rtn.active  # the last layer is still swapped when the forward stopped
    assert not rtn.active and all(p.data_ptr() == fp[id(p)] for p in model.parameters())
