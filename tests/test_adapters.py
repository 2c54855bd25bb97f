"""Architecture adapters: `moe_layers` finds the right blocks and `select` reproduces each block's real routing.

Shape legend: N tokens, E experts, k experts per token, H hidden, I expert intermediate size.

The real selection is read twice on the same forward: from the router's own returned
(weights, indices) and from the arguments the experts module actually receives; the
adapter's `select(logits)` must equal both, on every supported architecture.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.models import SUPPORTED, MoELayer, RouterSpec, choice_scores, moe_layers, router_logits, select
from pascal_moe.models.base import decoder_layers


@dataclass(frozen=True)
class Expect:
    kind: str
    layer_indices: tuple[int, ...]  # decoder indices of the MoE layers (dense layers skipped)
    transposed: bool = False  # GPT-OSS stores experts as [E, H, 2I] / [E, I, H]


EXPECT = {
    "qwen3_moe": Expect("softmax", (0, 2)),  # layer 1 is in mlp_only_layers
    "qwen2_moe": Expect("softmax", (0, 1)),
    "mixtral": Expect("softmax", (0, 1)),
    "olmoe": Expect("softmax", (0, 1)),
    "deepseek_v3": Expect("sigmoid", (1, 2)),  # first_k_dense_replace=1
    "glm4_moe": Expect("sigmoid", (1, 2)),
    "gpt_oss": Expect("topk_softmax", (0, 1), transposed=True),
}
N_EXPERTS, TOP_K, HIDDEN = 8, 2, 64


@dataclass
class Routed:
    """One MoE layer's routing on one forward, as the model itself computed and used it."""

    logits: torch.Tensor  # [N, E] router output
    gate_weights: torch.Tensor  # [N, k] returned by the router
    gate_indices: torch.Tensor  # [N, k]
    expert_weights: torch.Tensor | None = None  # [N, k] received by the experts module
    expert_indices: torch.Tensor | None = None  # [N, k]


def _arg(bound: inspect.BoundArguments, *names: str) -> torch.Tensor:
    for name in names:
        if name in bound.arguments:
            return bound.arguments[name]
    raise AssertionError(f"experts forward has none of {names}: {list(bound.arguments)}")


@contextmanager
def capture_routing(layers: list[MoELayer]) -> Iterator[list[Routed]]:
    """Hook every router (its returned logits, weights, indices) and experts module (its routing arguments)."""
    routed: list[Routed | None] = [None] * len(layers)
    handles = []

    def on_router(i: int):
        def hook(_mod: nn.Module, _args: tuple, out: tuple) -> None:
            assert isinstance(out, tuple) and len(out) == 3, "router should return (logits, weights, indices)"
            routed[i] = Routed(router_logits(out).detach().clone(), out[1].detach().clone(), out[2].detach().clone())

        return hook

    def on_experts(i: int, sig: inspect.Signature):
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = sig.bind(*args, **kwargs)
            routed[i].expert_indices = _arg(bound, "top_k_index", "router_indices").detach().clone()
            routed[i].expert_weights = _arg(bound, "top_k_weights", "routing_weights").detach().clone()

        return hook

    try:
        for i, layer in enumerate(layers):
            experts = layer.block.experts
            handles.append(layer.router.register_forward_hook(on_router(i)))
            handles.append(
                experts.register_forward_pre_hook(on_experts(i, inspect.signature(experts.forward)), with_kwargs=True)
            )
        yield routed  # type: ignore[misc]
    finally:
        for h in handles:
            h.remove()


def assert_same_selection(w_a: torch.Tensor, i_a: torch.Tensor, w_b: torch.Tensor, i_b: torch.Tensor) -> None:
    """Same expert set per token (order ignored) and the same weight on each chosen expert."""
    ia, order_a = i_a.long().sort(-1)  # [N, k]
    ib, order_b = i_b.long().sort(-1)
    assert torch.equal(ia, ib), f"selected experts differ on {(ia != ib).any(-1).sum().item()} tokens"
    torch.testing.assert_close(w_a.float().gather(1, order_a), w_b.float().gather(1, order_b), rtol=1e-5, atol=1e-6)


def run_forward(model: nn.Module, layers: list[MoELayer], seed: int = 1, batch: int = 2, seq: int = 32) -> list[Routed]:
    torch.manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, seq))
    with capture_routing(layers) as routed, torch.no_grad():
        model(input_ids=ids)
    assert all(r is not None and r.expert_indices is not None for r in routed), "a MoE layer did not run"
    return routed


# --------------------------------------------------------------------------- per-architecture checks


@pytest.fixture(scope="module", params=sorted(EXPECT))
def arch_model(request: pytest.FixtureRequest, tiny_moe_model):
    model = tiny_moe_model(request.param)
    return request.param, model, moe_layers(model)


def test_every_supported_arch_is_tested() -> None:
    """A new adapter must come with a tiny config (conftest) and an entry in EXPECT."""
    assert set(SUPPORTED) == set(EXPECT)


def test_layers_found(arch_model) -> None:
    arch, model, layers = arch_model
    exp = EXPECT[arch]
    assert model.config.model_type == arch
    assert tuple(layer.layer_index for layer in layers) == exp.layer_indices
    assert [layer.ordinal for layer in layers] == list(range(len(exp.layer_indices)))
    blocks = decoder_layers(model)
    for layer in layers:
        assert layer.block is blocks[layer.layer_index].mlp
        assert layer.name == f"model.layers.{layer.layer_index}.mlp"
        assert model.get_submodule(layer.name) is layer.block
        assert layer.router is getattr(layer.block, "router" if arch == "gpt_oss" else "gate")
        assert (layer.spec.kind, layer.spec.n_experts, layer.spec.top_k) == (exp.kind, N_EXPERTS, TOP_K)
        assert layer.router.weight.shape == (N_EXPERTS, HIDDEN)
    dense = set(range(len(blocks))) - set(exp.layer_indices)
    assert all(not hasattr(blocks[i].mlp, "experts") for i in dense), "a skipped layer is not dense"


def test_shared_experts(arch_model) -> None:
    arch, _, layers = arch_model
    for layer in layers:
        if arch in ("deepseek_v3", "glm4_moe"):
            assert layer.shared is layer.block.shared_experts
        elif arch == "qwen2_moe":
            assert layer.shared is layer.block.shared_expert
        else:
            assert layer.shared is None


def test_select_matches_real_routing(arch_model) -> None:
    arch, model, layers = arch_model
    routed = run_forward(model, layers)
    for layer, r in zip(layers, routed):
        assert r.logits.shape == (64, N_EXPERTS)
        # what the router returned is what the experts received
        assert torch.equal(r.gate_indices, r.expert_indices)
        assert torch.equal(r.gate_weights, r.expert_weights)
        w, idx = layer.select(r.logits)  # [N, k] each
        assert idx.shape == w.shape == (64, TOP_K)
        assert_same_selection(w, idx, r.expert_weights, r.expert_indices)
        w2, idx2 = select(r.logits, layer.spec)
        assert torch.equal(idx, idx2) and torch.equal(w, w2)
        # choice scores order the experts so that their top-k is the selection
        top = layer.choice_scores(r.logits).topk(TOP_K, -1).indices
        assert torch.equal(top.sort(-1).values, idx.sort(-1).values)


def test_select_follows_replaced_buffers(arch_model) -> None:
    """Moving a model (`.to(device)`) replaces its buffers, the DeepSeek bias among them: `select` must
    follow the live module, not a copy taken when the layers were discovered."""
    _, model, _ = arch_model
    model = copy.deepcopy(model)
    layers = moe_layers(model)
    model._apply(lambda t: t.clone())  # what a device move does: buffers become new tensors
    with torch.no_grad():  # then the bias changes in place on the new buffer
        for layer in layers:
            bias = getattr(layer.router, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn_like(bias) * 0.05)
    routed = run_forward(model, layers, seed=2)
    for layer, r in zip(layers, routed):
        w, idx = layer.select(r.logits)
        assert_same_selection(w, idx, r.expert_weights, r.expert_indices)


def test_biased_grouped_selection_is_exercised(tiny_moe_model) -> None:
    """For sigmoid routers the bias and the group limit both change the choice, so the checks above bite."""
    for arch in ("deepseek_v3", "glm4_moe"):
        model = tiny_moe_model(arch)
        layers = moe_layers(model)
        routed = run_forward(model, layers)
        for layer, r in zip(layers, routed):
            assert layer.spec.bias is not None and layer.spec.bias.abs().sum() > 0
            assert layer.spec.n_group >= 2 and layer.spec.topk_group < layer.spec.n_group
            real = r.expert_indices.sort(-1).values
            for ablated in (replace(layer.spec, bias=None), replace(layer.spec, n_group=1, topk_group=1)):
                _, idx = select(r.logits, ablated)
                assert not torch.equal(idx.sort(-1).values, real), f"{arch}: {ablated} selects the same experts"
            masked = torch.isinf(layer.choice_scores(r.logits)).sum(-1)  # [N]
            per_group = N_EXPERTS // layer.spec.n_group
            assert (masked == per_group * (layer.spec.n_group - layer.spec.topk_group)).all()


def test_expert_tensors(arch_model) -> None:
    arch, model, layers = arch_model
    exp, c = EXPECT[arch], model.config
    inter = c.moe_intermediate_size if hasattr(c, "moe_intermediate_size") else c.intermediate_size
    shapes = (
        {"gate_up_proj": (N_EXPERTS, HIDDEN, 2 * inter), "down_proj": (N_EXPERTS, inter, HIDDEN)}
        if exp.transposed
        else {"gate_up_proj": (N_EXPERTS, 2 * inter, HIDDEN), "down_proj": (N_EXPERTS, HIDDEN, inter)}
    )
    in_features = {"gate_up_proj": HIDDEN, "down_proj": inter}
    for layer in layers:
        assert sorted(t.param for t in layer.experts) == sorted(shapes)
        for t in layer.experts:
            assert t.module is layer.block.experts and t.expert_dim == 0
            assert tuple(t.tensor.shape) == shapes[t.param]
            assert t.tensor.shape[t.in_dim] == in_features[t.param], f"{t.param}: in_dim is not the input channels"
            assert t.tensor is getattr(layer.block.experts, t.param)
            assert torch.isfinite(t.tensor).all()


def _one_expert_by_hand(layer: MoELayer, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's output [N, H] computed only from the adapter's ExpertTensors."""
    w = {t.param: t.tensor[e] for t in layer.experts}
    mod = layer.block.experts
    if layer.spec.kind == "topk_softmax":  # GPT-OSS: x @ W [H, 2I] + b, interleaved gate/up, then [I, H]
        gate_up = x @ w["gate_up_proj"] + mod.gate_up_proj_bias[e]  # [N, 2I]
        return mod._apply_gate(gate_up) @ w["down_proj"] + mod.down_proj_bias[e]  # [N, H]
    gate, up = (x @ w["gate_up_proj"].T).chunk(2, dim=-1)  # [N, I] each: gate rows first, then up
    return (mod.act_fn(gate) * up) @ w["down_proj"].T  # [N, H]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_one_expert_output_from_tensors(arch: str, tiny_moe_model) -> None:
    model = tiny_moe_model(arch)
    layer = moe_layers(model)[-1]
    torch.manual_seed(3)
    x = torch.randn(10, HIDDEN)  # [N, H]
    for e in (0, N_EXPERTS - 1):
        idx = torch.full((10, 1), e, dtype=torch.long)  # [N, 1]: every token to expert e with weight 1
        with torch.no_grad():
            want = layer.block.experts(x, idx, torch.ones(10, 1))
            got = _one_expert_by_hand(layer, x, e)
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- RouterSpec by hand


def _logit(p: list[float]) -> torch.Tensor:
    t = torch.tensor([p], dtype=torch.float64)
    return torch.log(t / (1 - t)).float()  # sigmoid(_logit(p)) == p


def test_softmax_select_by_hand() -> None:
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.4]])  # [N=2, E=4]
    w, idx = select(z, RouterSpec("softmax", 4, 2, norm_topk_prob=True))
    assert idx.tolist() == [[0, 1], [2, 1]]
    e = math.e
    torch.testing.assert_close(w[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    w_raw, _ = select(z, RouterSpec("softmax", 4, 2, norm_topk_prob=False))
    torch.testing.assert_close(w_raw, torch.softmax(z, -1).gather(1, idx))
    assert (w_raw.sum(-1) < 1).all()
    assert torch.equal(choice_scores(z, RouterSpec("softmax", 4, 2)), z)


def test_topk_softmax_select_by_hand() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, idx = select(z, RouterSpec("topk_softmax", 4, 2))
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_sigmoid_bias_changes_choice_not_weights() -> None:
    z = _logit([0.6, 0.5, 0.4, 0.3])
    plain = RouterSpec("sigmoid", 4, 2, norm_topk_prob=False, scaling=2.5)
    biased = replace(plain, bias=torch.tensor([0.0, 0.0, 0.3, 0.0]))
    assert select(z, plain)[1].tolist() == [[0, 1]]
    w, idx = select(z, biased)  # choice 0.6, 0.5, 0.7, 0.3 -> experts 2 and 0
    assert idx.tolist() == [[2, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.4 * 2.5, 0.6 * 2.5]]))  # sigmoid without the bias, scaled
    w_norm, _ = select(z, replace(biased, norm_topk_prob=True))
    torch.testing.assert_close(w_norm, torch.tensor([[0.4 / 1.0 * 2.5, 0.6 / 1.0 * 2.5]]))
    torch.testing.assert_close(choice_scores(z, biased), torch.tensor([[0.6, 0.5, 0.7, 0.3]]))


def test_sigmoid_renormalises_then_scales() -> None:
    z = _logit([0.9, 0.2, 0.1, 0.3])
    w, idx = select(z, RouterSpec("sigmoid", 4, 2, norm_topk_prob=True, scaling=2.0))
    assert idx.tolist() == [[0, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.9 / 1.2 * 2.0, 0.3 / 1.2 * 2.0]]))
    assert math.isclose(w.sum().item(), 2.0, rel_tol=1e-6)


def test_group_limited_choice_masks_with_inf() -> None:
    # groups {0,1} and {2,3}: expert 2 is the best single expert, but group A's top-2 sum (1.5) beats B's (1.0)
    z = _logit([0.8, 0.7, 0.9, 0.1])
    spec = RouterSpec("sigmoid", 4, 2, n_group=2, topk_group=1)
    scores = choice_scores(z, spec)
    assert torch.isinf(scores[0, 2:]).all() and (scores[0, 2:] < 0).all()
    torch.testing.assert_close(scores[0, :2], torch.tensor([0.8, 0.7]))
    _, idx = select(z, spec)
    assert idx.tolist() == [[0, 1]]
    _, idx_free = select(z, replace(spec, n_group=1, topk_group=1))
    assert idx_free.tolist() == [[2, 0]]
    # the bias counts in the group score too: lift group B above A
    _, idx_b = select(z, replace(spec, bias=torch.tensor([0.0, 0.0, 0.0, 0.6])))
    assert sorted(idx_b[0].tolist()) == [2, 3]


def test_router_logits_flattens_tuples_and_batches() -> None:
    z = torch.randn(2, 3, 8)  # [B, T, E]
    assert router_logits(z).shape == (6, 8)
    assert router_logits((z, torch.zeros(6, 2), torch.zeros(6, 2))).shape == (6, 8)
    assert torch.equal(router_logits([z.view(6, 8)]), z.view(6, 8))


# --------------------------------------------------------------------------- errors


def test_unsupported_architecture_names_the_supported_ones() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
        )
    )
    with pytest.raises(PascalError) as err:
        moe_layers(llama)
    msg = str(err.value)
    assert "llama" in msg and "\n" not in msg
    for model_type in SUPPORTED:
        assert model_type in msg


@pytest.mark.parametrize(
    "arch,dense", [("qwen3_moe", {"mlp_only_layers": [0, 1, 2]}), ("deepseek_v3", {"first_k_dense_replace": 3})]
)
def test_dense_model_of_supported_type_is_an_error(arch: str, dense: dict, tiny_moe_model) -> None:
    model = tiny_moe_model(arch, **dense)
    with pytest.raises(PascalError, match="no MoE layers"):
        moe_layers(model)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_saved_tiny_model_reloads_with_same_routing(arch: str, tiny_moe_dir, tiny_moe_model) -> None:
    """save_pretrained writes per-expert keys and loading fuses them again: routing and experts survive exactly."""
    from pascal_moe.models.loading import load_model, load_tokenizer

    path = tiny_moe_dir(arch)
    original = tiny_moe_model(arch)  # same seed, same weights
    reloaded = load_model(str(path), device="cpu", dtype="float32")
    assert load_tokenizer(str(path)).pad_token_id is not None
    a, b = moe_layers(original), moe_layers(reloaded)
    assert [layer.layer_index for layer in a] == [layer.layer_index for layer in b]
    for la, lb in zip(a, b):
        for ta, tb in zip(la.experts, lb.experts):
            assert torch.equal(ta.tensor, tb.tensor)
        if la.spec.bias is not None:
            assert torch.equal(la.spec.bias, lb.spec.bias) and lb.spec.bias.abs().sum() > 0
    ra, rb = run_forward(original, a), run_forward(reloaded, b)
    for x, y in zip(ra, rb):
        assert torch.equal(x.expert_indices, y.expert_indices)
