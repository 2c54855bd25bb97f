"""Mixtral: softmax over `num_local_experts`, top-k, always renormalised over the k."""

from __future__ import annotations

from torch import nn

from pascal_moe.models.base import MoELayer, RouterSpec
from pascal_moe.models.softmax_topk import walk

MODEL_TYPES = ("mixtral",)


def layers(model: nn.Module) -> list[MoELayer]:
    c = model.config
    return walk(model, RouterSpec("softmax", c.num_local_experts, c.num_experts_per_tok, norm_topk_prob=True))
