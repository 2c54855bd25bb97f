"""The auto-round library (Intel's AutoRound) fed a pascal calibration Parquet, saved dense for `pascal eval`.

Why: the evidence matrix compares calibration sets under the quantizers people actually use.
Our `pascal quantize --method autoround` is a re-implementation of SignRound; this runner asks
the library itself, at the same scheme and the same number of steps, so "does the set help"
and "does our SignRound match the original" are both measured by the same `pascal eval`.

What the library does with Qwen3-MoE under transformers 5 (auto-round 0.15.1, checked on the
bundled models): it unfuses the fused `Qwen3MoeExperts` tensors into one Linear per expert and
projection (transformers' `linear_loop` experts interface, auto_round/modeling/fused_moe), so
every expert weight is quantized, with the attention Linears; the router (`mlp.gate`) and lm_head
stay full precision, as in `pascal quantize`.  A Linear narrower than the group (the 64-wide expert
`down_proj` under g128) is zero-padded to one group per row, which is also what we do.

Fed: `pascal export-calib --format autoround` of the set (AutoRound skips rows shorter than
`seqlen`; the export packs every token into full rows), nsamples = its rows.  Run in float32
(`amp=False`: the library would otherwise cast the model to bf16 on CPU; ours calibrates in fp32).
Out: the fake-quantized weights written in the base checkpoint's own per-expert layout, which
transformers loads exactly as it loads the base model; quantize.json records which Linears were
quantized and how far any weight lies from its grid (0 when exact).

    python benchmarks/autoround_lib.py --model data/models/qwen3-moe-fine --calib runs/x/calib.parquet \\
        --scheme int2-g64 --iters 25 --out runs/x/autoround-lib-int2-g64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

from downstream_quant import SCHEMES  # noqa: E402

from pascal_moe.errors import PascalError  # noqa: E402

METHOD = "autoround-lib"


@dataclass
class AutoRoundLibConfig:
    """One auto-round library run (symmetric int weights, group-wise)."""

    model: str  # a local checkpoint directory (its safetensors key layout is reused for the output)
    calib: str  # calib.parquet or its directory
    out: str
    scheme: str = "int4-g128"
    iters: int = 25  # SignRound steps per block (the matrix's quantize.iters)
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"


def _base_keys(model: str) -> set[str]:
    """Tensor names of the base checkpoint (per-expert keys for the bundled Qwen3-MoE models)."""
    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors"))
    if not files:
        raise PascalError(f"{model} has no *.safetensors: the auto-round runner needs a local checkpoint directory")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys.update(h.keys())
    return keys


def grid_error(weight, scale, group_size: int, bits: int) -> tuple[float, int, int]:
    """(max |w/s - round(w/s)|, min code, max code) of a fake-quantized Linear weight [O, I] and its scales [O, G].

    Groups run along the input dim; the last one is zero-padded like the library does.
    """
    import torch

    w = weight.detach().float()
    out_f, in_f = w.shape
    gs = in_f if group_size <= 0 else group_size
    pad = (-in_f) % gs
    g = torch.nn.functional.pad(w, (0, pad)).view(out_f, -1, gs)  # [O, G, gs]
    q = g / scale.detach().float().view(out_f, -1, 1)
    codes = q.round()
    return float((q - codes).abs().max()), int(codes.min()), int(codes.max())


def quantize(cfg: AutoRoundLibConfig) -> Path:
    """AutoRound on the packed calib rows; OUT: dense fake-quantized checkpoint + quantize.json (skipped if present)."""
    out = Path(cfg.out)
    if (out / "quantize.json").is_file():
        return out
    if cfg.scheme not in SCHEMES:
        raise PascalError(f"unknown --scheme {cfg.scheme!r}: use {', '.join(SCHEMES)}")
    import torch
    from auto_round import AutoRound
    from auto_round import __version__ as ar_version
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pascal_moe.balance.config import ExportConfig
    from pascal_moe.balance.export import autoround_dataset
    from pascal_moe.balance.export import run as export_run
    from pascal_moe.io.artifacts import calib_file, fingerprint_model, sha256_file, versions, write_json
    from pascal_moe.models.loading import load_tokenizer

    bits, group = SCHEMES[cfg.scheme]
    keys = _base_keys(cfg.model)
    calib = calib_file(cfg.calib)
    exported = export_run(ExportConfig(calib=str(calib), format="autoround", out=str(out / "calib")))
    info = json.loads((exported.parent / "export.json").read_text())
    rows = autoround_dataset(exported)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    tok = load_tokenizer(cfg.model)
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=True, dataset=rows, seqlen=info["seq_len"],
                   nsamples=len(rows), iters=cfg.iters, batch_size=min(cfg.batch_size, len(rows)), seed=cfg.seed,
                   amp=False, enable_torch_compile=False, device_map=cfg.device)
    qmodel, layer_cfg = ar.quantize()
    seconds = round(time.perf_counter() - t0, 2)
    quantized = sorted(n for n, c in layer_cfg.items() if int(c.get("bits") or 16) < 16)
    linears = sorted(n for n, m in qmodel.named_modules() if isinstance(m, torch.nn.Linear))
    worst, lo, hi = 0.0, 0, 0
    for name in quantized:
        mod = qmodel.get_submodule(name)
        err, a, b = grid_error(mod.weight, mod.scale, int(layer_cfg[name].get("group_size") or group), bits)
        worst, lo, hi = max(worst, err), min(lo, a), max(hi, b)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in qmodel.state_dict().items() if k in keys}
    missing = sorted(keys - set(state))
    if missing:
        raise PascalError(f"auto-round's model lacks {len(missing)} tensors of {cfg.model} (e.g. {missing[0]}): "
                          "its module layout no longer matches the checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        if (Path(cfg.model) / f).is_file():
            shutil.copy(Path(cfg.model) / f, out / f)
    tok.save_pretrained(out)
    write_json({"scheme": cfg.scheme, "method": METHOD, "quantizer": f"auto_round.AutoRound {ar_version}",
                "settings": asdict(cfg), "library_args": {"bits": bits, "group_size": group, "sym": True,
                                                          "iters": cfg.iters, "amp": False},
                "calib": {"path": str(calib), "sha256": sha256_file(calib), "export": info},
                "quantized_linears": len(quantized), "linears": len(linears),
                "expert_linears_quantized": sum(".experts." in n for n in quantized),
                "expert_linears": sum(".experts." in n for n in linears),
                "unquantized": [n for n in linears if n not in set(quantized)],
                "grid": {"max_offset": worst, "codes": [lo, hi], "allowed": [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]},
                "model_fingerprint": fingerprint_model(cfg.model), "seconds": seconds, "versions": versions()},
               out / "quantize.json")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calib.parquet (or its directory)")
    ap.add_argument("--out", required=True, help="directory for the dense fake-quantized model")
    ap.add_argument("--scheme", default="int4-g128", choices=sorted(SCHEMES))
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        q = quantize(AutoRoundLibConfig(a.model, a.calib, a.out, a.scheme, a.iters, a.batch_size, a.seed))
    except PascalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"quantized": str(q)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
