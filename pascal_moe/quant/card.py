"""The model card (README.md) written beside a quantized checkpoint, in the fields the hub reads.

Why: the hub links a quantized model to its base through `base_model` + `base_model_relation`,
lists it by `library_name` and `tags`, and a user needs to see which calibration set (path and
sha256) and which method produced it before trusting a number measured on it.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _hub_id(model: str) -> str | None:
    """A hub id (`org/name`) the hub can link to; None for a local directory."""
    return None if Path(model).exists() or model.startswith((".", "/", "~")) else model


def model_card(meta: dict, model: str) -> str:
    """README.md: YAML front matter (base_model, tags, library_name, quantization) + what, how, from which data."""
    calib = meta.get("calib") or {}
    fmt = (meta.get("export") or {}).get("format")
    front: dict = {}
    if (hub := _hub_id(model)) is not None:
        front |= {"base_model": hub, "base_model_relation": "quantized"}
    front |= {
        "library_name": "transformers",
        "tags": ["pascal-moe", "mixture-of-experts", "quantized", meta["scheme"], meta["method"]]
        + (["compressed-tensors"] if fmt == "pack-quantized" else []),
        "pascal_moe": {
            "base_model_path": model,
            "base_model_fingerprint": meta.get("model_fingerprint"),
            "scheme": meta["scheme"],
            "grid": meta.get("grid"),
            "method": meta["method"],
            "export_format": fmt,
            "calibration": {
                "path": calib.get("path"),
                "sha256": calib.get("sha256"),
                "tokens": calib.get("tokens"),
                "rows_used": calib.get("rows_used"),
            },
        },
    }
    grid = {
        "ct": "compressed-tensors' symmetric grid (scale = amax / ((2^b - 1) / 2))",
        "full": "the full-range symmetric grid (scale = +-amax / 2^(b-1), negative where the group's larger side "
        "is positive; compressed-tensors dequantizes q * scale as stored)",
    }.get(meta.get("grid") or "")
    load = (
        "`AutoModelForCausalLM.from_pretrained(this_folder)` (compressed-tensors decompresses the packed weights)"
        if fmt == "pack-quantized"
        else "`AutoModelForCausalLM.from_pretrained(this_folder)` (weights on the "
        f"quantization grid, stored dense: {(meta.get('export') or {}).get('reason', '')})"
    )
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False, width=120) + "---\n"
        f"# `{model}` quantized to {meta['scheme']} with {meta['method']}\n\n"
        + (f"Grid: {grid}.\n" if grid else "")
        + f"Made by `pascal quantize` (pascal-moe) from `{model}` (fingerprint `{meta.get('model_fingerprint')}`).\n"
        f"Calibration: `{calib.get('path')}` (sha256 `{calib.get('sha256')}`), {calib.get('tokens')} tokens in "
        f"{calib.get('rows_used')} rows.\n\nLoad: {load}.\n"
        "Settings, per-block losses, per-expert token counts and versions are in `quantize.json`.\n"
    )
