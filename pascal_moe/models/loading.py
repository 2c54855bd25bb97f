"""Load a model and tokenizer from a local directory or hub id, with one-line errors."""

from __future__ import annotations

import torch
from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.models.hub import ModelRef, resolve

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


def load_model(model: str, device: str = "auto", dtype: str = "auto", *, revision: str | None = None) -> nn.Module:
    """An eval-mode causal LM (transformers' default expert kernel; routing is read from router hooks)."""
    from transformers import AutoModelForCausalLM

    ref = _check_source(model, revision)
    dev = resolve_device(device)
    try:
        m = AutoModelForCausalLM.from_pretrained(
            ref.source, dtype=resolve_dtype(dtype, dev), revision=ref.load_revision
        )
    except PascalError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PascalError(f"cannot load model {model}: {str(e).splitlines()[0]}") from e
    return m.to(dev).eval()


def max_positions(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
