"""Preflight: check a command's settings before any expensive work, and print the plan (`--dry-run`).

Every command runs the cheap checks first (option values, scheme against the model's shapes, output
directory, inputs, packages); `--dry-run` adds the network checks (hub config fetch, agent endpoint:
list models + one 1-token request) and prints the plan.  `pascal build-calib` always runs the full
preflight before stage 1.  Anything that would fail later is an error here; all errors of a run are
joined into one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pascal_moe.agent.endpoints import endpoint_list
from pascal_moe.errors import PascalError
from pascal_moe.preflight import plan as P
from pascal_moe.preflight.checks import (
    Finding,
    ModelInfo,
    check_agent,
    check_data,
    check_device,
    check_inputs,
    _n_experts,
    check_model,
    check_out,
    element_bytes,
    check_package,
    check_scheme,
    check_values,
)

__all__ = ["Finding", "Report", "dry_run", "preflight"]
console = Console(stderr=True)
CT_INSTALL = "pip install compressed-tensors, or pass --export-format fake"


@dataclass
class Report:
    """Findings in order, and the plan rows."""

    command: str
    findings: list[Finding] = field(default_factory=list)
    steps: list[P.Step] = field(default_factory=list)

    def add(self, *items: Finding | list[Finding]) -> None:
        for it in items:
            for f in it if isinstance(it, list) else [it]:
                if all((f.what, f.status, f.detail) != (g.what, g.status, g.detail) for g in self.findings):
                    self.findings.append(f)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "error"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise PascalError("; ".join(f.detail for f in self.errors))

    def print(self) -> None:
        colour = {"ok": "green", "note": "yellow", "skipped": "dim", "error": "bold red"}
        console.print(f"[bold]preflight[/] pascal {self.command}")
        for f in self.findings:
            console.print(
                f"  [{colour[f.status]}]{f.status:>7}[/] {f.what}: {f.detail}", highlight=False, soft_wrap=True
            )
        if self.steps:
            console.print("[bold]plan[/]")
            for s in self.steps:
                tok = f"{s.tokens:,} tokens" if s.tokens else ""
                console.print(
                    f"  {s.stage:<12} {s.what}  {tok}  ~{P.fmt_seconds(s.seconds)}", highlight=False, soft_wrap=True
                )
            total = [s.seconds for s in self.steps]
            if None not in total:
                console.print(f"  {'total':<12} ~{P.fmt_seconds(sum(total))} (rates: pascal_moe/preflight/plan.py)")


def _model(rep: Report, cfg: Any, full: bool, cache: dict[str, ModelInfo | None]) -> ModelInfo | None:
    if cfg.model not in cache:
        found, cache[cfg.model] = check_model(cfg.model, full, revision=getattr(cfg, "revision", None))
        rep.add(found)
    return cache[cfg.model]


def _common(rep: Report, cfg: Any, full: bool, produced: set[str], cache: dict) -> ModelInfo | None:
    rep.add(check_values(cfg))
    info = _model(rep, cfg, full, cache) if getattr(cfg, "model", None) else None  # balance: profile.json names it
    if hasattr(cfg, "scheme"):
        rep.add(check_scheme(cfg.scheme, info, element_bytes(cfg.dtype, cfg.device)))
    if hasattr(cfg, "device"):
        rep.add(check_device(cfg.device))
    if hasattr(cfg, "data"):
        rep.add(check_data(cfg.data, getattr(cfg, "text_column", "text")))
    rep.add(check_inputs(cfg, produced))
    return info


def _stage(rep: Report, cfg: Any, full: bool, produced: set[str], cache: dict) -> None:
    """Checks and plan rows of one stage config (used alone and for each build-calib stage)."""
    from pascal_moe.agent.config import SynthesizeConfig
    from pascal_moe.balance.config import BalanceConfig, ExportConfig
    from pascal_moe.evaluate.config import EvalConfig
    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.quant.config import QuantizeConfig

    info = _common(rep, cfg, full, produced, cache)
    rep.add(_memory(cfg, info))
    active = info.active_params if info else 0
    experts = _n_experts(info.config) if info else 0
    if isinstance(cfg, ProfileConfig):
        rep.steps.append(P.profile_step(cfg, active))
    elif isinstance(cfg, SynthesizeConfig):
        base_url = ", ".join(endpoint_list(cfg.base_url))
        agent = cfg.agent if cfg.agent != "auto" else ("openai" if base_url else "self")
        rep.add(check_agent(cfg, full))
        rep.steps.append(P.synth_step(cfg, active, agent, experts))
    elif isinstance(cfg, BalanceConfig):
        layers = cache.get("_moe_layers", 1)
        rep.steps.append(P.balance_step(cfg, cache.get("_pool"), experts * layers))
    elif isinstance(cfg, QuantizeConfig):
        from pascal_moe.quant.schemes import parse_scheme

        try:
            s = parse_scheme(cfg.scheme)
        except PascalError:
            return
        if s.fmt == "int" and cfg.export_format == "auto":
            rep.add(
                check_package("compressed_tensors", "the pack-quantized export of int schemes needs it", CT_INSTALL)
            )
        need = int(info.params * 4.5 / 8 * 1.1) if info else 0  # packed weights + fp router/norms/embeddings
        rep.add(check_out(cfg.out, need))
        rep.steps.append(P.quantize_step(cfg, active, info.params if info else 0, s.bits))
    elif isinstance(cfg, EvalConfig):
        rep.steps.append(P.eval_step(cfg, active))
    elif isinstance(cfg, ExportConfig):
        rep.steps.append(P.Step("export-calib", f"{cfg.format} file from {cfg.calib}"))


def _memory(cfg: Any, info: ModelInfo | None) -> list[Finding]:
    """The stage's placement and memory peaks (pascal_moe/plan.py): a note when the estimate does not fit."""
    from pascal_moe.plan import gib, stage_plan

    try:
        p = stage_plan(cfg, info)
    except PascalError as e:
        return [Finding("memory", "skipped", str(e))]
    if p is None:
        return []
    peaks = f"{p.placement}; peak device {gib(p.device_peak)}, host {gib(p.host_peak)}" + (
        f", disk {gib(p.disk)}" if p.disk else ""
    )
    if p.fits:
        return [Finding("memory", "ok", f"{peaks} (estimates: pascal plan)")]
    return [Finding("memory", "note", f"{peaks}: may not fit, {p.why}")]


def preflight(cfg: Any, full: bool = True, produced: set[str] | None = None) -> Report:
    """All checks of `cfg` (any command's settings); `full` adds hub and endpoint checks. Never raises."""
    from pascal_moe.pipeline_config import BuildCalibConfig

    cache: dict[str, Any] = {}
    if isinstance(cfg, BuildCalibConfig):
        return _build_calib(cfg, full, cache)
    rep = Report(type(cfg).__name__.removesuffix("Config").lower())
    rep.add(check_out(cfg.out))
    _stage(rep, cfg, full, produced or set(), cache)
    return rep


def _build_calib(cfg: Any, full: bool, cache: dict) -> Report:
    from pascal_moe.pipeline import stage_settings

    rep = Report("build-calib")
    rep.add(check_out(cfg.out), [f for f in check_values(cfg) if f.status == "error"])
    try:
        stages = stage_settings(cfg)
    except PascalError as e:
        rep.add(Finding("options", "error", str(e)))
        return rep
    produced = {str(Path(cfg.out) / d) for d in ("profile", "synth", "synth_profile", "calib")}
    cache["_pool"] = P.profile_size(stages["profile"])[0]
    for name in ("profile", "synthesize", "balance"):
        s = stages[name]
        if name == "balance":
            info = cache.get(cfg.model)
            cache["_moe_layers"] = _moe_layer_count(info)
        _stage(rep, s, full, produced, cache)
    rep.add(
        check_package(
            "compressed_tensors", "`pascal quantize` needs it to export int schemes later", CT_INSTALL, required=False
        )
    )
    return rep


def _moe_layer_count(info: ModelInfo | None) -> int:
    if info is None:
        return 1
    c = info.config
    return int(c.get("num_hidden_layers", 1)) - int(c.get("first_k_dense_replace", 0) or 0)


def dry_run(cfg: Any) -> None:
    """`--dry-run`: print every finding and the plan; exit 2 (one line) when anything would fail."""
    rep = preflight(cfg, full=True)
    rep.print()
    rep.raise_if_errors()
    console.print("[green]preflight passed[/]: run the same command without --dry-run")


def quick(cfg: Any) -> None:
    """The checks every command runs before its stage (no network): raises one line on the first problems."""
    preflight(cfg, full=False).raise_if_errors()
