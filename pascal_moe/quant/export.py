"""Write QDIR: a checkpoint `AutoModelForCausalLM.from_pretrained(QDIR)` loads.

Integer schemes are written in compressed-tensors `pack-quantized` layout (symmetric, group-wise:
`weight_packed`, `weight_scale`, `weight_shape` per Linear; per-expert keys
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.*` for fused experts, the layout vLLM serves).
transformers 5.17 + compressed-tensors 0.19 load it: attention/shared Linear layers through the
compressed-tensors quantizer, fused experts through its `DecompressExperts` conversion (they are
dequantized and merged back into gate_up_proj/down_proj at load).  The compressor is
compressed-tensors' own (`PackedQuantizationCompressor.compress`) fed with our scales, so the
codes are exactly ours.  Routers, norms, embeddings and lm_head stay full precision.

nvfp4 (and `--export-format fake`) writes the fake-quantized weights, exactly on the grid, as a
plain checkpoint: our emulated NVFP4 multiplies by the global scale while compressed-tensors
divides by its inverse, so a packed nvfp4 file would not reproduce our weights bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.quant.schemes import Scheme

NVFP4_REASON = (
    "fake-quantized: our NVFP4 emulation multiplies by amax/2688 while compressed-tensors divides by "
    "its inverse 2688/amax; on a 256x256 Gaussian test weight 61% of the dequantized values differ in "
    "the last bits, so nvfp4-pack-quantized would not reload our weights bit-exactly"
)
IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*mlp\\.router$"]


def check_export(out: Path, scheme: Scheme, prefer: str = "auto") -> None:
    """Fail in one line, before any block work, when QDIR could not be written.

    pack-quantized needs compressed-tensors; the directory must be creatable and writable.  The
    probe creates the missing directories and a file, then removes exactly what it created.
    """
    if scheme.fmt == "int" and prefer == "auto":
        try:
            import compressed_tensors.compressors  # noqa: F401
        except ImportError:
            raise PascalError(
                "compressed-tensors is not importable: `pip install compressed-tensors` (the export "
                "format of int schemes) or pass --export-format fake"
            ) from None
    if out.exists() and not out.is_dir():
        raise PascalError(f"--out {out} exists and is not a directory: pass a directory path")
    made: list[Path] = []
    try:
        for d in reversed([out, *out.parents]):
            if not d.exists():
                d.mkdir()
                made.append(d)
        fd, probe = tempfile.mkstemp(prefix=".pascal-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PascalError(f"cannot write to --out {out}: {e.strerror or e} (pass a writable directory)") from None
    finally:
        for d in reversed(made):
            d.rmdir()


def ct_scheme(scheme: Scheme):
    """The compressed-tensors QuantizationScheme of a symmetric group-wise int scheme (weight-only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=True, strategy="group", group_size=scheme.group_size
    )
    return QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


def ct_config(scheme: Scheme, extra_ignore: list[str] = ()) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(
        config_groups={"group_0": ct_scheme(scheme)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=IGNORE + list(extra_ignore),
    )
    return cfg.model_dump(exclude_none=True) | {"quant_method": "compressed-tensors"}


# How fused expert tensors are saved, per family: (rename of the module path, gate_up parts, down parts).
EXPERT_LAYOUTS = [
    ("", ("gate_proj", "up_proj"), ("down_proj",)),  # Qwen-MoE, OLMoE, DeepSeek, GLM
    (".block_sparse_moe.", ("w1", "w3"), ("w2",)),
]  # Mixtral (transformers renames it to .mlp.)


def checkpoint_scales(scales: dict[str, torch.Tensor], keys: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Map our per-parameter scales [R, G] onto saved checkpoint keys (per-expert keys for fused tensors).

    Fused gate_up_proj [E, 2I, H] -> experts.e.gate_proj.weight rows [:I], experts.e.up_proj.weight rows [I:];
    fused down_proj [E, H, I] -> experts.e.down_proj.weight (Mixtral: block_sparse_moe.experts.e.w1/w3/w2).
    Raises KeyError on a layout we cannot map.
    """
    out: dict[str, torch.Tensor] = {}
    for name, s in scales.items():
        if name in keys:
            out[name] = s.view(keys[name][0], -1)
            continue
        prefix, param = name.rsplit(".", 1)
        for rename, gate_up, down in EXPERT_LAYOUTS:
            pre = prefix.replace(".mlp.", rename) if rename else prefix
            parts = gate_up if param == "gate_up_proj" else down if param == "down_proj" else ()
            if parts and f"{pre}.0.{parts[0]}.weight" in keys:
                break
        else:
            raise KeyError(name)
        rows = keys[f"{pre}.0.{parts[0]}.weight"][0]
        n_experts = s.shape[0] // (rows * len(parts))
        per = s.view(n_experts, rows * len(parts), -1)  # [E, O, G]
        for e in range(n_experts):
            for j, part in enumerate(parts):
                out[f"{pre}.{e}.{part}.weight"] = per[e, j * rows : (j + 1) * rows]
    return out


class NotPackable(Exception):
    """The checkpoint cannot be written pack-quantized (the reason is the message)."""


def pack_state_dict(
    sd: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], scheme: Scheme
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Replace every quantized `*.weight` by compressed-tensors' weight_packed/weight_scale/weight_shape.

    compressed-tensors needs the input dim to be a multiple of the group size: a Linear whose
    input dim is not (e.g. DeepSeek's q_lora_rank 96 at g128) keeps its on-grid dequantized
    weight and is listed in `ignore` (returned); such a fused expert tensor raises NotPackable.
    """
    from compressed_tensors.compressors import PackedQuantizationCompressor

    cts = ct_scheme(scheme)
    try:
        by_key = checkpoint_scales(scales, {k: v.shape for k, v in sd.items()})
    except KeyError as e:
        raise NotPackable(f"cannot map {e.args[0]} onto checkpoint keys") from e
    fused = [k for k in by_key if sd[k].dim() != 2]
    if fused:  # GPT-OSS saves its experts as one [E, H, 2I] tensor, not per-expert Linear weights
        raise NotPackable(
            f"{fused[0]} is a {sd[fused[0]].dim()}-D fused expert tensor in the checkpoint: "
            "compressed-tensors packs 2-D Linear weights only"
        )
    ragged = [k for k in by_key if sd[k].shape[-1] % scheme.group_size]
    if any(".experts." in k for k in ragged):
        raise NotPackable(
            f"expert input dim {sd[next(k for k in ragged if '.experts.' in k)].shape[-1]} is not a "
            f"multiple of group size {scheme.group_size} (compressed-tensors needs full groups)"
        )
    out = {k: v for k, v in sd.items() if k not in by_key or k in ragged}
    for key, s in by_key.items():
        if key in ragged:
            continue
        base = key[: -len(".weight")]
        packed = PackedQuantizationCompressor.compress({"weight": sd[key].float(), "weight_scale": s.float()}, cts)
        for name, t in packed.items():
            out[f"{base}.{name}"] = t.contiguous()
    return out, [k[: -len(".weight")] for k in ragged]


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def export(
    model: nn.Module, tokenizer, scheme: Scheme, scales: dict[str, torch.Tensor], out: Path, prefer: str = "auto"
) -> dict:
    """Write QDIR; returns what was written ({"format", "reason"?, "compressed_modules"?})."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    if scheme.fmt != "int" or prefer == "fake":
        model.save_pretrained(out)
        return {"format": "fake-quantized", "reason": NVFP4_REASON if scheme.fmt != "int" else "--export-format fake"}
    with tempfile.TemporaryDirectory(prefix="pascal-export-") as tmp:
        model.save_pretrained(tmp)
        files = sorted(Path(tmp).glob("*.safetensors"))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(f))
        try:
            packed, ragged = pack_state_dict(sd, scales, scheme)
        except NotPackable as e:
            model.save_pretrained(out)
            return {"format": "fake-quantized", "reason": str(e)}
        for f in out.glob("*.safetensors"):
            f.unlink()
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
        _copy_side_files(Path(tmp), out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = ct_config(scheme, ragged)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    n = sum(k.endswith(".weight_packed") for k in packed)
    return {"format": "pack-quantized", "compressed_modules": n, "dequantized_on_grid": ragged}


def decompress_state_dict(qdir: Path) -> dict[str, torch.Tensor]:
    """Dequantized weights of a pack-quantized QDIR via compressed-tensors' own decompressor (for checks)."""
    from pascal_moe.models.packed import decompress, pack_scheme, quantization_config

    scheme = pack_scheme(quantization_config(qdir) or {})
    if scheme is None:
        raise PascalError(f"{qdir} is not a pack-quantized checkpoint (its config has no such quantization_config)")
    return decompress(load_file(qdir / "model.safetensors"), scheme)
