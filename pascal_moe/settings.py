"""Stage settings are defined once, as dataclasses; CLI options and pipeline YAML are read from them.

A field's `metadata` carries its `help` (and optional `flag`, `short`); `option()`
builds such a field.  `add_command` turns a dataclass into a typer command whose
options are exactly the fields (with `--config FILE.yaml` supplying values that
explicit flags override).  No parameter list is written twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from pascal_moe.errors import PascalError

C = TypeVar("C")
REQUIRED = object()
REVISION_HELP = (
    "hub model only: branch, tag or commit to load (default main); the run pins and records the commit it resolves to"
)
# Placement options shared by every stage that runs the model (pascal_moe/models/placement.py, issue #15).
MAX_MEMORY_HELP = (
    'memory budget per device, accelerate\'s keys: a GPU index or cpu, e.g. "0=70GiB,cpu=100GiB" '
    "(units B, KB/MB/GB, KiB/MiB/GiB; default: 0.9 of each GPU's free memory, 0.8 of available host RAM)"
)
OFFLOAD_DIR_HELP = "folder for weights offloaded to disk (needed only when the model does not fit the budgets)"


def option(default: Any = REQUIRED, help: str = "", *, flag: str | None = None) -> Any:
    """A dataclass field with CLI help; `REQUIRED` (the default) means the user must give it (flag or YAML)."""
    meta = {"help": help, "flag": flag}
    if default is REQUIRED:
        return dataclasses.field(default=None, metadata={**meta, "required": True})
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _cli_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _cli_type(args[0])
    if origin is list:
        return list[args[0]] if args else list[str]
    if tp is Path:
        return str
    return tp if tp in (str, int, float, bool) or origin is list else str


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def from_mapping(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Build a settings object from a mapping; unknown keys and missing required fields are one-line errors."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    norm = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(norm) - set(names))
    if unknown:
        raise PascalError(f"unknown setting(s) {', '.join(unknown)} in {where}: valid are {', '.join(sorted(names))}")
    missing = [flag_name(f) for n, f in names.items() if f.metadata.get("required") and norm.get(n) is None]
    if missing:
        raise PascalError(f"missing {', '.join(missing)} (give it as a flag or in --config)")
    return cls(**{k: v for k, v in norm.items()})


def load_yaml(path: str | None, section: str | None = None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.exists():
        raise PascalError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PascalError(f"malformed YAML in {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise PascalError(f"{path} must hold a mapping of settings")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


def add_command(
    app: typer.Typer,
    name: str,
    cls: type[C],
    run: Callable[[C], Any],
    help: str,
    dry_run: Callable[[C], Any] | None = None,
) -> None:
    """Register `pascal <name>` with one option per field of `cls`, plus `--config` (and `--dry-run` when given).

    Fields marked `cli: False` (e.g. build-calib's per-stage mappings) are YAML-only.
    """
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if f.metadata.get("required"):
            default = None
        tp = _cli_type(hints[f.name])
        ann = tp if default is not None or tp is bool else typing.Optional[tp]
        decls = [flag_name(f)] if tp is not bool else [f"{flag_name(f)}/--no-{flag_name(f)[2:]}"]
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=ann,
                default=typer.Option(
                    default, *decls, help=f.metadata.get("help", ""), show_default=default is not None
                ),
            )
        )
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=typing.Optional[str],
            default=typer.Option(None, "--config", help="YAML file with these settings"),
        )
    )
    if dry_run is not None:
        dry = typer.Option(
            False,
            "--dry-run",
            help="check everything (model config, data, endpoint, packages, "
            "values, output directory) and print the plan, without running",
        )
        params.append(inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=dry))

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        cfg_file = kwargs.pop("config")
        check_only = kwargs.pop("dry_run", False)
        values = load_yaml(cfg_file, section=name)
        for k, v in kwargs.items():
            src = ctx.get_parameter_source(k)  # typer vendors click: compare by name, not by enum identity
            explicit = src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")
            if explicit or k not in {key.replace("-", "_") for key in values}:
                values[k] = v
        cfg = from_mapping(cls, values, cfg_file or "the command line")
        (dry_run if check_only and dry_run is not None else run)(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = name.replace("-", "_")
    app.command(name, help=help)(command)
