"""Architecture lookup: `moe_layers(model)` for any supported MoE.

Adding an architecture: write `pascal_moe/models/<family>.py` with `MODEL_TYPES`
and `layers(model)`, and add the module to `_FAMILIES` below.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.models import deepseek, gpt_oss, mixtral, olmoe, qwen_moe
from pascal_moe.models.base import ExpertTensor, MoELayer, RouterSpec, choice_scores, router_logits, select

_FAMILIES: tuple[ModuleType, ...] = (qwen_moe, mixtral, olmoe, deepseek, gpt_oss)
ADAPTERS = {t: fam for fam in _FAMILIES for t in fam.MODEL_TYPES}
SUPPORTED = tuple(sorted(ADAPTERS))

__all__ = [
    "ADAPTERS",
    "SUPPORTED",
    "ExpertTensor",
    "MoELayer",
    "RouterSpec",
    "choice_scores",
    "moe_layers",
    "router_logits",
    "select",
]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of `model`, in order; a one-line error when the architecture is unsupported or dense."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = ADAPTERS.get(model_type)
    if family is None:
        raise PascalError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(SUPPORTED)} "
            "(add an adapter in pascal_moe/models/)"
        )
    found = family.layers(model)
    if not found:
        raise PascalError(
            f"model of type {model_type!r} has no MoE layers: pascal-moe needs a Mixture-of-Experts model"
        )
    return found
