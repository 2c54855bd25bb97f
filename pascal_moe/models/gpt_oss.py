"""GPT-OSS: `mlp.router` with a bias; top-k on raw logits, softmax over the k.

Experts are stored transposed (`gate_up_proj [E, H, 2I]`, interleaved gate/up, with biases).
"""

from __future__ import annotations

from torch import nn

from pascal_moe.models.base import MoELayer, RouterSpec, decoder_layers, fused_experts

MODEL_TYPES = ("gpt_oss",)


def layers(model: nn.Module) -> list[MoELayer]:
    c = model.config
    spec = RouterSpec("topk_softmax", c.num_local_experts, c.num_experts_per_tok)
    return [
        MoELayer(
            ordinal=i,
            layer_index=i,
            name=f"model.layers.{i}.mlp",
            block=layer.mlp,
            router=layer.mlp.router,
            spec=spec,
            experts=fused_experts(layer.mlp.experts, transposed=True),
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
