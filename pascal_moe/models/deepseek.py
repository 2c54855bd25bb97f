"""DeepSeek-V3 and GLM-4.5-MoE: sigmoid router with score-correction bias and group-limited top-k.

The first `first_k_dense_replace` layers are dense; `shared_experts` is a plain MLP
added to every token's output.  The bias is read from the live module at each
call (it is a buffer that training or loading may change).
"""

from __future__ import annotations

from torch import nn

from pascal_moe.models.base import MoELayer, RouterSpec
from pascal_moe.models.softmax_topk import walk

MODEL_TYPES = ("deepseek_v3", "glm4_moe")


def layers(model: nn.Module) -> list[MoELayer]:
    c = model.config
    n_experts = getattr(c, "n_routed_experts", None) or c.num_local_experts
    base = RouterSpec(
        "sigmoid",
        n_experts,
        c.num_experts_per_tok,
        norm_topk_prob=c.norm_topk_prob,
        n_group=c.n_group or 1,
        topk_group=c.topk_group or 1,
        scaling=c.routed_scaling_factor,
    )
    out = walk(model, base, shared_attr="shared_experts")
    for layer in out:
        layer.bias_attr = "e_score_correction_bias"  # `layer.spec.bias` follows this buffer (MoELayer.spec)
    return out
