"""Settings of `pascal build-calib`, generated from the stage dataclasses (nothing is re-declared here).

build-calib's options are the union of the options of its stages (ProfileConfig, SynthesizeConfig,
BalanceConfig), each name with exactly one owner:

- `SHARED` names (model, revision, data, seed, device, dtype, seq_len, batch_size, the executor's) are set once and go to every
  stage that has the field; `seq_len` is the calibration window (balance's), and profile/synthesize
  use `profile_seq_len`, which defaults to it;
- every other stage field keeps its own name, default and help (prefixed by "(stage)"), and goes to
  that stage only; two stages declaring the same non-shared name is an import-time error;
- `WIRED` fields (stage outputs and inputs inside the run directory) are set by the pipeline;
- a `profile:` / `synthesize:` / `balance:` mapping (YAML, or the Python API) sets one stage's value of
  any of its fields, shared ones included (e.g. `profile: {batch_size: 4}`);
- `OVERRIDES` lists, in this one place, every default build-calib deliberately sets differently from
  the stage run alone, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.balance.config import BalanceConfig
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.settings import option

STAGES: dict[str, type] = {"profile": ProfileConfig, "synthesize": SynthesizeConfig, "balance": BalanceConfig}
SHARED = (
    "model",
    "revision",
    "data",
    "seed",
    "device",
    "dtype",
    "max_memory",
    "offload_dir",
    "seq_len",
    "batch_size",
    # where the model passes run (pipeline.RUNS_ON): the seed profile, the router check and synth_profile alike
    "executor",
    "ray_address",
    "workers",
    "gpus_per_worker",
    "shard_size",
)
WIRED = {"profile": ("out",), "synthesize": ("profile", "out"), "balance": ("profile", "out", "candidates")}
RENAMED = {
    ("profile", "max_samples"): "max_seed_samples",  # stage fields build-calib sets under its own names
    ("profile", "max_tokens"): "seed_pool_tokens",
}
SEED_POOL_FACTOR = 3  # default pool: seed documents holding 3x the set's --tokens (a choice, not a copy)
SHARED_DEFAULT_FROM = {"seq_len": "balance"}  # the calibration window; stages disagree, balance's is the set's
OVERRIDES: dict[tuple[str, str], str] = {
    ("profile", "max_samples"): "build-calib's `max_seed_samples` (default: no cap on the count)",
    ("profile", "max_tokens"): "build-calib's `seed_pool_tokens` (default 3 x --tokens): the pool balance picks from "
    "is sized in tokens, a few times the set; `pascal profile` alone profiles all it is given",
    ("profile", "split"): "`train` when `data` is the bundled corpus and `split` is not given, so its held-out "
    "split stays unseen for `eval`",
    ("profile", "seq_len"): "`profile_seq_len` (default: the calibration `seq_len`): counts describe the tokens the "
    "quantizer will see",
    ("synthesize", "seq_len"): "`profile_seq_len`, as for the profile: passages are verified at the calibration length",
}


def _copy(f: dataclasses.Field, help_: str) -> dataclasses.Field:
    """The stage's field as it is (default, default factory, flag), with build-calib's help text."""
    meta = {**f.metadata, "help": help_}
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=meta)
    return dataclasses.field(default=f.default, metadata=meta)


def _owners() -> dict[str, str]:
    """Field name -> the one stage that owns its flag (shared names excluded)."""
    owners: dict[str, str] = {}
    for stage, cls in STAGES.items():
        for f in dataclasses.fields(cls):
            if f.name in SHARED or f.name in WIRED[stage] or (stage, f.name) in RENAMED:
                continue
            if f.name in owners:
                raise RuntimeError(
                    f"{cls.__name__}.{f.name} is also a field of the {owners[f.name]} stage: add it to "
                    f"SHARED or rename it (pascal_moe/pipeline_config.py)"
                )
            owners[f.name] = stage
    return owners


OWNERS = _owners()


def _shared_field(name: str) -> dataclasses.Field:
    stage = SHARED_DEFAULT_FROM.get(name) or next(
        s for s, c in STAGES.items() if name in {f.name for f in dataclasses.fields(c)}
    )
    f = next(f for f in dataclasses.fields(STAGES[stage]) if f.name == name)
    users = [s for s, c in STAGES.items() if name in {g.name for g in dataclasses.fields(c)}]
    return _copy(f, f.metadata.get("help", "") + f" (shared: {', '.join(users)})")


def _stage_field(stage: str, name: str) -> dataclasses.Field:
    f = next(f for f in dataclasses.fields(STAGES[stage]) if f.name == name)
    return _copy(f, f"({stage}) " + f.metadata.get("help", ""))


def _fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = {n: t for cls in STAGES.values() for n, t in cls.__annotations__.items()}
    own = [
        ("out", "str", option("runs/build-calib", "run directory (stages resume from it)")),
        (
            "max_seed_samples",
            "int | None",
            option(None, "at most this many seed samples profiled (profile max_samples)"),
        ),
        (
            "seed_pool_tokens",
            "int | None",
            option(
                None, "seed tokens profiled: the pool balance picks from (default: 3 x --tokens; profile max_tokens)"
            ),
        ),
        (
            "profile_seq_len",
            "int | None",
            option(
                None,
                "tokens per sample while profiling and verifying synthetic text (default: --seq-len, "
                "so counts match what a quantizer sees) (profile and synthesize seq_len)",
            ),
        ),
    ]
    shared = [(n, hints[n], _shared_field(n)) for n in SHARED]
    staged = [(n, hints[n], _stage_field(s, n)) for n, s in OWNERS.items()]
    sections = [
        (
            s,
            "dict | None",
            dataclasses.field(
                default=None, metadata={"help": f"{s} settings for that stage only (YAML mapping)", "cli": False}
            ),
        )
        for s in STAGES
    ]
    return shared[:1] + own + shared[1:] + staged + sections


BuildCalibConfig = dataclasses.make_dataclass("BuildCalibConfig", _fields())
BuildCalibConfig.__module__ = __name__
BuildCalibConfig.__doc__ = (
    "Settings of `pascal build-calib`: the union of the stage settings (see "
    "pascal_moe/pipeline_config.py); build the stage objects with pipeline.stage_settings."
)
