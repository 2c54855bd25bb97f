"""Calibration set x quantizer x scheme matrix on the bundled MoEs -> docs/results.md.

Why this exists: the claim "expert-balanced, sensitivity-aware calibration helps MoE
quantization" is only worth what a controlled comparison shows.  Every cell uses the
same sample count and length; only the calibration set (random seed samples,
seed-only expert balance, pascal-moe with the `self` or `openai` agent) and the
quantizer (rtn, autoround, topk, vsraq) and scheme change.  Stages are called through
their Python entry points with their config dataclasses, exactly as the CLI does.

Resumable: a cell whose output exists (calib.parquet, quantize.json, eval.json) is
skipped, so re-running after Ctrl-C continues.  Settings: pipelines/calibration_matrix.yaml.

    python benchmarks/calibration_matrix.py --quick          # one model, one scheme, one seed, few iters
    python benchmarks/calibration_matrix.py --quick --models data/models/deepseek-v3-tiny --quantizers rtn vsraq
    python benchmarks/calibration_matrix.py                  # the whole matrix (about two hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)
METRICS = ("ppl", "delta_ppl", "jaccard", "kl", "gen_agreement")


LISTS = ("models", "calib_sets", "quantizers", "schemes", "seeds")


def load_settings(path: Path, quick: bool, base_url: str | None, **lists: list | None) -> tuple[dict, dict]:
    """(settings to run, settings to report): the report covers the config's lists plus any CLI override,
    so runs split over several invocations (e.g. one per model) end up in one docs/results.md."""
    s = yaml.safe_load(path.read_text())
    over = s.pop("quick", {}) or {}
    if quick:
        s.update(copy.deepcopy(over))
    s["base_url"] = base_url or s.get("base_url") or os.environ.get("OPENAI_BASE_URL")
    if not s["base_url"]:
        s["calib_sets"] = [c for c in s["calib_sets"] if c != "pascal-openai"]
    s["quick_mode"] = quick
    report = copy.deepcopy(s)
    for key, value in lists.items():
        if value:
            s[key] = value
            report[key] = list(dict.fromkeys([*report[key], *value]))
    return s, report


def make(cls: type, **kw: Any) -> Any:
    """A stage config from keyword settings; keys the dataclass lacks are dropped with a warning (stages evolve)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        console.print(f"[yellow]warning:[/] {cls.__name__} has no {', '.join(unknown)}: ignored")
    return cls(**{k: v for k, v in kw.items() if k in names})


def cli_line(stage: str, cfg: Any) -> str:
    """The `pascal <stage>` command equivalent to a config object (logged so any cell can be re-run by hand)."""
    from pascal_moe.settings import flag_name

    parts = ["pascal", stage]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or v == [] or v == (f.default if f.default is not dataclasses.MISSING else object()):
            continue
        if isinstance(v, bool):
            parts.append(flag_name(f) if v else f"--no-{flag_name(f)[2:]}")
            continue
        for item in v if isinstance(v, list) else [v]:
            parts += [flag_name(f), str(item)]
    return shlex.join(parts)


def seed_subset(s: dict, out: Path) -> str:
    """OUT/seed.parquet: the bundled corpus's train split restricted to `seed_domains` (a domain-shift study:
    calibration text from fewer domains than the model serves; evaluation stays on the mixed held-out split)."""
    from pascal_moe.io.artifacts import atomic_path
    from pascal_moe.io.bundled import bundled_seed

    path = out / "seed.parquet"
    if not path.exists():
        df = pd.read_parquet(bundled_seed())
        df = df[(df["split"] == "train") & df["domain"].isin(s["seed_domains"])]
        if df.empty:
            raise SystemExit(f"no bundled seed text in domains {s['seed_domains']}")
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            df.drop(columns=["split"]).to_parquet(tmp)
    return str(path)


class Runner:
    """Runs (or skips) each stage of one model's cells and logs the equivalent CLI commands."""

    def __init__(self, s: dict, model: str):
        self.s, self.model, self.name = s, model, Path(model).name
        self.root = Path(s["out"]) / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "commands.sh"
        self.data = seed_subset(s, Path(s["out"])) if s.get("seed_domains") else None  # None: bundled train split

    def _record(self, stage: str, cfg: Any) -> None:
        with self.log.open("a") as f:
            f.write(cli_line(stage, cfg) + "\n")

    def profile(self) -> Path:
        from pascal_moe.profile.config import ProfileConfig

        out = self.root / "profile"
        if not (out / "samples.parquet").exists():
            from pascal_moe.profile.run import run

            cfg = make(ProfileConfig, model=self.model, out=str(out), data=self.data,
                       split="train" if self.data is None else None, scheme=self.s["calib_scheme"], **self.s["profile"])
            self._record("profile", cfg)
            run(cfg)
        return out

    def calib(self, kind: str, seed: int) -> Path:
        out = self.root / "calib" / f"{kind}-s{seed}"
        found = sorted(out.rglob("calib.parquet")) if out.exists() else []
        if found:
            return found[0]
        console.print(f"[bold]{self.name}[/] calibration set {kind} seed {seed}")
        if kind == "random":
            return self._random(out, seed)
        if kind == "balanced":
            from pascal_moe.balance.config import BalanceConfig
            from pascal_moe.balance.run import run

            cfg = make(BalanceConfig, profile=str(self.profile()), out=str(out), candidates=[],
                       tokens=self.s["tokens"], seq_len=self.s["seq_len"], seed=seed,
                       **self.s["balance"])
            self._record("balance", cfg)
            run(cfg)
            return out / "calib.parquet"
        agent = kind.removeprefix("pascal-")
        extra = {"base_url": self.s["base_url"], "agent_model": self.s.get("agent_model")} if agent == "openai" else {}
        return self.build_calib(out, agent, seed, **extra)

    def build_calib(self, out: Path, agent: str, seed: int, **extra: Any) -> Path:
        """`pascal build-calib` with the matrix's budget and settings (plus `extra` fields); its calib.parquet."""
        from pascal_moe import pipeline
        from pascal_moe.pipeline_config import BuildCalibConfig

        cfg = make(BuildCalibConfig, model=self.model, out=str(out), data=self.data, agent=agent,
                   tokens=self.s["tokens"],
                   seq_len=self.s["seq_len"], scheme=self.s["calib_scheme"], seed=seed, **extra,
                   **self.s["build_calib"])
        self._record("build-calib", cfg)
        pipeline.run(cfg)
        found = sorted(out.rglob("calib.parquet"))
        if not found:
            raise SystemExit(f"build-calib wrote no calib.parquet under {out}")
        return found[0]

    def _random(self, out: Path, seed: int) -> Path:
        """Random seed text at the same token budget, packed into windows exactly as `balance` packs its set.

        Seed documents from the profiled pool in a seeded random order (each cut at seq_len, one EOS between
        documents), until they hold `tokens`; the last window is cut so the set holds exactly the budget.
        """
        from pascal_moe.io.artifacts import atomic_path
        from pascal_moe.io.batches import pack_windows, tokenize
        from pascal_moe.models.loading import load_tokenizer

        pool = pd.read_parquet(self.profile() / "samples.parquet")
        pool = pool[pool["source"] == "seed"].reset_index(drop=True)
        order = np.random.default_rng(seed).permutation(len(pool))
        tok = load_tokenizer(self.model)
        budget, seq_len = int(self.s["tokens"]), int(self.s["seq_len"])
        ids, held, rows = [], 0, []
        for start in range(0, len(order), 256):
            chunk = order[start:start + 256]
            for r, doc in zip(chunk, tokenize(pool["text"].iloc[chunk].tolist(), tok, seq_len)):
                if held >= budget:
                    break
                ids.append(doc)
                rows.append(int(r))
                held += len(doc) + 1
            if held >= budget:
                break
        packed = pack_windows(ids, seq_len, tok.eos_token_id)
        windows, left = [], budget
        for w in packed.windows:
            if left < 2:
                break
            windows.append(w[:left])
            left -= len(windows[-1])
        sample_ids = pool["sample_id"].astype(str).to_numpy()
        members = [[sample_ids[rows[d]] for d in m] for m in packed.members[:len(windows)]]
        table = pa.table({"text": [tok.decode(w) for w in windows], "source": ["seed"] * len(windows),
                          "sample_ids": pa.array(members, pa.list_(pa.string())),
                          "n_tokens": pa.array([len(w) for w in windows], pa.int32()),
                          "input_ids": pa.array(windows, pa.list_(pa.int32()))})
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "calib.parquet") as tmp:
            pq.write_table(table, tmp)
        return out / "calib.parquet"

    def quant_cfg(self, calib: Path, tag: str, method: str, scheme: str, seed: int) -> Any:
        from pascal_moe.quant.config import QuantizeConfig

        return make(QuantizeConfig, model=self.model, calib=str(calib), out=str(self.root / "quant" / tag /
                    f"{method}-{scheme}"), scheme=scheme, method=method, seq_len=self.s["seq_len"],
                    seed=seed, **self.s["quantize"])  # the whole calibration set: every row

    def eval_cfg(self, qdir: Path, calib: Path | None, tag: str, cell: str) -> Any:
        from pascal_moe.evaluate.config import EvalConfig

        return make(EvalConfig, model=self.model, out=str(self.root / "eval" / tag / cell), quantized=[str(qdir)],
                    calib=[str(calib)] if calib else [], **self.s["eval"])

    def quantize(self, calib: Path | None, tag: str, method: str, scheme: str, seed: int) -> Path:
        out = self.root / "quant" / tag / f"{method}-{scheme}"
        if (out / "quantize.json").exists():
            return out
        console.print(f"[bold]{self.name}[/] quantize {tag} {method} {scheme}")
        if calib is None:  # rtn reads no calibration statistics; any set satisfies the required flag
            calib = self.calib("random", 0)
        from pascal_moe.quant.run import run

        cfg = self.quant_cfg(calib, tag, method, scheme, seed)
        self._record("quantize", cfg)
        run(cfg)
        return out

    def evaluate(self, qdir: Path, calib: Path | None, tag: str, cell: str) -> Path:
        out = self.root / "eval" / tag / cell
        if not (out / "eval.json").exists():
            from pascal_moe.evaluate.run import run

            cfg = self.eval_cfg(qdir, calib, tag, cell)
            self._record("eval", cfg)
            run(cfg)
        return out


def plan(s: dict) -> list[dict]:
    """Every cell: (model, calibration set, seed, quantizer, scheme); rtn once per scheme (it reads no calibration)."""
    cells = []
    for model in s["models"]:
        for scheme in s["schemes"]:
            if "rtn" in s["quantizers"]:
                cells.append({"model": model, "calib": None, "seed": 0, "method": "rtn", "scheme": scheme, "tag": "rtn"})
            cells += [{"model": model, "calib": k, "seed": sd, "method": m, "scheme": scheme, "tag": f"{k}-s{sd}"}
                      for k in s["calib_sets"] for sd in s["seeds"] for m in s["quantizers"] if m != "rtn"]
    return cells


def run_matrix(s: dict, execute: bool = True, runner: type[Runner] = Runner) -> list[dict]:
    """Run (or, with execute=False, only locate) every cell; returns one record per evaluated cell.
    `runner` adds calibration sets or quantizers (benchmarks/evidence_matrix.py)."""
    records = []
    runners = {m: runner(s, m) for m in s["models"]}
    for n, c in enumerate(plan(s), 1):
        r = runners[c["model"]]
        ev = r.root / "eval" / c["tag"] / f"{c['method']}-{c['scheme']}"
        if not execute and not (ev / "eval.json").exists():
            continue
        if execute:
            console.print(f"[dim]cell {n}/{len(plan(s))}[/] {r.name} {c['tag']} {c['method']} {c['scheme']}")
        t0 = time.time()
        calib = r.calib(c["calib"], c["seed"]) if c["calib"] else None
        qdir = r.quantize(calib, c["tag"], c["method"], c["scheme"], c["seed"])
        ev = r.evaluate(qdir, calib, c["tag"], f"{c['method']}-{c['scheme']}")
        records.append({"model": r.name, "calib": c["calib"] or "(none)", "seed": c["seed"], "method": c["method"],
                        "scheme": c["scheme"], "eval": ev, "qdir": qdir, "calib_path": calib,
                        "seconds": round(time.time() - t0, 1)})
    return records


def collect(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-cell metrics, per-calibration-set coverage stats) read back from the eval outputs."""
    import json

    rows, cov = [], {}
    for rec in records:
        meta = json.loads((rec["eval"] / "eval.json").read_text())
        fp, q = meta["summary"][0], meta["summary"][1]
        rows.append({k: rec[k] for k in ("model", "calib", "seed", "method", "scheme")} | {
            "fp_ppl": fp["ppl"], **{m: q[m] for m in METRICS}, "eval_dir": str(rec["eval"])})
        f = rec["eval"] / "calib_coverage.parquet"
        if rec["calib_path"] and f.exists() and (rec["model"], rec["calib"], rec["seed"]) not in cov:
            c = pd.read_parquet(f)
            per = c.groupby(["layer", "expert"]).tokens.sum()
            cal = pq.read_table(rec["calib_path"], columns=["n_tokens"]).column("n_tokens").to_pylist()
            cov[(rec["model"], rec["calib"], rec["seed"])] = {
                "samples": len(cal), "tokens": int(sum(cal)), "experts_uncovered": int((per == 0).sum()),
                "experts_below_16": int((per < 16).sum()), "min_expert_tokens": int(per.min()),
                "usage_cv": float(per.std() / max(per.mean(), 1e-9))}
    covdf = pd.DataFrame([{"model": k[0], "calib": k[1], "seed": k[2], **v} for k, v in cov.items()])
    return pd.DataFrame(rows), covdf


def md_table(df: pd.DataFrame) -> str:
    """A markdown table of a frame (pandas' to_markdown needs tabulate, which is not a dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns)
    return head + "".join("\n| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False))


def _pm(g: pd.Series, digits: int) -> str:
    return f"{g.mean():.{digits}f}" + (f" ± {g.std(ddof=1):.{digits}f}" if len(g) > 1 else "")


def tables(df: pd.DataFrame) -> dict[str, str]:
    """One markdown table per model: rows (scheme, quantizer, calibration set), metrics mean ± std over seeds."""
    out = {}
    for model, g in df.groupby("model", sort=False):
        lines = [f"fp perplexity: {g.fp_ppl.iloc[0]:.3f}", "",
                 "| scheme | quantizer | calibration set | seeds | ppl | Δppl | mean Jaccard | KL(fp‖q) | gen agreement |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for (scheme, method, calib), c in g.groupby(["scheme", "method", "calib"], sort=False):
            lines.append(f"| {scheme} | {method} | {calib} | {len(c)} | {_pm(c.ppl, 3)} | {_pm(c.delta_ppl, 3)} | "
                         f"{_pm(c.jaccard, 4)} | {_pm(c.kl, 5)} | {_pm(c.gen_agreement, 3)} |")
        out[model] = "\n".join(lines)
    return out


def plots(df: pd.DataFrame, folder: Path) -> list[Path]:
    """Per model: one row per scheme (their scales differ ~10x), mean Jaccard and Δppl per quantizer,
    one bar per calibration set with the seed std; rtn of the same scheme as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    titles = {"jaccard": "mean expert-selection Jaccard (higher is better)",
              "delta_ppl": "Δ perplexity vs fp (lower is better)"}
    for model, g in df[df.method != "rtn"].groupby("model", sort=False):
        schemes = list(dict.fromkeys(g.scheme))
        methods = list(dict.fromkeys(g.method))
        calibs = list(dict.fromkeys(g.calib))
        m = g.groupby(["scheme", "method", "calib"], sort=False)[["jaccard", "delta_ppl"]].agg(["mean", "std"])
        fig, axes = plt.subplots(len(schemes), 2, figsize=(10, 2.6 * len(schemes)), squeeze=False)
        w = 0.8 / max(len(calibs), 1)
        for row, scheme in zip(axes, schemes):
            rtn = df[(df.model == model) & (df.method == "rtn") & (df.scheme == scheme)]
            for ax, metric in zip(row, ("jaccard", "delta_ppl")):
                lo, hi = np.inf, -np.inf
                for i, c in enumerate(calibs):
                    key = [(scheme, q, c) for q in methods]
                    ys = np.array([m.loc[k, (metric, "mean")] if k in m.index else np.nan for k in key])
                    es = np.nan_to_num(np.array([m.loc[k, (metric, "std")] if k in m.index else np.nan for k in key]))
                    ax.bar(np.arange(len(methods)) + i * w, ys, w, yerr=es, label=c, capsize=2)
                    lo, hi = min(lo, np.nanmin(ys - es)), max(hi, np.nanmax(ys + es))
                if not rtn.empty:
                    ax.axhline(float(rtn[metric].iloc[0]), color="grey", ls="--", lw=0.8, label="rtn")
                    lo, hi = min(lo, float(rtn[metric].iloc[0])), max(hi, float(rtn[metric].iloc[0]))
                pad = 0.08 * (hi - lo or 1.0)
                ax.set_ylim(max(lo - pad, 0.0), hi + pad)  # zoomed: the differences are small
                ax.set_xticks(np.arange(len(methods)) + w * (len(calibs) - 1) / 2, methods, fontsize=8)
                ax.set_title(f"{scheme}: {titles[metric]}", fontsize=8)
                ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7, ncol=len(calibs) + 1)
        fig.tight_layout()
        p = folder / f"{model}_matrix.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def reading(df: pd.DataFrame) -> list[str]:
    """Plain statements of who wins each (model, scheme, quantizer) group, and by how much relative to seed noise."""
    lines, wins, total = [], {}, 0
    for (model, scheme, method), g in df[df.method != "rtn"].groupby(["model", "scheme", "method"], sort=False):
        m = g.groupby("calib").agg(dppl=("delta_ppl", "mean"), jac=("jaccard", "mean"), sd=("delta_ppl", "std"))
        if len(m) < 2:
            continue
        total += 1
        best_p, best_j = m.dppl.idxmin(), m.jac.idxmax()
        noise = m.sd.max()
        gap = np.sort(m.dppl.to_numpy())[1] - m.dppl.min()
        wins[best_p if gap > 0 else "tie"] = wins.get(best_p if gap > 0 else "tie", 0) + 1
        note = ("one seed: noise not measured" if np.isnan(noise) else
                "within seed noise" if gap <= noise else "beyond seed noise")
        who = "a tie" if gap == 0 else f"**{best_p}**"
        lines.append(f"- {model} {scheme} {method}: lowest Δppl with {who} ({m.dppl.min():.3f}; runner-up "
                     f"+{gap:.3f}, {note}); highest Jaccard with **{best_j}** ({m.jac.max():.4f}).")
    head = [f"- Lowest Δppl across {total} (model, scheme, quantizer) groups: " +
            ", ".join(f"{k} {v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1])) + "."] if total else []
    return head + head_to_head(df) + lines


def head_to_head(df: pd.DataFrame, ours: str = "pascal-self") -> list[str]:
    """How often `ours` beats each baseline set on mean Δppl and on mean Jaccard, over matching groups."""
    m = df[df.method != "rtn"].groupby(["model", "scheme", "method", "calib"])[["delta_ppl", "jaccard"]].mean()
    out = []
    for base in ("random", "balanced"):
        pairs = [(m.loc[(*g, ours)], m.loc[(*g, base)]) for g in {k[:3] for k in m.index}
                 if (*g, ours) in m.index and (*g, base) in m.index]
        if pairs:
            dp = sum(a.delta_ppl < b.delta_ppl for a, b in pairs)
            jc = sum(a.jaccard > b.jaccard for a, b in pairs)
            out.append(f"- {ours} vs {base}: lower Δppl in {dp} of {len(pairs)} groups, higher Jaccard in {jc} of "
                       f"{len(pairs)}.")
    return out


def write_results(s: dict, df: pd.DataFrame, cov: pd.DataFrame, pngs: list[Path]) -> Path:
    import torch

    from pascal_moe.io.artifacts import versions, write_text

    path = Path(s["results"])
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    cpu = f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    body = ["# Results: calibration set x quantizer x scheme", "",
            "Generated by `benchmarks/calibration_matrix.py` (do not edit by hand; re-run to update).", "",
            "Commands that produced the cells below (from the run directory's invocations.txt; "
            "finished cells are never re-run):", "", "```",
            (Path(s["out"]) / "invocations.txt").read_text().strip(), "```", "",
            f"Machine: {platform.platform()}, {cpu}. Versions: {vers}.", "",
            "Settings (`pipelines/calibration_matrix.yaml` after overrides):", "", "```yaml",
            yaml.safe_dump({k: v for k, v in s.items() if k not in ("quick", "quick_mode")}, sort_keys=False).strip(), "```", "",
            "Metrics are each quantized model vs its fp model on the held-out split of the seed corpus "
            "(see `pascal eval`): ppl, Δppl, mean top-k Jaccard, KL(fp‖q) per token, greedy-generation agreement; "
            "mean ± sample std over seeds where several ran. rtn reads no calibration data, so it has one row.", ""]
    if not cov.empty:
        body += ["## Calibration sets (routed on the fp model)", "", md_table(cov.round(3)), ""]
    for model, t in tables(df).items():
        body += [f"## {model}", "", t, ""]
        body += [f"![{p.name}]({p.relative_to(path.parent)})" for p in pngs if p.name.startswith(model)] + [""]
    body += ["## Reading (generated from the numbers above; where pascal-moe does not win, it says so)", "",
             *reading(df), ""]
    notes = path.with_name(f"{path.stem}-notes.md")  # hand-written reading, kept across regenerations
    if notes.is_file():
        body += [f"### Maintainers' note (not generated: `{notes}`)", "", notes.read_text().strip(), ""]
    body += ["## Reproduce one cell", "",
             "Each model's `commands.sh` under the run directory lists the exact `pascal` command of every stage. "
             "The rtn cells need no calibration data; on a fresh clone:", ""]
    for model, g in df[df.method == "rtn"].groupby("model", sort=False):
        q = g.iloc[0]
        r = Runner(s, next(m for m in s["models"] if Path(m).name == model))
        body += [f"- {model} rtn {q.scheme}: ppl {q.ppl:.3f}, Δppl {q.delta_ppl:.3f}, mean Jaccard {q.jaccard:.4f}, "
                 f"KL {q.kl:.5f}, gen agreement {q.gen_agreement:.3f}", "", "```",
                 f"python benchmarks/calibration_matrix.py {'--quick ' if s.get('quick_mode') else ''}--models {r.model} "
                 f"--quantizers rtn --schemes {q.scheme}",
                 "# or, once that run's random-s0 calib.parquet exists, only this cell's two stages:",
                 cli_line("quantize", r.quant_cfg(r.root / "calib" / "random-s0" / "calib.parquet", "rtn", "rtn",
                                                  q.scheme, 0)),
                 cli_line("eval", r.eval_cfg(r.root / "quant" / "rtn" / f"rtn-{q.scheme}", None, "rtn",
                                             f"rtn-{q.scheme}")), "```", ""]
    return write_text("\n".join(body), path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "pipelines" / "calibration_matrix.yaml"))
    ap.add_argument("--quick", action="store_true", help="one model, one scheme, one seed, few iterations")
    for key in LISTS:
        ap.add_argument(f"--{key.replace('_', '-')}", nargs="+", type=int if key == "seeds" else str,
                        help=f"run only these {key.replace('_', ' ')} (the report still shows every finished cell)")
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint: adds the pascal-openai calibration set")
    ap.add_argument("--report-only", action="store_true", help="rewrite docs/results.md from cells on disk")
    a = ap.parse_args(argv)
    os.chdir(ROOT)  # every recorded path and command is relative to the repository root
    s, rs = load_settings(Path(a.config), a.quick, a.base_url, **{k: getattr(a, k) for k in LISTS})
    from pascal_moe.errors import PascalError
    from pascal_moe.io.artifacts import write_parquet

    t0 = time.time()
    try:
        if not a.report_only:
            run_matrix(s)
    except PascalError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished cells are kept; re-run the same command to resume")
        return 130
    Path(s["out"]).mkdir(parents=True, exist_ok=True)
    with (Path(s["out"]) / "invocations.txt").open("a") as f:
        f.write(f"{shlex.join(['python', 'benchmarks/calibration_matrix.py', *argv])}  # {time.time() - t0:.0f} s, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    df, cov = collect(run_matrix(rs, execute=False))
    if df.empty:
        console.print("no evaluated cells yet: nothing to report")
        return 1
    write_parquet(df, Path(s["out"]) / "matrix.parquet")
    pngs = plots(df, Path(s["results"]).with_suffix(""))  # docs/results.md -> docs/results/*.png
    console.print(f"wrote {write_results(rs, df, cov, pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
