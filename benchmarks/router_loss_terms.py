"""How large is each router-alignment term on real routers? TopK-MSE vs the sigmoid-aware term.

Why: VSRAQ's value loss is 0.7 · TopK-MSE + 0.3 · L_sig at the paper's α_v = 0.3; when L_sig is
orders of magnitude smaller, vsraq at the same λ aligns the top-k logits less than topk does.
Measured between the fp model and a quantized one (e.g. an rtn export) on held-out seed text.

    python benchmarks/router_loss_terms.py --quantized QWEN_QDIR --model data/models/qwen3-moe-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pascal_moe.evaluate.metrics import capture_routers  # noqa: E402
from pascal_moe.models import moe_layers  # noqa: E402
from pascal_moe.models.loading import load_model, load_tokenizer  # noqa: E402
from pascal_moe.quant import losses as L  # noqa: E402


def router_logits_on(path: str, ids: list[list[int]]) -> tuple[list, list[torch.Tensor]]:
    model = load_model(path, "cpu", "auto")
    layers = moe_layers(model)
    with torch.no_grad(), capture_routers(layers) as store:
        for i in ids:
            model(input_ids=torch.tensor([i]))
    return layers, [torch.cat(s) for s in store]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantized", required=True)
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "router_loss_terms.json"))
    a = ap.parse_args()
    tok = load_tokenizer(a.model)
    seed = pd.read_parquet(ROOT / "data" / "seed" / "seed.parquet")
    texts = seed[seed["split"] == "heldout"]["text"].tolist()[: a.texts]
    ids = [tok(t, truncation=True, max_length=a.seq_len)["input_ids"] for t in texts]
    layers, zfp = router_logits_on(a.model, ids)
    _, zq = router_logits_on(a.quantized, ids)
    rows = []
    for lay, f, q in zip(layers, zfp, zq):
        pi, k = L.fp_order(lay.choice_scores(f)), lay.spec.top_k
        t, s = L.topk_mse(q, f, pi, k).mean().item(), L.sigmoid_aware(q, f, pi, k).mean().item()
        rows.append({"layer": lay.ordinal, "topk_mse": t, "sigmoid_aware": s, "ratio": t / max(s, 1e-12)})
        print(f"layer {lay.ordinal}: TopK-MSE {t:.3e}  L_sig {s:.3e}  ratio {t / max(s, 1e-12):.0f}")
    result = {"command": "python " + " ".join(sys.argv), "model": a.model, "quantized": a.quantized,
              "tokens": sum(map(len, ids)), "layers": rows}
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    old[Path(a.model).name] = result
    out.write_text(json.dumps(old, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
