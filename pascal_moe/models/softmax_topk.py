"""Shared walk for the families whose MoE block is `mlp.gate` (a `*TopKRouter`) + `mlp.experts`.

Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE differ only in config names and in what
rides beside the experts (Qwen2-MoE's gated shared expert); their adapters are
one call to `walk` each.
"""

from __future__ import annotations

from torch import nn

from pascal_moe.models.base import MoELayer, RouterSpec, decoder_layers, fused_experts


def walk(model: nn.Module, spec: RouterSpec, shared_attr: str | None = None) -> list[MoELayer]:
    """Every decoder layer whose `mlp` has a `gate` router and `experts` is one MoE layer."""
    out: list[MoELayer] = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(mlp, "gate") or not hasattr(mlp, "experts"):
            continue  # dense layer (mlp_only_layers, decoder_sparse_step, first_k_dense_replace)
        out.append(
            MoELayer(
                ordinal=len(out),
                layer_index=i,
                name=f"model.layers.{i}.mlp",
                block=mlp,
                router=mlp.gate,
                spec=spec,
                experts=fused_experts(mlp.experts),
                shared=getattr(mlp, shared_attr, None) if shared_attr else None,
            )
        )
    return out
