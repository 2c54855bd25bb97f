"""Read a model's weights lazily from its safetensors checkpoint, one decoder block at a time.

Why: `from_pretrained(device_map=...)` with disk offload reads (and re-saves) every expert tensor
at load time, and the memory-mapped shards it touches stay resident until loading ends, so peak
memory is the whole checkpoint.  The quantizer needs one block at a time: the checkpoint itself
is the disk copy.  The skeleton is built on the meta device (buffers such as rotary frequencies
computed for real); each block's checkpoint tensors are read with the shard opened only for that
block, and transformers' own `convert_and_load_state_dict_in_model` applies its checkpoint
conversions (per-expert weights fused into [E, O, I]) exactly as from_pretrained would.
A pack-quantized (compressed-tensors) checkpoint becomes a dense model: its config is read without
`quantization_config` and each block's packed tensors are decompressed as they are read (models/packed.py).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pascal_moe.errors import PascalError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def checkpoint_files(model: str) -> dict[str, Path] | None:
    """Checkpoint key -> safetensors file of a local model directory; None when it has none."""
    root = Path(model)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: root / f for k, f in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


class LazyModel:
    """A meta-device model whose blocks are loaded from the checkpoint on demand."""

    def __init__(self, model: str, files: dict[str, Path], dtype: torch.dtype, device: torch.device):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
        from transformers.conversion_mapping import get_model_conversion_mapping

        from pascal_moe.models.packed import pack_scheme, quantization_config

        self.files, self.dtype, self.device = files, dtype, device
        qc = quantization_config(model)
        self.scheme = pack_scheme(qc) if qc else None
        if qc and self.scheme is None:
            raise PascalError(f"{model}: only pack-quantized compressed-tensors checkpoints can be streamed")
        config = AutoConfig.from_pretrained(model)
        if qc:  # a dense skeleton: the packed tensors are decompressed block by block in `_load`
            del config.quantization_config
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed on the CPU
            self.model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.mapping = get_model_conversion_mapping(self.model)
        try:
            self.model.generation_config = GenerationConfig.from_pretrained(model)
        except OSError:
            pass  # no generation_config.json: keep the one from_config made
        rest = [k for k in files if not _LAYER.search(k)]
        self._load(rest)
        for name, buf in list(self.model.named_buffers()):
            if buf.device.type != "meta" and buf.device != device:
                mod, _, leaf = name.rpartition(".")
                self.model.get_submodule(mod).register_buffer(leaf, buf.to(device), persistent=False)
        self.model.tie_weights()

    def _load(self, keys: list[str]) -> None:
        """Read `keys` (each shard opened once, closed after) and load them converted onto the device."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        by_file: dict[Path, list[str]] = defaultdict(list)
        for k in keys:
            by_file[self.files[k]].append(k)
        sd: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for k in names:
                    sd[k] = f.get_tensor(k).clone()  # own memory: the shard's mapping closes with `with`
        if self.scheme is not None:
            from pascal_moe.models.packed import decompress

            sd = decompress(sd, self.scheme)
        cfg = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=self.mapping)
        convert_and_load_state_dict_in_model(self.model, sd, cfg)
        # It records only the conversions these keys used; saving must revert the model's full mapping.
        self.model._weight_conversions = None  # type: ignore[assignment]
        del sd
        trim_heap()  # the read copies and conversion temporaries (~1.6x the block) go back to the OS now,
        # not at the block's drop: else they sit under the forward's peak

    def load_block(self, index: int) -> None:
        """Materialise decoder block `index` on the device from its checkpoint tensors."""
        self._load([k for k in self.files if (m := _LAYER.search(k)) and int(m.group(1)) == index])


def streamed(lazy: LazyModel, resident: set[int]) -> PreTrainedModel:
    """The lazy model for full forwards: blocks in `resident` loaded once, every other block read
    from the checkpoint just before its forward and dropped right after (what accelerate's disk
    offload does, without re-saving the converted weights or keeping the shards mapped).

    At most one streamed block is loaded at a time: a forward stopped early (routing statistics stop
    after the last router) skips that block's drop hook, so the next load drops it first."""
    from pascal_moe.models.base import decoder_layers

    layers = decoder_layers(lazy.model)
    loaded: list[int] = []  # the streamed block now on the device (0 or 1 entries)

    def drop_block(i: int) -> None:
        layers[i].to("meta")
        loaded.remove(i)
        trim_heap()

    def load(i: int):
        def pre_hook(layer: torch.nn.Module, _args: tuple) -> None:
            for j in [j for j in loaded if j != i]:
                drop_block(j)
            if any(p.device.type == "meta" for p in layer.parameters()):
                lazy.load_block(i)
                loaded.append(i)

        return pre_hook

    def drop(i: int):
        def hook(_layer: torch.nn.Module, _args: tuple, _out: object) -> None:
            if i in loaded:
                drop_block(i)

        return hook

    for i, layer in enumerate(layers):
        if i in resident:
            lazy.load_block(i)
            continue
        layer.register_forward_pre_hook(load(i), prepend=True)
        layer.register_forward_hook(drop(i))
    return lazy.model


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them, and RSS would creep block by block)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def release_memory() -> None:
    """Collect unreachable objects (a dropped model's hook cycles), then trim the heap: at phase ends."""
    import gc

    gc.collect()
    trim_heap()
