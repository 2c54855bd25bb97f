"""Round-to-nearest weight error of our symmetric int grid vs the auto-round library's, on a model's expert weights.

Why: at equal SignRound steps the library's int2 models beat ours (docs/evidence.md).  The two
"symmetric" grids differ before any tuning: ours is compressed-tensors' (scale = amax / ((2^b - 1) / 2),
codes [-2^(b-1), 2^(b-1) - 1], so a packed checkpoint reloads bit-exactly), the library's `int_sym`
is full-range (scale = ±amax / 2^(b-1), its sign chosen so the larger side of the group gets the
extra level).  This measures how much of a gap the grid alone makes: relative squared error
Σ(w - q(w))² / Σw² over every expert weight, RTN only, both quantizers' own functions; `pascal_full`
is our `intB-gN-full` scheme (the library's grid in our code, packed with negative scales).

    python benchmarks/sym_grids.py --model data/models/qwen3-moe-fine [--out benchmarks/results/sym_grids.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

from downstream_quant import SCHEMES  # noqa: E402


def errors(model: str, scheme: str) -> dict[str, float]:
    """{'pascal': ..., 'pascal_full': ..., 'auto_round': ...}: relative RTN error over the expert weights."""
    from auto_round.data_type.int import quant_tensor_sym
    from safetensors.torch import load_file

    from pascal_moe.quant.schemes import fake_quantize, parse_scheme

    bits, group = SCHEMES[scheme]
    ours, full = parse_scheme(scheme), parse_scheme(f"{scheme}-full")
    ws = [
        v.float()
        for f in sorted(Path(model).glob("*.safetensors"))
        for k, v in load_file(f).items()
        if ".experts." in k and v.dim() == 2
    ]  # per-expert [O, I] weights (the bundled checkpoints' layout)
    if not ws:
        raise SystemExit(f"{model}: no per-expert 2-D weights (model.layers.N.mlp.experts.E.*.weight) found")
    total = sum(float((w**2).sum()) for w in ws)
    err_ours = sum(float(((fake_quantize(w, ours, 1) - w) ** 2).sum()) for w in ws)
    err_full = sum(float(((fake_quantize(w, full, 1) - w) ** 2).sum()) for w in ws)
    err_lib = sum(float(((quant_tensor_sym(w, bits=bits, group_size=group)[0] - w) ** 2).sum()) for w in ws)
    return {
        "pascal": err_ours / total,
        "pascal_full": err_full / total,
        "auto_round": err_lib / total,
        "expert_weights": len(ws),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/models/qwen3-moe-fine")
    ap.add_argument("--schemes", nargs="+", default=["int4-g128", "int3-g128", "int2-g64"])
    ap.add_argument("--out", help="write the numbers to this JSON file too")
    a = ap.parse_args(argv)
    res = {s: errors(a.model, s) for s in a.schemes}
    for s, r in res.items():
        print(
            f"{s}: relative RTN error over {r['expert_weights']} expert weights: ours {r['pascal']:.4f}, "
            f"ours -full {r['pascal_full']:.4f}, auto-round int_sym {r['auto_round']:.4f}"
        )
    if a.out:
        Path(a.out).write_text(
            json.dumps({"model": a.model, "command": " ".join(["python", *sys.argv]), "results": res}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
