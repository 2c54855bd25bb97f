"""llm-compressor GPTQ fed a pascal calibration Parquet, saved compressed, then measured by `pascal eval`.

Why: the comparison users care about is against what the toolkits already do about expert
coverage.  llm-compressor's answer is `moe_calibrate_all_experts` (oneshot's argument, a
`DatasetArguments` field in llmcompressor/args/dataset_arguments.py, applied in
entrypoints/oneshot.py through `moe_calibration_context()` of modeling/moe/context.py; the
linearized experts of modeling/moe/linear_experts.py then run every calibration token
through every expert while the layer output keeps only the routed ones).  It is on by
default; this runner quantizes with it on (`llmc-gptq`) and off (`llmc-gptq-noall`), both fed
exactly the `input_ids` rows of the same calib.parquet, so a calibration set can be judged
under the quantizer people actually use.

Schemes: int4-g128 is llm-compressor's W4A16 preset; int3-g128 and int2-g64 are the same
recipe with 3/2-bit symmetric int weights in groups.  A Linear narrower than the group
(the fine-grained bundled model's experts are 64 wide) gets one group per row, which is
what `pascal quantize` does with a ragged group, so both quantizers see the same grid.

    python benchmarks/downstream_quant.py --model data/models/qwen3-moe-fine --calib runs/x/calib.parquet \\
        --scheme int3-g128 --out runs/x/llmc-gptq-int3-g128 [--no-all-experts] [--eval-out runs/x/eval --domains all]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pascal_moe.errors import PascalError  # noqa: E402

IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*router$"]  # routers stay full precision, as in pascal quantize
SCHEMES = {"int4-g128": (4, 128), "int3-g128": (3, 128), "int2-g64": (2, 64)}


@dataclass
class DownstreamConfig:
    """One llm-compressor oneshot GPTQ run."""

    model: str
    calib: str  # calib.parquet or its directory (input_ids rows are fed as they are)
    out: str
    scheme: str = "int4-g128"
    all_experts: bool = True  # llm-compressor's moe_calibrate_all_experts (its default)
    seed: int = 0

    @property
    def method(self) -> str:
        return "llmc-gptq" if self.all_experts else "llmc-gptq-noall"


def calib_rows(calib: str) -> list[list[int]]:
    """The input_ids rows of a calibration Parquet (what `pascal quantize` reads, in the same order)."""
    import pyarrow.parquet as pq

    p = Path(calib)
    p = p / "calib.parquet" if p.is_dir() else p
    if not p.is_file():
        raise PascalError(f"calibration set not found: {calib} (pass a calib.parquet or its directory)")
    names = pq.read_schema(p).names
    if "input_ids" not in names:
        raise PascalError(f"{p} has no input_ids column: pass a calib.parquet written by `pascal balance`")
    rows = [list(map(int, r)) for r in pq.read_table(p, columns=["input_ids"]).column("input_ids").to_pylist()]
    if not rows or not all(rows):
        raise PascalError(f"{p} holds no rows or an empty input_ids row")
    return rows


def pattern(name: str) -> str:
    """A module name with its layer/expert numbers generalised: model.layers.3.mlp.experts.7.down_proj ->
    re:^model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.down_proj$ (one regex per kind of Linear)."""
    return "re:^" + r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split(".")) + "$"


def groups_by_width(model, group_size: int) -> dict[int, list[str]]:
    """{group size: target regexes} over every Linear that is quantized; narrower Linears get their width."""
    import torch

    ignored = [re.compile(i[3:]) if i.startswith("re:") else None for i in IGNORE]
    out: dict[int, set[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        if any(r is not None and r.match(name) for r in ignored):
            continue
        width = mod.in_features
        if width % group_size == 0:
            gs = group_size
        elif width < group_size:
            gs = width
        else:
            raise PascalError(f"{name} is {width} wide, not a multiple of the group size {group_size}: "
                              "pick a scheme whose group divides it")
        out.setdefault(gs, set()).add(pattern(name))
    return {gs: sorted(p) for gs, p in out.items()}


def recipe(model, scheme: str):
    """GPTQModifier for a scheme: the W4A16 preset when every Linear fits its groups, else explicit groups."""
    if scheme not in SCHEMES:
        raise PascalError(f"unknown --scheme {scheme!r}: use {', '.join(SCHEMES)}")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    bits, group = SCHEMES[scheme]
    by_width = groups_by_width(model, group)
    if scheme == "int4-g128" and set(by_width) == {128}:
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)
    groups = {f"group_{gs}": QuantizationScheme(targets=pats, weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs)) for gs, pats in by_width.items()}
    return GPTQModifier(config_groups=groups, ignore=IGNORE)


def quantize(cfg: DownstreamConfig) -> Path:
    """oneshot GPTQ on the calib rows.  OUT/compressed: llm-compressor's pack-quantized checkpoint; OUT: that
    checkpoint reloaded and dequantized (what `pascal eval --quantized OUT` reads) with quantize.json
    (method llmc-gptq[-noall], scheme, calib, how it was reloaded).  Skipped when OUT/quantize.json exists."""
    if (Path(cfg.out) / "quantize.json").is_file():
        return Path(cfg.out)
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pascal_moe.io.artifacts import fingerprint_model, sha256_file, versions, write_json

    if cfg.scheme not in SCHEMES:
        raise PascalError(f"unknown --scheme {cfg.scheme!r}: use {', '.join(SCHEMES)}")
    rows = calib_rows(cfg.calib)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    linearize_moe(model)  # expert Linears get their own names before the recipe is matched against them
    ds = Dataset.from_dict({"input_ids": rows})
    oneshot(model=model, processor=tok, recipe=recipe(model, cfg.scheme), dataset=ds,
            num_calibration_samples=len(rows), max_seq_length=max(map(len, rows)), batch_size=1,
            moe_calibrate_all_experts=cfg.all_experts)
    out = Path(cfg.out)
    comp = out / "compressed"
    model.save_pretrained(comp, save_compressed=True)
    tok.save_pretrained(comp)
    del model
    calib = Path(cfg.calib)
    calib = calib / "calib.parquet" if calib.is_dir() else calib
    meta = {"scheme": cfg.scheme, "method": cfg.method, "quantizer": "llmcompressor.oneshot GPTQModifier",
                "moe_calibrate_all_experts": cfg.all_experts, "settings": asdict(cfg),
                "calib": {"path": str(calib), "sha256": sha256_file(calib), "samples": len(rows),
                          "tokens": sum(map(len, rows))},
                "model_fingerprint": fingerprint_model(cfg.model), "seconds": round(time.perf_counter() - t0, 2),
                "versions": versions()}
    write_json(meta, comp / "quantize.json")
    _, how = reload_dense(comp, cfg.model, out)
    write_json(meta | {"compressed": "compressed", "reloaded_with": how}, out / "quantize.json")
    return out


def mixed_expert_schemes(qdir: Path) -> bool:
    """True when the experts' Linears fall in more than one config group (transformers cannot load that)."""
    groups = json.loads((qdir / "config.json").read_text())["quantization_config"]["config_groups"].values()
    return sum(any("experts" in t for t in g["targets"]) for g in groups) > 1


def _decompress_per_module(qdir: Path, base: str):
    """The fp model with every quantized Linear replaced by its dequantized weight, each under its own scheme.

    Why not transformers alone: its fused-experts loader applies one scheme to every expert
    projection (integrations/compressed_tensors.py `get_experts_scheme`), so a checkpoint
    whose experts use two group sizes (64-wide down_proj beside 128-wide gate/up) fails to
    load.  Here the base model is linearized like llm-compressor did before saving, each
    `weight_packed` is decompressed by compressed-tensors with the scheme of the config group
    its name matches, and the experts are repacked into transformers' fused layout.
    """
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from llmcompressor.modeling.moe.linearize import linearize_moe, repack_moe
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    qcfg = QuantizationConfig.model_validate(json.loads((qdir / "config.json").read_text())["quantization_config"])
    state: dict[str, torch.Tensor] = {}
    for f in sorted(qdir.glob("*.safetensors")):
        state.update(load_file(f))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    linearize_moe(model)
    mods = dict(model.named_modules())
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        scheme = next((g for g in qcfg.config_groups.values() if any(match_name(name, t) for t in g.targets)), None)
        if scheme is None or name not in mods:
            raise PascalError(f"{qdir}: no config group or module for {name}: "
                              f"not an llm-compressor checkpoint of {base}")
        holder = torch.nn.Module()
        for part in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            if f"{name}.{part}" in state:
                holder.register_parameter(part, torch.nn.Parameter(state[f"{name}.{part}"], requires_grad=False))
        holder.quantization_scheme = scheme
        BaseCompressor.get_value_from_registry(scheme.format or CompressionFormat.pack_quantized.value
                                               ).decompress_module(holder)
        with torch.no_grad():
            mods[name].weight.copy_(holder.weight.to(mods[name].weight.dtype))
    return repack_moe(model)


def reload_dense(qdir: Path, base: str, out: Path) -> tuple[Path, str]:
    """OUT: the compressed checkpoint QDIR reloaded and dequantized, saved dense for `pascal eval`; and how it
    was loaded (transformers' own compressed-tensors loader when it can, else per-module decompression)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from pascal_moe.models.loading import load_tokenizer

    if mixed_expert_schemes(qdir):
        model, how = _decompress_per_module(qdir, base), "compressed-tensors per module (mixed expert groups)"
    else:
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32,  # decompressed while loading
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        how = "transformers+compressed-tensors"
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # a plain model saves plainly
    want = dense.state_dict()
    got = {k: v for k, v in model.state_dict().items() if k in want}  # drops leftover weight_scale/_shape
    missing = sorted(set(want) - set(got))
    if missing:
        raise PascalError(f"{qdir} does not match {base}: no dequantized {', '.join(missing[:3])}")
    dense.load_state_dict(got)
    dense.save_pretrained(out)
    load_tokenizer(str(qdir)).save_pretrained(out)
    shutil.copy(qdir / "quantize.json", out / "quantize.json")
    return out, how


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calib.parquet (or its directory) with input_ids")
    ap.add_argument("--out", required=True, help="directory for the compressed model")
    ap.add_argument("--scheme", default="int4-g128", choices=sorted(SCHEMES))
    ap.add_argument("--no-all-experts", action="store_true", help="moe_calibrate_all_experts=False (routed only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-out", help="then run `pascal eval` of OUT against --model into this directory")
    ap.add_argument("--domains", help="pascal eval --domains (e.g. all)")
    a = ap.parse_args(argv)
    try:
        q = quantize(DownstreamConfig(a.model, a.calib, a.out, a.scheme, not a.no_all_experts, a.seed))
        if a.eval_out:
            from pascal_moe.evaluate.config import EvalConfig
            from pascal_moe.evaluate.run import run

            run(EvalConfig(model=a.model, out=a.eval_out, quantized=[str(q)], domains=a.domains))
    except PascalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"quantized": str(q), "eval": a.eval_out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
