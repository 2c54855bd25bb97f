"""The one small interface every MoE architecture adapter fills in.

Shape legend: N tokens (batch x sequence, flattened), E routed experts, k experts
per token, H hidden size, I expert intermediate size.

Why a separate `select` instead of trusting the gate's own outputs: the profiler,
quantizer losses and evaluation must recompute expert selection from *any* logits
(fp or quantized, recorded or perturbed) exactly as the model's MoE block would,
including DeepSeek-style biased, group-limited selection.  Tests check `select`
against the real block on every supported architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

RoutingKind = Literal["softmax", "sigmoid", "topk_softmax"]


@dataclass(frozen=True)
class RouterSpec:
    """How router logits z[N, E] become selected experts and their weights.

    - `softmax` (Qwen3/Qwen2-MoE, Mixtral, OLMoE): p = softmax(z); top-k of p;
      weights renormalised over the k when `norm_topk_prob`.
    - `sigmoid` (DeepSeek-V3, GLM-4.5): s = sigmoid(z); choice score s + bias;
      only the `topk_group` best of `n_group` groups (group score = sum of its
      top-2 choice scores) compete; weights = s gathered (no bias), renormalised
      when `norm_topk_prob`, times `scaling`.
    - `topk_softmax` (GPT-OSS): top-k of z, weights = softmax over the k.
    """

    kind: RoutingKind
    n_experts: int
    top_k: int
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    bias: torch.Tensor | None = field(default=None, compare=False)


def choice_scores(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Scores [N, E] whose top-k *is* the selection; -inf where a group is masked out.

    This is the ordering pi used by every router-alignment loss (we follow the
    biased, group-limited score that actually selects experts, as methods.md recommends).
    """
    z = logits.float()  # [N, E]
    if spec.kind != "sigmoid":
        return z  # softmax is monotone: ordering by logits == ordering by probabilities
    s = torch.sigmoid(z) + (spec.bias.to(z) if spec.bias is not None else 0.0)  # [N, E]
    if spec.n_group <= 1:
        return s
    per_group = spec.n_experts // spec.n_group
    grouped = s.view(-1, spec.n_group, per_group)  # [N, G, E/G]
    group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [N, G]
    keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(spec.topk_group, -1).indices, 1.0)
    mask = keep.unsqueeze(-1).expand_as(grouped).reshape_as(s).bool()  # [N, E]
    return s.masked_fill(~mask, float("-inf"))


def select(logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k], indices [N, k]) exactly as the model's MoE block chooses them, indices sorted by score."""
    z = logits.float()  # [N, E]
    idx = choice_scores(z, spec).topk(spec.top_k, dim=-1).indices  # [N, k]
    if spec.kind == "softmax":
        w = torch.softmax(z, -1).gather(1, idx)
        if spec.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    elif spec.kind == "sigmoid":
        w = torch.sigmoid(z).gather(1, idx)
        if spec.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * spec.scaling
    else:
        w = torch.softmax(z.gather(1, idx), -1)
    return w, idx


@dataclass(frozen=True)
class ExpertTensor:
    """One quantizable expert weight: `module.<param>` holds all experts' weights.

    `expert_dim` is the dimension indexing experts (None for a per-expert nn.Linear),
    `in_dim` the input-channel dimension along which quantization groups run.
    """

    module: nn.Module
    param: str
    expert_dim: int | None
    in_dim: int
    expert: int | None = None  # for per-expert layouts: which expert this tensor belongs to

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)


class _LiveSpec:
    """The `MoELayer.spec` field: the spec as set, with the router's bias buffer as it is now.

    Why: `model.to(device)` / dtype casts replace buffers with new tensors, so a bias
    captured when the layers were discovered would go stale (and miss later updates).
    A data descriptor is the dataclass way to give a field a getter: `__init__` sets it
    through `__set__`, and raising AttributeError on the class keeps the field required.
    """

    def __get__(self, layer: MoELayer | None, owner: type | None = None) -> RouterSpec:
        if layer is None:
            raise AttributeError("spec")  # no class-level default
        spec: RouterSpec = layer.__dict__["spec"]
        if layer.bias_attr is not None:
            bias = getattr(layer.router, layer.bias_attr)
            if spec.bias is not bias:
                spec = layer.__dict__["spec"] = replace(spec, bias=bias)
        return spec

    def __set__(self, layer: MoELayer, spec: RouterSpec) -> None:
        layer.__dict__["spec"] = spec


@dataclass
class MoELayer:
    """One sparse MoE block of a decoder layer, as the rest of pascal-moe sees it."""

    ordinal: int  # 0..L-1 over MoE layers only
    layer_index: int  # decoder layer index (dense layers skipped)
    name: str  # module path of the MoE block
    block: nn.Module
    router: nn.Module  # its forward output (first element if a tuple) is the logits [N, E]
    spec: _LiveSpec = _LiveSpec()  # reads as a RouterSpec; with `bias_attr` set its bias is the router's buffer now
    experts: list[ExpertTensor]
    shared: nn.Module | None = None  # shared expert(s), dense: quantized like any MLP
    bias_attr: str | None = None  # router buffer holding a selection bias (DeepSeek's e_score_correction_bias)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select(logits, self.spec)

    def choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        return choice_scores(logits, self.spec)


def router_logits(output: object) -> torch.Tensor:
    """Router logits [N, E] from a router's forward output (a tensor or a tuple led by logits)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    return out.reshape(-1, out.shape[-1])


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (`model.model.layers` in every supported family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        from pascal_moe.errors import PascalError

        raise PascalError(f"cannot find decoder layers on {type(model).__name__}: extend pascal_moe/models/base.py")
    return layers


def fused_experts(experts: nn.Module, transposed: bool = False) -> list[ExpertTensor]:
    """Fused 3D expert parameters as transformers 5 stores them, or per-expert Linear layers.

    transformers 5: gate_up_proj [E, 2I, H], down_proj [E, H, I] (input dim last);
    GPT-OSS is transposed: gate_up_proj [E, H, 2I], down_proj [E, I, H] (input dim 1).
    A ModuleList of per-expert MLPs (older or unfused layouts) yields one entry per Linear.
    """
    if isinstance(experts, nn.ModuleList):
        out = []
        for e, mlp in enumerate(experts):
            for _name, mod in mlp.named_modules():
                if isinstance(mod, nn.Linear):
                    out.append(ExpertTensor(mod, "weight", None, 1, expert=e))
        return out
    in_dim = 1 if transposed else 2
    return [ExpertTensor(experts, p, 0, in_dim) for p in ("gate_up_proj", "down_proj") if hasattr(experts, p)]
