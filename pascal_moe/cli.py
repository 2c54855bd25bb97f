"""`pascal`: one typer app; each subcommand is a thin function over a stage's settings dataclass.

Stage code is imported only when its command runs, so `pascal --help` is instant.
User-facing failures (`PascalError`) print one red line and exit 2; Ctrl-C says
how to resume and exits 130.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pascal_moe.agent.config import SynthesizeConfig, VerifyConfig
from pascal_moe.balance.config import BalanceConfig, ExportConfig
from pascal_moe import interrupt
from pascal_moe.errors import PascalError
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.pipeline_config import BuildCalibConfig
from pascal_moe.plan import PlanConfig
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.settings import add_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Expert-balanced calibration data and router-aligned quantization for MoE LLMs.",
)
console = Console(stderr=True)


def _stage(module: str, func: str = "run"):
    """Call `pascal_moe.<module>.<func>` lazily, after the quick preflight; a stage not built yet says so."""

    def call(cfg: Any) -> None:
        from pascal_moe.preflight import quick

        if module != "pipeline":  # build-calib runs the full preflight itself (pipeline.run)
            quick(cfg)
        try:
            mod = importlib.import_module(f"pascal_moe.{module}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("pascal_moe"):
                raise PascalError(f"this subcommand is not built yet ({e.name} is missing)") from e
            raise
        try:
            with interrupt.watching():
                getattr(mod, func)(cfg)
                interrupt.check()  # a Ctrl-C swallowed inside a callback still ends the command as interrupted
        except KeyboardInterrupt:
            # typer turns a bare KeyboardInterrupt into a silent exit 130, so say it here, inside the command
            _interrupted()
            raise typer.Exit(130) from None

    return call


def _dry_run(cfg: Any) -> None:
    from pascal_moe.preflight import dry_run

    dry_run(cfg)


def _interrupted() -> None:
    console.print("[yellow]interrupted:[/] finished work is saved; re-run the same command to resume", soft_wrap=True)


add_command(
    app,
    "profile",
    ProfileConfig,
    _stage("profile.run"),
    "Profile routing on seed text: per-expert coverage, sensitivity, margins, trigger tokens.",
    _dry_run,
)
add_command(
    app,
    "synthesize",
    SynthesizeConfig,
    _stage("agent.loop"),
    "Agent loop: write samples for starved and sensitive experts, verified on the real router.",
    _dry_run,
)
add_command(
    app,
    "verify",
    VerifyConfig,
    _stage("agent.verify_cmd"),
    "Screen and route external synthetic text (quality screen + router check) into verified.parquet.",
)
add_command(
    app,
    "balance",
    BalanceConfig,
    _stage("balance.run"),
    "Select the calibration set (saturated coverage weighted by sensitivity); write Parquet + report.",
    _dry_run,
)
add_command(
    app,
    "build-calib",
    BuildCalibConfig,
    _stage("pipeline"),
    "profile -> synthesize -> profile synthetic -> balance, resumable, in one run directory. Options: the "
    "union of the stage options ((stage) in the help says whose); shared ones go to every stage that has "
    "them; per-stage values in YAML `profile:`/`synthesize:`/`balance:` sections. Runs the preflight "
    "(see --dry-run) before stage 1.",
    _dry_run,
)
add_command(
    app,
    "quantize",
    QuantizeConfig,
    _stage("quant.run"),
    "Quantize with RTN, AutoRound-style SignRound, or router-aligned SignRound (topk, vsraq).",
    _dry_run,
)
add_command(
    app,
    "eval",
    EvalConfig,
    _stage("evaluate.run"),
    "Perplexity, expert-selection Jaccard, KL and generation agreement vs the fp model, with plots.",
    _dry_run,
)
add_command(
    app,
    "export-calib",
    ExportConfig,
    _stage("balance.export", "run"),
    "Write a calibration set in the input format a downstream quantizer expects.",
    _dry_run,
)


def _plan(cfg: PlanConfig) -> None:
    from pascal_moe.plan import run

    run(cfg)


add_command(
    app,
    "plan",
    PlanConfig,
    _plan,
    "From the config alone (no weights): parameters, expert counts, and each stage's placement and memory peaks "
    "for --device and --max-memory, with the calibration cache size.",
)


@app.command("models")
def models(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the bundled models (a checkout's data/models, or $PASCAL_DATA_DIR/models): architecture, routing, size."""
    from pascal_moe.io.bundled import bundled_models

    root = bundled_models()
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        cfg = json.loads((d / "config.json").read_text())
        card = json.loads((d / "card.json").read_text()) if (d / "card.json").exists() else {}
        experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
        rows.append(
            {
                "path": _shown(d),
                "architecture": cfg["model_type"],
                "routing": {"deepseek_v3": "sigmoid", "glm4_moe": "sigmoid", "gpt_oss": "topk_softmax"}.get(
                    cfg["model_type"], "softmax"
                ),
                "layers": cfg["num_hidden_layers"],
                "experts": experts,
                "top_k": cfg["num_experts_per_tok"],
                "params": card.get("params"),
                "heldout_ppl": card.get("heldout_ppl"),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    t = Table(title="bundled models")
    for col in rows[0] if rows else ["path"]:
        t.add_column(col)
    for r in rows:
        t.add_row(
            *[
                f"{v / 1e6:.2f}M" if k == "params" and v else f"{v:.1f}" if isinstance(v, float) else str(v)
                for k, v in r.items()
            ]
        )
    Console().print(t)


def _shown(p: Path) -> str:
    """A model path as the user can pass it to --model: relative to the cwd when under it, else absolute."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p.resolve())


def main() -> None:
    try:
        app()
    except PascalError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a command (e.g. while importing a stage)
        _interrupted()
        sys.exit(130)


if __name__ == "__main__":
    main()
