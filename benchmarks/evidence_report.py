"""Per-domain tables, plots and head-to-head answers of the "generic calibration text, specialised use" matrix.

Why a separate report: the calibration matrix reports one mixed held-out score; the
evidence question is per domain (prose-only calibration, then code / math / dialogue use)
and per baseline (random prose, seed-only balance, EBSS without verification,
llm-compressor's all-experts calibration).  Everything here reads finished cells from disk
(eval.json with its `domains` rows, calib_coverage.parquet), so it can run at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

DOMAIN_METRICS = ("delta_ppl", "jaccard", "kl")
ALL = "all"  # the mixed held-out split (eval.json summary)


def domain_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (model, calib, seed, method, scheme, domain): ppl_fp, ppl, delta_ppl, jaccard, kl
    (and quantize_s, the quantizer's seconds from quantize.json, when the record names its qdir).

    domain "all" is the mixed held-out summary; the others come from eval.json's `domains` rows.
    """
    rows = []
    for rec in records:
        meta = json.loads((Path(rec["eval"]) / "eval.json").read_text())
        key = {k: rec[k] for k in ("model", "calib", "seed", "method", "scheme")}
        qjson = Path(rec["qdir"]) / "quantize.json" if rec.get("qdir") else None
        if qjson is not None and qjson.is_file():  # the quantizer's own wall time (equal steps, unequal cost)
            key["quantize_s"] = json.loads(qjson.read_text()).get("seconds")
        fp, q = meta["summary"][0], meta["summary"][1]
        rows.append(key | {"domain": ALL, "ppl_fp": fp["ppl"], "ppl": q["ppl"], "delta_ppl": q["delta_ppl"],
                           "jaccard": q["jaccard"], "kl": q["kl"]})
        for d in meta.get("domains", []):
            if d["model"] == q["model"]:
                rows.append(key | {"domain": d["domain"], "ppl_fp": d["ppl_fp"], "ppl": d["ppl"],
                                   "delta_ppl": d["delta_ppl"], "jaccard": d["jaccard"], "kl": d["kl"]})
    return pd.DataFrame(rows)


def below_demand(coverage: pd.DataFrame, min_tokens: int = 64, share: float = 0.25) -> dict:
    """Coverage of one calibration set routed on the fp model (calib_coverage.parquet: layer, expert, tokens).

    An expert is below demand when it gets fewer than max(min_tokens, share x u) tokens, u = the
    layer's routed slots / E (its uniform share): the balance objective's demand without the
    sensitivity factor, so every set is judged by the same bar at equal tokens.
    """
    per = coverage.groupby(["layer", "expert"]).tokens.sum()  # [(L, E)]
    n_exp = per.groupby(level="layer").size()  # E per layer
    uniform = per.groupby(level="layer").sum() / n_exp  # u per layer
    demand = np.maximum(float(min_tokens), share * uniform.reindex(per.index.get_level_values("layer")).to_numpy())
    below = per.to_numpy() < demand
    return {"experts": int(len(per)), "below_demand": int(below.sum()), "share_below": float(below.mean()),
            "uncovered": int((per == 0).sum()), "min_tokens": int(per.min()),
            "max_over_min": float(per.max() / max(per.min(), 1))}


def coverage_frame(records: list[dict], min_tokens: int = 64, share: float = 0.25) -> pd.DataFrame:
    """below_demand of each (model, calib, seed) set, read from the first evaluated cell that routed it."""
    import pyarrow.parquet as pq

    seen, rows = set(), []
    for rec in records:
        key = (rec["model"], rec["calib"], rec["seed"])
        f = Path(rec["eval"]) / "calib_coverage.parquet"
        if key in seen or not rec.get("calib_path") or not f.exists():
            continue
        seen.add(key)
        tokens = int(sum(pq.read_table(rec["calib_path"], columns=["n_tokens"]).column("n_tokens").to_pylist()))
        rows.append({"model": key[0], "calib": key[1], "seed": key[2], "tokens": tokens,
                     **below_demand(pd.read_parquet(f), min_tokens, share)})
    return pd.DataFrame(rows)


def pm(x: pd.Series, digits: int) -> str:
    """mean ± sample std (std only with two or more seeds)."""
    return f"{x.mean():.{digits}f}" + (f" ± {x.std(ddof=1):.{digits}f}" if len(x) > 1 else "")


def md(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns)
    return head + "".join("\n| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False))


def domain_tables(df: pd.DataFrame, metric: str, digits: int) -> dict[tuple[str, str], str]:
    """{(model, scheme): markdown}: rows (quantizer, calibration set), one column per domain, mean ± std."""
    out = {}
    domains = [d for d in dict.fromkeys(df.domain) if d != ALL] + [ALL]
    for (model, scheme), g in df.groupby(["model", "scheme"], sort=False):
        rows = []
        for (method, calib), c in g.groupby(["method", "calib"], sort=False):
            rows.append({"quantizer": method, "calibration set": calib, "seeds": c.seed.nunique(),
                         **{d: pm(c[c.domain == d][metric], digits) if (c.domain == d).any() else "-"
                            for d in domains}})
        out[(model, scheme)] = md(pd.DataFrame(rows))
    return out


def compare(df: pd.DataFrame, ours: tuple[str, str], base: tuple[str, str], scheme: str, domain: str,
            metric: str = "delta_ppl") -> dict | None:
    """(method, calib) `ours` vs `base` on one scheme and domain: means, stds and a verdict against seed noise.

    Lower is better for Δppl and KL, higher for Jaccard.  "beyond noise" when the gap exceeds the
    larger of the two seed stds; with one seed the noise is unknown and the verdict says so.
    """
    sel = df[(df.scheme == scheme) & (df.domain == domain)]
    a = sel[(sel.method == ours[0]) & (sel.calib == ours[1])][metric]
    b = sel[(sel.method == base[0]) & (sel.calib == base[1])][metric]
    if a.empty or b.empty:
        return None
    sign = 1.0 if metric == "jaccard" else -1.0
    gain = sign * (a.mean() - b.mean())  # > 0: ours better
    noise = max(a.std(ddof=1) if len(a) > 1 else np.nan, b.std(ddof=1) if len(b) > 1 else np.nan)
    verdict = ("better" if gain > 0 else "worse" if gain < 0 else "tied") + (
        "" if gain == 0 else ", one seed: noise unknown" if np.isnan(noise) else
        ", beyond seed noise" if abs(gain) > noise else ", within seed noise")
    return {"ours": pm(a, 3 if metric != "kl" else 5), "base": pm(b, 3 if metric != "kl" else 5), "verdict": verdict}


QUESTIONS = (  # (label, ours, baseline): the "must show" comparisons, one quantizer fixed per pair
    ("pascal-self vs random prose (autoround)", ("autoround", "pascal-self"), ("autoround", "random")),
    ("pascal-self vs seed-only balanced (autoround)", ("autoround", "pascal-self"), ("autoround", "balanced")),
    ("pascal-self vs EBSS, no verification (autoround)", ("autoround", "pascal-self"), ("autoround", "ebss")),
    ("pascal-self + autoround vs llm-compressor all-experts on random prose",
     ("autoround", "pascal-self"), ("llmc-gptq", "random")),
    ("llm-compressor all-experts: fed pascal-self vs fed random prose", ("llmc-gptq", "pascal-self"),
     ("llmc-gptq", "random")),
    ("pascal-self vs random prose (llm-compressor, all-experts off)", ("llmc-gptq-noall", "pascal-self"),
     ("llmc-gptq-noall", "random")),
    ("autoround vs autoround + GPTQModel's RTN fallback (pascal-self)", ("autoround", "pascal-self"),
     ("autoround-fb", "pascal-self")),
    ("auto-round library: fed pascal-self vs fed random prose", ("autoround-lib", "pascal-self"),
     ("autoround-lib", "random")),
    ("our autoround vs the auto-round library, equal steps (random prose)", ("autoround", "random"),
     ("autoround-lib", "random")),
    ("our autoround vs the auto-round library, equal steps (pascal-self)", ("autoround", "pascal-self"),
     ("autoround-lib", "pascal-self")),
)


def answers(df: pd.DataFrame, domains: tuple[str, ...] = ("code", "math")) -> str:
    """Markdown table answering each QUESTIONS pair on Δppl per scheme and domain (missing cells are left out)."""
    rows = []
    for scheme in dict.fromkeys(df.scheme):
        for domain in domains:
            for label, ours, base in QUESTIONS:
                r = compare(df, ours, base, scheme, domain)
                if r:
                    rows.append({"scheme": scheme, "domain": domain, "question": label, "ours Δppl": r["ours"],
                                 "baseline Δppl": r["base"], "verdict": r["verdict"]})
    return md(pd.DataFrame(rows)) if rows else "(no matching cells yet)"


def domain_plot(df: pd.DataFrame, path: Path) -> Path | None:
    """Δppl per domain: one panel per (scheme, domain), bars = quantizers x calibration sets, seed std as error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[df.method != "rtn"]
    if d.empty:
        return None
    schemes, domains = list(dict.fromkeys(d.scheme)), list(dict.fromkeys(d.domain))
    methods, calibs = list(dict.fromkeys(d.method)), list(dict.fromkeys(d.calib))
    m = d.groupby(["scheme", "domain", "method", "calib"]).delta_ppl.agg(["mean", "std"])
    fig, axes = plt.subplots(len(schemes), len(domains), figsize=(3.2 * len(domains), 2.8 * len(schemes)),
                             squeeze=False)
    w = 0.8 / max(len(calibs), 1)
    for row, scheme in zip(axes, schemes):
        for ax, dom in zip(row, domains):
            for i, c in enumerate(calibs):
                keys = [(scheme, dom, q, c) for q in methods]
                ys = [m.loc[k, "mean"] if k in m.index else np.nan for k in keys]
                es = np.nan_to_num([m.loc[k, "std"] if k in m.index else np.nan for k in keys])
                ax.bar(np.arange(len(methods)) + i * w, ys, w, yerr=es, capsize=2, label=c)
            rtn = df[(df.method == "rtn") & (df.scheme == scheme) & (df.domain == dom)]
            if not rtn.empty:
                ax.axhline(float(rtn.delta_ppl.mean()), color="grey", ls="--", lw=0.8, label="rtn")
            ax.set_xticks(np.arange(len(methods)) + w * (len(calibs) - 1) / 2, methods, fontsize=6, rotation=30)
            ax.set_title(f"{scheme} · {dom}: Δppl (lower is better)", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_name(page: Path, model: str) -> str:
    """MODEL_domains.png beside the main page (tables.md, the name docs/evidence.md links); another page's
    plot carries the page's stem, so a partial run's page never overwrites the published plot."""
    return f"{model}_domains.png" if page.name == "tables.md" else f"{page.stem}_{model}_domains.png"


def write(path: Path, df: pd.DataFrame, cov: pd.DataFrame, commands: str, settings_yaml: str) -> Path:
    """The generated tables page (docs/evidence/tables.md): coverage, answers, per-domain tables, plots."""
    from pascal_moe.io.artifacts import write_text

    body = ["# Evidence tables: generic calibration text, specialised use", "",
            "Generated by `benchmarks/evidence_matrix.py` (do not edit; re-run with `--report-only`). "
            "The reading is in `docs/evidence.md`.", "", "Commands run:", "", "```", commands.strip(), "```", "",
            "Settings:", "", "```yaml", settings_yaml.strip(), "```", ""]
    if not cov.empty:
        c = cov.groupby(["model", "calib"], sort=False).agg(
            seeds=("seed", "nunique"), tokens=("tokens", "mean"), share_below=("share_below", list),
            uncovered=("uncovered", "mean"), fewest=("min_tokens", "mean")).reset_index()
        c["tokens"] = c["tokens"].round().astype(int)
        c = c.rename(columns={"calib": "calibration set", "uncovered": "experts with no token",
                              "fewest": "fewest tokens on one expert"})
        c["share below demand"] = [pm(pd.Series(x) * 100, 1) + " %" for x in c.pop("share_below")]
        body += ["## Experts below demand per calibration set (routed on the fp model)", "",
                 md(c.round(1)), ""]
    body += ["## Does pascal-self win? (Δppl, code and math)", "", answers(df), ""]
    for metric, digits, title in (("delta_ppl", 3, "Δppl vs fp (lower is better)"),
                                  ("jaccard", 4, "mean top-k Jaccard (higher is better)"),
                                  ("kl", 5, "KL(fp‖q) per token (lower is better)")):
        for (model, scheme), t in domain_tables(df, metric, digits).items():
            body += [f"## {model} {scheme}: {title}", "", t, ""]
    for model, g in df.groupby("model", sort=False):
        p = domain_plot(g, path.parent / plot_name(path, model))
        if p:
            body += [f"![{p.name}]({p.name})", ""]
    return write_text("\n".join(body), path)
