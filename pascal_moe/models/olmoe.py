"""OLMoE: softmax over all experts, top-k, renormalised only when `norm_topk_prob`."""

from __future__ import annotations

from torch import nn

from pascal_moe.models.base import MoELayer, RouterSpec
from pascal_moe.models.softmax_topk import walk

MODEL_TYPES = ("olmoe",)


def layers(model: nn.Module) -> list[MoELayer]:
    c = model.config
    return walk(model, RouterSpec("softmax", c.num_experts, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob))
