"""Router-aligned quantization vs AutoRound-style baselines, and our `autoround` vs the auto-round library.

Part 1 (both bundled models, int3-g128 and int2-g64): rtn / autoround / topk / vsraq on one calibration
set (seed-corpus train split -> calib.parquet), scored on held-out text (seed heldout split) by the
mean per-layer expert-selection Jaccard vs fp and by perplexity.
Part 2 (qwen3-moe-tiny, int4-g128 = W4A16): our `--method autoround` vs `auto_round.AutoRound` on the
same calibration texts, iterations and sequence length: perplexity and seconds per block.

Run: python benchmarks/quant_vs_autoround.py [--iters 20] [--n-samples 64] [--seq-len 256]
Writes benchmarks/results/quant_vs_autoround.json and .png.  Small iteration counts keep it to
minutes on 2 CPU cores; the numbers are for ranking methods, not for absolute quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pascal_moe.io.batches import batches, tokenize  # noqa: E402
from pascal_moe.io.texts import load_texts  # noqa: E402
from pascal_moe.models import moe_layers, router_logits  # noqa: E402
from pascal_moe.quant.config import QuantizeConfig  # noqa: E402
from pascal_moe.quant.run import run as quantize  # noqa: E402

METHODS = ("rtn", "autoround", "topk", "vsraq")
SCHEMES = ("int3-g128", "int2-g64")
RESULTS = REPO / "benchmarks" / "results"


@torch.no_grad()
def evaluate(model, token_ids: list[list[int]], pad_id: int) -> tuple[float, list[list[torch.Tensor]]]:
    """(perplexity, per MoE layer the selected experts [n, k] of each batch) on held-out tokens."""
    layers = moe_layers(model)
    logs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [m.router.register_forward_hook(lambda _m, _a, out, i=i: logs[i].append(router_logits(out)))
             for i, m in enumerate(layers)]
    nll, count, sel = 0.0, 0, [[] for _ in layers]
    try:
        for b in batches(token_ids, 8, pad_id):
            for lg in logs:
                lg.clear()
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            mask = b.attention_mask[:, 1:].bool()
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b.input_ids[:, 1:].flatten(),
                                                   reduction="none").view_as(mask)
            nll += float(ce[mask].sum())
            count += int(mask.sum())
            real = b.attention_mask.reshape(-1).bool()
            for i, m in enumerate(layers):
                sel[i].append(m.select(logs[i][-1][real])[1])  # [n, k]
    finally:
        for h in hooks:
            h.remove()
    return float(torch.exp(torch.tensor(nll / count))), sel


def jaccard(fp: list[list[torch.Tensor]], q: list[list[torch.Tensor]]) -> list[float]:
    """Mean over tokens of |T_fp ∩ T_q| / |T_fp ∪ T_q|, per MoE layer."""
    out = []
    for fl, ql in zip(fp, q):
        a, b = torch.cat(fl), torch.cat(ql)  # [n, k]
        inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).float()
        out.append(float((inter / (2 * a.shape[1] - inter)).mean()))
    return out


def load(path: Path | str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def part1(model_dir: Path, calib: Path, held: list[list[int]], pad: int, args, work: Path) -> dict:
    fp_ppl, fp_sel = evaluate(load(model_dir), held, pad)
    res = {"fp_ppl": fp_ppl, "runs": []}
    for scheme in args.schemes:
        for method in args.methods:
            out = work / f"{model_dir.name}-{scheme}-{method}"
            base, *flags = method.split("+")  # e.g. vsraq+down (downstream router), vsraq+sel (selective tokens)
            cfg = QuantizeConfig(model=str(model_dir), calib=str(calib), out=str(out), scheme=scheme, method=base,
                                 downstream_router="down" in flags, selective_tokens="sel" in flags,
                                 iters=args.iters, lr=args.lr, tokens=args.n_samples * args.seq_len,
                                 seq_len=args.seq_len,
                                 batch_size=args.batch_size, device="cpu", min_expert_tokens=args.min_expert_tokens)
            quantize(cfg)
            meta = json.loads((out / "quantize.json").read_text())
            ppl, sel = evaluate(load(out), held, pad)
            jac = jaccard(fp_sel, sel)
            row = {"scheme": scheme, "method": method, "ppl": ppl, "jaccard_mean": sum(jac) / len(jac),
                   "jaccard_per_layer": jac, "seconds_per_block": meta["seconds_per_block"],
                   "fallback_experts": meta["fallback_experts_total"], "export": meta["export"]["format"],
                   "selected_share": meta["selected_share_mean"]}
            print(json.dumps(row), flush=True)
            res["runs"].append(row)
    for scheme in args.schemes:
        rows = {r["method"]: r for r in res["runs"] if r["scheme"] == scheme}
        if all(m in rows for m in METHODS):
            j = [rows[m]["jaccard_mean"] for m in ("vsraq", "topk", "autoround", "rtn")]
            p = [rows[m]["ppl"] for m in ("vsraq", "topk", "autoround", "rtn")]
            res[f"{scheme}_jaccard_order_holds"] = j[0] >= j[1] >= j[2] > j[3]
            res[f"{scheme}_ppl_order_holds"] = p[0] <= p[1] <= p[2] < p[3]
    return res


def part2(model_dir: Path, texts: list[str], held: list[list[int]], pad: int, args, work: Path) -> dict:
    """Same texts, seqlen, nsamples, iters, batch size, int4-g128: ours vs auto-round's AutoRound."""
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    calib = work / "ar_calib.parquet"
    pd.DataFrame({"text": texts}).to_parquet(calib)
    out = work / "ours-autoround-int4"
    quantize(QuantizeConfig(model=str(model_dir), calib=str(calib), out=str(out), scheme="int4-g128",
                            method="autoround", iters=args.ar_iters, lr=args.lr,
                            tokens=len(texts) * args.seq_len, seq_len=args.seq_len, batch_size=args.batch_size, device="cpu"))
    ours = json.loads((out / "quantize.json").read_text())
    ours_ppl, _ = evaluate(load(out), held, pad)
    model = load(model_dir)
    n_blocks = len(model.model.layers)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, scheme="W4A16", dataset=texts, seqlen=args.seq_len, nsamples=len(texts),
                   iters=args.ar_iters, batch_size=args.batch_size, enable_torch_compile=False, device_map="cpu",
                   **({} if args.lr == "auto" else {"lr": float(args.lr), "minmax_lr": float(args.lr)}))
    ar.quantize()
    ar_sec = time.perf_counter() - t0
    ar_ppl, _ = evaluate(ar.model.eval(), held, pad)
    return {"model": model_dir.name, "scheme": "int4-g128 (W4A16)", "iters": args.ar_iters, "nsamples": len(texts),
            "seqlen": args.seq_len, "ours_ppl": ours_ppl, "auto_round_ppl": ar_ppl,
            "ppl_rel_diff": ours_ppl / ar_ppl - 1, "ours_seconds_per_block": ours["seconds_per_block"],
            "auto_round_seconds_per_block": ar_sec / n_blocks,
            "time_per_block_ratio_ours_over_ar": ours["seconds_per_block"] / (ar_sec / n_blocks),
            "note": "auto-round time includes its calibration-input caching and expert unfusing; torch.compile off"}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for c, name in enumerate(models):
        runs = results["models"][name]["runs"]
        fp_ppl = results["models"][name]["fp_ppl"]
        value = {"jaccard_mean": lambda x: x["jaccard_mean"], "ppl": lambda x, f=fp_ppl: 100 * (x["ppl"] / f - 1)}
        for r, (key, label) in enumerate((("jaccard_mean", "mean expert Jaccard vs fp"),
                                          ("ppl", f"held-out PPL, % above fp ({fp_ppl:.1f})"))):
            ax = axes[r][c]
            for i, scheme in enumerate(dict.fromkeys(x["scheme"] for x in runs)):
                rows = [x for x in runs if x["scheme"] == scheme]
                ax.bar([j + 0.4 * i for j in range(len(rows))], [value[key](x) for x in rows], 0.4, label=scheme)
                ax.set_xticks([j + 0.2 for j in range(len(rows))], [x["method"] for x in rows])
            ax.set_title(f"{name}: {label}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(files: list[str], out: Path) -> None:
    """One result file from several partial runs (models, the auto-round comparison), commands kept."""
    merged: dict = {"commands": [], "models": {}}
    for f in files:
        part = json.loads(Path(f).read_text())
        merged["commands"] += [part[k] for k in ("command", "command_auto_round") if k in part]
        merged["models"].update(part.get("models", {}))
        if "vs_auto_round" in part:
            merged["vs_auto_round"] = part["vs_auto_round"]
    out.write_text(json.dumps(merged, indent=2))
    plot(merged, out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[str(REPO / "data/models/qwen3-moe-tiny"),
                                                    str(REPO / "data/models/deepseek-v3-tiny")])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="rtn autoround topk vsraq, optionally vsraq+down (DREAM-MoE) and vsraq+sel (SRA-MoE)")
    ap.add_argument("--iters", type=int, default=32)
    ap.add_argument("--lr", default="0.01", help="SignSGD step (auto = 1/iters is too coarse for few iters)")
    ap.add_argument("--ar-iters", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--min-expert-tokens", type=int, default=8)
    ap.add_argument("--n-heldout", type=int, default=64)
    ap.add_argument("--ar-samples", type=int, default=32)
    ap.add_argument("--skip-auto-round", action="store_true")
    ap.add_argument("--only-auto-round", action="store_true", help="run part 2 only and merge into --out")
    ap.add_argument("--out", default=str(RESULTS / "quant_vs_autoround.json"))
    ap.add_argument("--merge", nargs="+", help="combine result files of separate runs (e.g. one per model) into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    train = load_texts(None, split="train").texts
    held_texts = load_texts(None, split="heldout").texts[: args.n_heldout]
    out = Path(args.out)
    results: dict = {"command": " ".join(["python"] + sys.argv), "args": vars(args), "models": {}}
    if args.only_auto_round and out.exists():
        results = {**json.loads(out.read_text()), "command_auto_round": results["command"]}
    with tempfile.TemporaryDirectory(prefix="pascal-bench-") as tmp:
        work = Path(tmp)
        calib = work / "calib.parquet"
        pd.DataFrame({"text": train[: args.n_samples]}).to_parquet(calib)
        for m in map(Path, [] if args.only_auto_round else args.models):
            tok = AutoTokenizer.from_pretrained(str(m))
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            held = [x for x in tokenize(held_texts, tok, args.seq_len) if len(x) > 1]
            results["models"][m.name] = part1(m, calib, held, pad, args, work)
        if not args.skip_auto_round:
            m = Path(args.models[0])
            tok = AutoTokenizer.from_pretrained(str(m))
            held = [x for x in tokenize(held_texts, tok, args.seq_len) if len(x) > 1]
            # auto-round drops samples shorter than seqlen: give it (and us) texts long enough
            long = [t for t in train if len(tok(t)["input_ids"]) >= args.seq_len][: args.ar_samples]
            results["vs_auto_round"] = part2(m, long, held, tok.pad_token_id or 0, args, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if results["models"]:
        plot(results, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in results.items() if k != "models"}, indent=2))


if __name__ == "__main__":
    main()
