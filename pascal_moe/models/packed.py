"""Dense weights from a pack-quantized (compressed-tensors) checkpoint, a few tensors at a time.

Why: transformers decompresses a compressed-tensors checkpoint while it loads the whole model, and
that decompression drops accelerate's offload hooks mid-forward, so an over-budget quantized model
could only be loaded whole.  Decompressing each block's packed tensors ourselves (with
compressed-tensors' own `PackedQuantizationCompressor.decompress`, the function transformers' load
calls) lets a quantized model be streamed block by block like a dense one (models/lazy.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

_PARTS = (".weight_packed", ".weight_scale", ".weight_shape")


def quantization_config(model: str | Path) -> dict | None:
    """The `quantization_config` of a local model directory's config.json; None when it has none."""
    f = Path(model) / "config.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("quantization_config") or None


def pack_scheme(qc: dict) -> QuantizationScheme | None:
    """The single pack-quantized scheme of a compressed-tensors config (what `pascal quantize` writes);
    None for anything else (other formats, several groups), which is then loaded whole by transformers."""
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        return None
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig.model_validate(qc)
    if len(cfg.config_groups) != 1:
        return None
    scheme = next(iter(cfg.config_groups.values()))
    return scheme if scheme.format in (None, "pack-quantized") else None


def decompress(sd: dict[str, torch.Tensor], scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """`sd` with each module's weight_packed/weight_scale/weight_shape replaced by its dense `weight`."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    out = {}
    for k, v in sd.items():
        if k.endswith(".weight_packed"):
            base = k[: -len(".weight_packed")]
            local = {"weight_packed": v, "weight_scale": sd[f"{base}.weight_scale"]}
            local["weight_shape"] = sd[f"{base}.weight_shape"]
            out[f"{base}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        elif not k.endswith(_PARTS[1:]):
            out[k] = v
    return out
