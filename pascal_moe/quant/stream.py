"""Streaming export: one safetensors shard per decoder block, written as soon as the block is frozen.

Why: with offloaded blocks the whole quantized model never exists in memory; peak memory is one
block plus one shard.  The shards hold exactly what `export.export` writes in one file (same
keys, same compressed-tensors packing via `pack_state_dict`, same config with
`quantization_config`), split by block, with a `model.safetensors.index.json`, so transformers +
compressed-tensors load the directory as before.  Checkpoint keys come from transformers' own
`revert_weight_conversion` (fused [E, O, I] experts back to per-expert Linear weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from pascal_moe.errors import PascalError
from pascal_moe.quant.export import NVFP4_REASON, NotPackable, ct_config, pack_state_dict
from pascal_moe.quant.schemes import Scheme


def unpackable_experts(model: PreTrainedModel, scheme: Scheme) -> str | None:
    """Why expert weights could not be packed (as `pack_state_dict` would refuse), read from shapes only.

    Checked before any block is written: a stream cannot fall back to fake-quantized half way.
    """
    from transformers.core_model_loading import revert_weight_conversion

    from pascal_moe.models.base import decoder_layers

    names = {id(m): n for n, m in model.named_modules()}
    for layer in decoder_layers(model):
        prefix = names[id(layer)]
        meta = {
            f"{prefix}.{k}": torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in layer.state_dict().items()
        }
        for key, t in revert_weight_conversion(model, meta).items():
            if ".experts." not in key or not key.endswith(("weight", "_proj", "_blocks")):
                continue
            if t.dim() != 2:
                return (
                    f"{key} is a {t.dim()}-D fused expert tensor in the checkpoint: "
                    "compressed-tensors packs 2-D Linear weights only"
                )
            if t.shape[-1] % scheme.group_size:
                return (
                    f"expert input dim {t.shape[-1]} is not a multiple of group size {scheme.group_size} "
                    "(compressed-tensors needs full groups)"
                )
    return None


class StreamExport:
    """Writes QDIR block by block: `block(i, ...)` after each frozen block, `finish(...)` at the end."""

    def __init__(self, model: PreTrainedModel, scheme: Scheme, out: Path, n_blocks: int, prefer: str = "auto"):
        self.model, self.scheme, self.out = model, scheme, out
        self.fake = scheme.fmt != "int" or prefer == "fake"
        self.reason = NVFP4_REASON if scheme.fmt != "int" else "--export-format fake"
        if not self.fake:
            why = unpackable_experts(model, scheme)
            if why is not None:
                self.fake, self.reason = True, why
        self.total = n_blocks + 1  # one shard per block + one for embeddings, final norm, lm_head
        self.weight_map: dict[str, str] = {}
        self.ragged: list[str] = []
        self.n_packed = 0
        self.prefer = prefer
        out.mkdir(parents=True, exist_ok=True)
        for f in out.glob("*.safetensors"):
            f.unlink()
        (out / "model.safetensors.index.json").unlink(missing_ok=True)

    def _checkpoint(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return {k: v.detach().to("cpu") for k, v in revert_weight_conversion(self.model, sd).items()}

    @staticmethod
    def _owned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors with their own storage (safetensors refuses views that share one); packing already
        replaced the large expert weights, so only what is left is copied."""
        return {k: v.contiguous().clone() if v._base is not None or not v.is_contiguous() else v for k, v in sd.items()}

    def _write(self, sd: dict[str, torch.Tensor], index: int) -> None:
        name = f"model-{index:05d}-of-{self.total:05d}.safetensors"
        sd = self._owned(sd)
        save_file(sd, self.out / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(sd, name))

    def block(self, i: int, prefix: str, layer: nn.Module, scales: dict[str, torch.Tensor]) -> None:
        """Write block i (its frozen weights, packed with its `scales`) as shard i + 1."""
        sd = self._checkpoint({f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
        if not self.fake:
            try:
                sd, ragged = pack_state_dict(sd, scales, self.scheme)
            except NotPackable as e:
                raise PascalError(
                    f"cannot stream a pack-quantized export: {e}; pass --export-format fake "
                    "(or quantize without --offload-dir)"
                ) from None
            self.ragged += ragged
            self.n_packed += sum(k.endswith(".weight_packed") for k in sd)
        self._write(sd, i + 1)

    def finish(self, block_prefixes: list[str], tokenizer) -> dict:
        """The last shard (non-block weights, tied copies dropped), the index, config and tokenizer."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        rest = {
            k: v
            for k, v in self.model.state_dict().items()
            if k not in tied and not any(k.startswith(p + ".") for p in block_prefixes)
        }
        self._write(self._checkpoint(rest), self.total)
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.model.config.save_pretrained(self.out)
        gen = getattr(self.model, "generation_config", None)
        if gen is not None and self.model.can_generate():
            gen.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)
        if self.fake:
            return {"format": "fake-quantized", "reason": self.reason, "streamed_shards": self.total}
        cfg_path = self.out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = ct_config(self.scheme, self.ragged)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return {
            "format": "pack-quantized",
            "compressed_modules": self.n_packed,
            "dequantized_on_grid": self.ragged,
            "streamed_shards": self.total,
        }
