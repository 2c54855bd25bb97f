"""Qwen3-MoE and Qwen2-MoE: softmax over all experts, top-k, optional renormalisation."""

from __future__ import annotations

from torch import nn

from pascal_moe.models.base import MoELayer, RouterSpec
from pascal_moe.models.softmax_topk import walk

MODEL_TYPES = ("qwen3_moe", "qwen2_moe")


def layers(model: nn.Module) -> list[MoELayer]:
    c = model.config
    spec = RouterSpec("softmax", c.num_experts, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
    return walk(model, spec, shared_attr="shared_expert" if c.model_type == "qwen2_moe" else None)
