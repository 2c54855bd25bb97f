"""The quantizer's model placement: exactly one decoder block on the device at a time (issue #15).

Why: a block-wise quantizer needs one block's weights at a time, so the other blocks can stay on
the CPU or on disk and peak memory stays one block + caches, flat in the number of layers.

`load_for_quantize` loads the model whole (it fits, no --offload-dir: the old path) or through
transformers' `from_pretrained(device_map=...)` with the decoder layers on CPU or disk, so
transformers still performs its checkpoint conversions (per-expert weights fused into [E, O, I])
and re-saves converted disk tensors under --offload-dir.  `Blocks.load(i)` materialises block i
on the device (from accelerate's weights map, hooks removed); `Blocks.release(i)` drops it to
the meta device once it is quantized and written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from pascal_moe.models.base import decoder_layers
from pascal_moe.models.lazy import LazyModel, checkpoint_files, release_memory
from pascal_moe.models.loading import load_mapped, load_whole, prepare
from pascal_moe.models.placement import Placement, quantizer_map


@dataclass
class Blocks:
    """Onload / release decoder blocks of a (possibly offloaded) model; no-ops when all is on the device."""

    model: PreTrainedModel
    device: torch.device
    offloaded: bool
    lazy: LazyModel | None = None  # blocks read straight from the checkpoint (else accelerate's hooks)

    def load(self, i: int) -> nn.Module:
        """Block i with every weight on the device (read from CPU/disk when offloaded)."""
        layer = decoder_layers(self.model)[i]
        if not self.offloaded:
            return layer
        if self.lazy is not None:
            if any(p.device.type == "meta" for p in layer.parameters()):
                self.lazy.load_block(i)
            return layer
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import set_module_tensor_to_device
        from transformers.integrations.accelerate import load_offloaded_parameter

        prefix = _name_of(self.model, layer)
        values = {}
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if t.device.type == "meta":
                values[name] = load_offloaded_parameter(self.model, f"{prefix}.{name}")
            else:
                values[name] = t.data
        remove_hook_from_module(layer, recurse=True)
        for name, v in values.items():
            set_module_tensor_to_device(layer, name, self.device, value=v)
        return layer

    def release(self, i: int) -> None:
        """Drop block i's weights (to meta) once it is done: memory stays one block."""
        if self.offloaded:
            decoder_layers(self.model)[i].to("meta")
            release_memory()


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def load_for_quantize(
    model: str,
    device: str,
    dtype: str,
    max_memory: str | None,
    offload_dir: str | None,
    reserve: int = 0,
    revision: str | None = None,
) -> tuple[nn.Module, Blocks, Placement]:
    """The model for block-wise quantization and its block handle.

    All on the device when it fits (with `reserve` bytes for caches) and no --offload-dir is given;
    else non-block modules on the device and decoder layers on CPU or disk (models/placement.py).
    """
    from pascal_moe.errors import PascalError

    p = prepare(model, device, dtype, max_memory, offload_dir, revision)
    place, dt = p.place, p.dtype
    dmap = quantizer_map(p.skeleton, place, reserve)
    if dmap is None:
        m = load_whole(p, model)
        return m, Blocks(cast("PreTrainedModel", m), place.device, False), place
    files = checkpoint_files(model) if "disk" in dmap.values() else None
    if files is not None:  # a local safetensors checkpoint is its own disk copy: read blocks from it
        lazy = LazyModel(model, files, dt, place.device)
        return lazy.model, Blocks(lazy.model, place.device, True, lazy), place
    try:
        m = load_mapped(p.ref.source, dt, dmap, offload_dir, p.ref.load_revision)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one actionable line
        raise PascalError(f"cannot load model {model} offloaded: {str(e).splitlines()[0]}") from e
    return m, Blocks(cast("PreTrainedModel", m), place.device, True), place


@contextmanager
def layers_skipped(model: nn.Module) -> Iterator[None]:
    """Every decoder layer returns its input unchanged (no weights read) while the context is open.

    Block-input capture needs only layer 0's input and every layer's kwargs (masks, rotary
    embeddings), which do not depend on layer outputs; skipping keeps offloaded blocks on disk.
    Instance `forward` attributes (accelerate's hook wrappers) are restored on exit.
    """
    layers = decoder_layers(model)
    saved = [lay.__dict__.get("forward") for lay in layers]

    def identity(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states

    for lay in layers:
        lay.forward = identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        for lay, fwd in zip(layers, saved):
            if fwd is None:
                del lay.forward
            else:
                lay.forward = fwd  # type: ignore[method-assign]
