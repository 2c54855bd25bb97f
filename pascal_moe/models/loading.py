"""Load a model and tokenizer from a local directory or hub id, with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.models.hub import ModelRef, resolve

if TYPE_CHECKING:
    from pascal_moe.models.placement import Placement

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU and float32 on CPU (bf16 matmuls are slow and lossy on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise PascalError(f"unknown --dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _check_source(model: str, revision: str | None = None) -> ModelRef:
    """A directory, or a hub id (short names expanded) pinned to a commit; a one-line error when missing."""
    return resolve(model, revision)


def load_tokenizer(model: str, revision: str | None = None):
    from transformers import AutoTokenizer

    ref = _check_source(model, revision)
    try:
        tok = AutoTokenizer.from_pretrained(ref.source, revision=ref.load_revision)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one actionable line
        raise PascalError(f"cannot load tokenizer of {ref.source}: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Prepared:
    """What every loader decides before reading a weight: the source, placement, dtype and meta skeleton."""

    ref: ModelRef
    place: Placement
    dtype: torch.dtype
    skeleton: nn.Module  # from_config on the meta device: dense even for a quantized checkpoint


def prepare(
    model: str, device: str, dtype: str, max_memory: str | None, offload_dir: str | None, revision: str | None
) -> Prepared:
    """The shared start of `load_model` and the quantizer's `load_for_quantize` (one-line errors)."""
    from pascal_moe.models.placement import empty_model, make_placement

    ref = _check_source(model, revision)
    place = make_placement(device, max_memory, offload_dir)
    dt = resolve_dtype(dtype, place.device)
    try:
        skeleton = empty_model(ref.source, dt, ref.load_revision)
    except Exception as e:  # noqa: BLE001
        raise PascalError(f"cannot load model {model}: {str(e).splitlines()[0]}") from e
    return Prepared(ref, place, dt, skeleton)


def load_whole(p: Prepared, model: str) -> nn.Module:
    """The whole model on the placement's device, eval mode (the model fits its budget)."""
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(p.ref.source, dtype=p.dtype, revision=p.ref.load_revision)
    except Exception as e:  # noqa: BLE001
        raise PascalError(f"cannot load model {model}: {str(e).splitlines()[0]}") from e
    return m.to(p.place.device).eval()


def load_model(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    max_memory: str | None = None,
    offload_dir: str | None = None,
    *,
    revision: str | None = None,
) -> nn.Module:
    """An eval-mode causal LM (transformers' default expert kernel; routing is read from router hooks).

    All on `device` when the model fits its `--max-memory` budget; else accelerate's device map
    (device, then CPU, then disk under `offload_dir`), decoder layers never split (models/placement.py).
    A hub model (short names expanded) is loaded at the commit `revision` resolves to (models/hub.py).
    """
    from pascal_moe.models.placement import full_forward_map

    p = prepare(model, device, dtype, max_memory, offload_dir, revision)
    src, rev = p.ref.source, p.ref.load_revision
    try:
        # transformers' compressed-tensors decompression drops accelerate's hooks mid-forward: a
        # quantized checkpoint is streamed only when we can decompress it block by block ourselves.
        whole = getattr(p.skeleton.config, "quantization_config", None) and not _streamable(src)
        dmap = None if whole else full_forward_map(p.skeleton, p.place)
        if dmap is not None:
            return load_offloaded(src, p.dtype, dmap, p.place.device, offload_dir, rev)
    except PascalError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PascalError(f"cannot load model {model}: {str(e).splitlines()[0]}") from e
    return load_whole(p, model)


def _streamable(model: str) -> bool:
    """A local safetensors checkpoint in the pack-quantized layout `pascal quantize` writes."""
    from pascal_moe.models.lazy import checkpoint_files
    from pascal_moe.models.packed import pack_scheme, quantization_config

    qc = quantization_config(model)
    return qc is not None and pack_scheme(qc) is not None and checkpoint_files(model) is not None


def load_offloaded(
    model: str,
    dtype: torch.dtype,
    device_map: dict,
    device: torch.device,
    offload_dir: str | None,
    revision: str | None = None,
) -> nn.Module:
    """A model that does not fit its device budget: a local safetensors checkpoint is streamed block by
    block (blocks the map puts on the device stay loaded; models/lazy.py), anything else goes through
    accelerate's device map with disk offload under `offload_dir`."""
    from pascal_moe.models.base import decoder_layers
    from pascal_moe.models.lazy import LazyModel, checkpoint_files, streamed

    files = checkpoint_files(model)
    if files is None:
        return load_mapped(model, dtype, device_map, offload_dir, revision)
    lazy = LazyModel(model, files, dtype, device)
    names = {id(m): n for n, m in lazy.model.named_modules()}
    dev_key = (
        device.index if device.type == "cuda" and device.index is not None else 0 if device.type == "cuda" else "cpu"
    )
    resident = {
        i
        for i, layer in enumerate(decoder_layers(lazy.model))
        if _placed(device_map, names[id(layer)]) in (dev_key, str(device))
    }
    return streamed(lazy, resident).eval()


def _placed(device_map: dict, name: str):
    """The device the map gives module `name` (its own entry or its closest listed ancestor)."""
    parts = name.split(".")
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in device_map:
            return device_map[key]
    return None


def load_mapped(
    model: str, dtype: torch.dtype, device_map: dict, offload_dir: str | None, revision: str | None = None
) -> nn.Module:
    """from_pretrained with a device map: transformers converts checkpoint weights (fused experts) as it
    places them, re-saving converted disk-offloaded tensors under `offload_dir`; accelerate's hooks
    bring offloaded weights to the execution device module by module."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if offload_dir is not None:  # one folder per model: eval holds the fp and a quantized model at once
        import hashlib

        key = hashlib.sha1(str(Path(model).resolve() if Path(model).exists() else model).encode()).hexdigest()[:10]
        folder = Path(offload_dir) / f"{Path(model).name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(folder)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device_map, revision=revision, **kwargs)
    return m.eval()


def max_positions(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
