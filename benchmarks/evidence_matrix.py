"""The "generic calibration text, specialised use" matrix: calibration sets x quantizers x schemes x seeds.

Why a runner beside calibration_matrix.py: the evidence needs baselines that are not
pascal stages.  It adds one calibration set and three quantizers to that runner and
keeps everything else (prose-only seed pool, equal tokens per set, resumable cells,
commands.sh per model):

- ebss: `build-calib --agent self` with router verification off (MoEQuant's EBSS recipe);
- autoround-fb: `pascal quantize --method autoround --fallback-threshold 0.005` (GPTQModel's RTN rule);
- llmc-gptq / llmc-gptq-noall: llm-compressor oneshot GPTQ fed the same calib.parquet with
  `moe_calibrate_all_experts` on / off (benchmarks/downstream_quant.py);
- autoround-lib: the auto-round library fed the same calib.parquet, at our scheme and iters
  (benchmarks/autoround_lib.py).

Every cell is evaluated with `pascal eval --domains ...`; the report (evidence_report.py)
gives per-domain tables, the share of experts below demand per set, and the head-to-head answers.
Every reported cell is also kept in the committed `cells` files (docs/evidence/cells.jsonl,
coverage.jsonl), merged with the cells on disk (disk wins), so a partial run on a fresh machine
never drops rows; `--results PAGE` writes the tables of such a run to a page of its own.

    python benchmarks/evidence_matrix.py [--quick] [--models ...] [--calib-sets ...] [--quantizers ...] [--seeds ...]
    python benchmarks/evidence_matrix.py --report-only [--results docs/evidence/other.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import autoround_lib as arl  # noqa: E402
import calibration_matrix as cm  # noqa: E402
import downstream_quant as dq  # noqa: E402
import evidence_cells as ec  # noqa: E402
import evidence_report as er  # noqa: E402

CONFIG = ROOT / "pipelines" / "generic_to_specialised.yaml"
LLMC = {"llmc-gptq": True, "llmc-gptq-noall": False}  # method -> moe_calibrate_all_experts


class EvidenceRunner(cm.Runner):
    """calibration_matrix's runner plus the ebss set and the downstream / fallback quantizers."""

    def calib(self, kind: str, seed: int) -> Path:
        if kind != "ebss":
            return super().calib(kind, seed)
        out = self.root / "calib" / f"{kind}-s{seed}"
        found = sorted(out.rglob("calib.parquet")) if out.exists() else []
        if found:
            return found[0]
        from pascal_moe.pipeline_config import BuildCalibConfig

        if "verify_routing" not in {f.name for f in dataclasses.fields(BuildCalibConfig)}:
            raise SystemExit("the ebss set needs build-calib's --no-verify-routing (BuildCalibConfig.verify_routing "
                             "passed on to SynthesizeConfig in pipeline.run); without it ebss would equal pascal-self")
        cm.console.print(f"[bold]{self.name}[/] calibration set ebss seed {seed}")
        return self.build_calib(out, "self", seed, verify_routing=False)

    def quantize(self, calib: Path | None, tag: str, method: str, scheme: str, seed: int) -> Path:
        out = self.root / "quant" / tag / f"{method}-{scheme}"
        if (out / "quantize.json").exists():
            return out
        if method not in LLMC and method not in ("autoround-fb", arl.METHOD):
            return super().quantize(calib, tag, method, scheme, seed)
        assert calib is not None, f"{method} reads calibration data"
        cm.console.print(f"[bold]{self.name}[/] quantize {tag} {method} {scheme}")
        if method == arl.METHOD:
            q = self.s["quantize"]
            acfg = arl.AutoRoundLibConfig(self.model, str(calib), str(out), scheme, int(q.get("iters", 25)),
                                          int(q.get("batch_size", 8)), seed)
            with self.log.open("a") as f:
                f.write(shlex.join(["python", "benchmarks/autoround_lib.py", "--model", acfg.model, "--calib",
                                    acfg.calib, "--out", acfg.out, "--scheme", scheme, "--iters", str(acfg.iters),
                                    "--batch-size", str(acfg.batch_size), "--seed", str(seed)]) + "\n")
            return arl.quantize(acfg)
        if method in LLMC:
            cfg = dq.DownstreamConfig(self.model, str(calib), str(out), scheme, LLMC[method], seed)
            with self.log.open("a") as f:
                f.write(shlex.join(["python", "benchmarks/downstream_quant.py", "--model", cfg.model, "--calib",
                                    cfg.calib, "--out", cfg.out, "--scheme", scheme, "--seed", str(seed),
                                    *([] if cfg.all_experts else ["--no-all-experts"])]) + "\n")
            return dq.quantize(cfg)
        from pascal_moe.quant.run import run

        cfg = dataclasses.replace(self.quant_cfg(calib, tag, "autoround", scheme, seed), out=str(out),
                                  fallback_threshold=self.s["fallback_threshold"])
        self._record("quantize", cfg)
        run(cfg)
        return out


def settings(path: Path, quick: bool, **lists: Any) -> tuple[dict, dict]:
    """calibration_matrix's settings loader (quick overrides, list overrides; no agent endpoint needed)."""
    return cm.load_settings(path, quick, None, **lists)


def report(s: dict) -> Path | None:
    """Rewrite the tables page from every finished cell of the config's lists plus the committed cells
    (`cells` in the settings; a cell on disk replaces its committed record, and the merge is written back)."""
    from pascal_moe.io.artifacts import write_parquet

    records = cm.run_matrix(s, execute=False, runner=EvidenceRunner)
    df = er.domain_frame(records) if records else pd.DataFrame()
    bd = s.get("below_demand") or {}
    cov = er.coverage_frame(records, bd.get("min_tokens", 64), bd.get("share", 0.25))
    df, cov = ec.keep(s.get("cells"), df, cov)
    if df.empty:
        return None
    write_parquet(df, Path(s["out"]) / "evidence.parquet")
    inv = Path(s["out"]) / "invocations.txt"
    shown = yaml.safe_dump({k: v for k, v in s.items() if k not in ("quick", "quick_mode")}, sort_keys=False)
    return er.write(Path(s["results"]), df, cov, inv.read_text() if inv.exists() else "", shown)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--quick", action="store_true", help="the bundled tiny model, one scheme, one seed, few steps")
    for key in cm.LISTS:
        ap.add_argument(f"--{key.replace('_', '-')}", nargs="+", type=int if key == "seeds" else str,
                        help=f"run only these {key.replace('_', ' ')} (the report still shows every finished cell)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from cells on disk")
    ap.add_argument("--results", help="write the tables to this page instead of the config's `results` "
                    "(a partial run's own page: its plot is named after it)")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    s, rs = settings(Path(a.config), a.quick, **{k: getattr(a, k) for k in cm.LISTS})
    if a.results:
        rs["results"] = a.results
    from pascal_moe.errors import PascalError

    t0 = time.time()
    try:
        if not a.report_only:
            cm.run_matrix(s, runner=EvidenceRunner)
    except PascalError as e:
        cm.console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        cm.console.print("[yellow]interrupted:[/] finished cells are kept; re-run the same command to resume")
        return 130
    Path(s["out"]).mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        with (Path(s["out"]) / "invocations.txt").open("a") as f:
            f.write(f"{shlex.join(['python', 'benchmarks/evidence_matrix.py', *argv])}  # {time.time() - t0:.0f} s, "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    path = report(rs)
    cm.console.print(f"wrote {path}" if path else "no evaluated cells yet: nothing to report")
    return 0 if path else 1


if __name__ == "__main__":
    sys.exit(main())
