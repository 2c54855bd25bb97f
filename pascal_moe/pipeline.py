"""`pascal build-calib`: profile -> synthesize -> profile synthetic -> balance, resumable in one run directory.

Layout: OUT/profile, OUT/synth, OUT/synth_profile (only when synthetic.parquet lacks routed counts),
OUT/calib.  Each stage is a pipeline block whose inputs (settings, model fingerprint, hashes of the
files it reads) are fingerprinted:

- `stage.json` (written last, atomically) marks a finished stage; a finished stage whose fingerprint
  matches is skipped, so a crash at any point loses at most the stage that was running;
- `.stage-started.json` holds the fingerprint of a stage being run: an unfinished stage with the same
  fingerprint is re-run in place (the synthesis keeps its finished rounds), one with another
  fingerprint, or a finished one that no longer matches, is cleared and redone.
Downstream fingerprints include the upstream *output* hashes, so a redone stage that wrote different
files invalidates what follows, and one that wrote the same files does not.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from pascal_moe import interrupt
from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import fingerprint_model, fingerprint_obj, read_json, sha256_file, write_json, write_text
from pascal_moe.io.bundled import bundled_seed
from pascal_moe.io.texts import SUFFIXES
from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.pipeline_config import OWNERS, SEED_POOL_FACTOR, SHARED, STAGES, WIRED, BuildCalibConfig
from pascal_moe.settings import from_mapping

console = Console(stderr=True)


@dataclass
class Stage:
    """One block of the pipeline: where it writes, what it depends on, how to run it."""

    name: str
    dir: Path
    inputs: dict[str, Any]  # everything that determines its output (fingerprinted)
    run: Callable[[], Any]


def log(out: Path, msg: str) -> None:
    """Print and append to OUT/pipeline.log (what ran, what was skipped: the resume record)."""
    console.print(f"[bold]build-calib[/] {msg}")
    with open(out / "pipeline.log", "a") as f:
        f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {msg}\n")


def run_stage(stage: Stage, out: Path) -> bool:
    """Run a stage unless its finished marker matches; returns whether it ran."""
    fp = fingerprint_obj(stage.inputs)
    done, started = stage.dir / "stage.json", stage.dir / ".stage-started.json"
    if done.is_file() and read_json(done).get("fingerprint") == fp:
        log(out, f"{stage.name}: skipped (finished, fingerprint {fp[:12]} matches)")
        return False
    if done.is_file() or (started.is_file() and read_json(started).get("fingerprint") != fp):
        log(out, f"{stage.name}: inputs or settings changed, redoing from scratch")
        shutil.rmtree(stage.dir)
    elif started.is_file():
        log(out, f"{stage.name}: resuming an unfinished run")
    stage.dir.mkdir(parents=True, exist_ok=True)
    write_json({"stage": stage.name, "fingerprint": fp}, started)
    log(out, f"{stage.name}: running")
    t0 = time.perf_counter()
    interrupt.check()
    stage.run()
    interrupt.check()  # never mark a stage finished after a Ctrl-C, even one a callback swallowed
    write_json(
        {
            "stage": stage.name,
            "fingerprint": fp,
            "inputs": stage.inputs,
            "seconds": round(time.perf_counter() - t0, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        done,
    )
    log(out, f"{stage.name}: done in {time.perf_counter() - t0:.1f} s")
    return True


def data_fingerprint(data: str | None) -> str:
    """Hash of the seed text: file bytes, every text file of a directory, or the hub id."""
    p = Path(data) if data else bundled_seed()
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return fingerprint_obj(
            {str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.suffix in SUFFIXES}
        )
    return fingerprint_obj({"hub": data})


def _files(d: Path, *names: str) -> dict[str, str]:
    return {n: sha256_file(d / n) for n in names if (d / n).is_file()}


def calib_seq_len(cfg: BuildCalibConfig) -> int:
    """The calibration window: --seq-len, capped at the model's max_position_embeddings when the config says so."""
    conf = Path(cfg.model) / "config.json"
    limit = read_json(conf).get("max_position_embeddings") if conf.is_file() else None
    if limit and cfg.seq_len > limit:
        console.print(
            f"[yellow]note:[/] --seq-len {cfg.seq_len} is above the model's max_position_embeddings; using {limit}"
        )
        return int(limit)
    return cfg.seq_len


def stage_settings(cfg: BuildCalibConfig, out: Path | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """Each stage's settings object, built from that stage's own dataclass (pipeline_config.py says how).

    Values come, lowest first, from: the stage dataclass default, build-calib's listed OVERRIDES, the
    shared/owned flags, the stage's own `profile:`/`synthesize:`/`balance:` mapping; paths are wired last.
    """
    out = Path(cfg.out) if out is None else out
    seq_len = cfg.seq_len if seq_len is None else seq_len
    prof_len = cfg.profile_seq_len or seq_len
    dirs = {n: out / n for n in ("profile", "synth", "synth_profile", "calib")}
    pool = cfg.seed_pool_tokens if cfg.seed_pool_tokens is not None else SEED_POOL_FACTOR * cfg.tokens
    overrides = {
        "profile": {
            "max_samples": cfg.max_seed_samples,
            "max_tokens": pool,
            "seq_len": prof_len,
            "split": cfg.split if cfg.split is not None or cfg.data is not None else "train",
        },
        "synthesize": {"seq_len": prof_len},
        "balance": {"seq_len": seq_len},
    }
    wired = {
        "profile": {"out": str(dirs["profile"])},
        "synthesize": {"profile": str(dirs["profile"]), "out": str(dirs["synth"])},
        "balance": {"profile": str(dirs["profile"]), "out": str(dirs["calib"]), "candidates": []},
    }
    result: dict[str, Any] = {}
    for stage, cls in STAGES.items():
        names = {f.name for f in fields(cls)}
        values = {n: getattr(cfg, n) for n in names if n in SHARED or OWNERS.get(n) == stage}
        values.update({k: v for k, v in overrides[stage].items() if k in names})
        section = getattr(cfg, stage) or {}
        if not isinstance(section, dict):
            raise PascalError(f"build-calib `{stage}:` must be a mapping of {stage} settings (got {section!r})")
        clash = sorted(set(section) & set(WIRED[stage]))
        if clash:
            raise PascalError(
                f"build-calib sets {stage} {', '.join(clash)} itself (inside --out): remove it from "
                f"the `{stage}:` section"
            )
        values.update(section)
        values.update(wired[stage])
        result[stage] = from_mapping(cls, values, f"the build-calib `{stage}:` section")
    return result


def run(cfg: BuildCalibConfig) -> Path:
    """Run (or resume) every stage; returns OUT/calib (holding calib.parquet). The preflight runs first."""
    from pascal_moe.preflight import preflight

    preflight(cfg).raise_if_errors()
    seq_len = calib_seq_len(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_fp = fingerprint_model(cfg.model, cfg.revision)
    dirs = {n: out / n for n in ("profile", "synth", "synth_profile", "calib")}
    st = stage_settings(cfg, out, seq_len)
    pcfg, scfg, bcfg = st["profile"], st["synthesize"], st["balance"]

    run_stage(
        Stage(
            "profile",
            dirs["profile"],
            {"model": model_fp, "data": data_fingerprint(cfg.data), "settings": _portable(pcfg)},
            _call("profile.run", pcfg),
        ),
        out,
    )
    prof_files = _files(dirs["profile"], "profile.json", "experts.parquet", "samples.parquet")

    run_stage(
        Stage(
            "synth",
            dirs["synth"],
            {"model": model_fp, "profile": prof_files, "settings": _portable(scfg)},
            _call("agent.loop", scfg),
        ),
        out,
    )
    candidate = dirs["synth"]
    synth_file = dirs["synth"] / "synthetic.parquet"
    if not _has_counts(synth_file):
        run_stage(
            Stage(
                "synth_profile",
                dirs["synth_profile"],
                {"model": model_fp, "synthetic": sha256_file(synth_file), "seq_len": scfg.seq_len},
                lambda: profile_candidates(scfg, synth_file, dirs["synth_profile"], runs_on=pcfg),
            ),
            out,
        )
        candidate = dirs["synth_profile"]
    else:
        log(out, "synth_profile: not needed (synthetic.parquet carries routed counts)")

    bcfg = replace(bcfg, candidates=[str(candidate)])
    cand_file = candidate / ("synthetic.parquet" if candidate == dirs["synth"] else "samples.parquet")
    run_stage(
        Stage(
            "calib",
            dirs["calib"],
            {"profile": prof_files, "candidates": sha256_file(cand_file), "settings": _portable(bcfg)},
            _call("balance.run", bcfg),
        ),
        out,
    )
    _write_run_card(out, dirs["calib"])
    log(out, f"calibration set: {dirs['calib'] / 'calib.parquet'}")
    return dirs["calib"]


def _write_run_card(out: Path, calib: Path) -> None:
    """OUT/README.md pointing at calib/calib.parquet, so `datasets.load_dataset(OUT)` returns the set."""
    from pascal_moe.balance.card import run_card

    m = read_json(calib / "manifest.json")
    write_text(run_card(m, calib.relative_to(out).as_posix()), out / "README.md")


# where a stage runs, not what it computes: switching executors or worker counts does not redo a stage
RUNS_ON = ("executor", "ray_address", "workers", "gpus_per_worker", "shard_size")


def _portable(cfg: Any) -> dict[str, Any]:
    """Settings that determine a stage's output (paths inside the run dir are covered by file hashes)."""
    skip = ("out", "profile", "candidates", "model", "concurrency", *RUNS_ON)
    return {k: v for k, v in vars(cfg).items() if k not in skip}


def _call(module: str, cfg: Any) -> Callable[[], Any]:
    def go() -> Any:
        import importlib

        try:
            mod = importlib.import_module(f"pascal_moe.{module}")
        except ModuleNotFoundError as e:
            raise PascalError(f"build-calib needs pascal_moe.{module}, which is not built yet") from e
        return mod.run(cfg)

    return go


def _has_counts(path: Path) -> bool:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise PascalError(f"the synthesis stage wrote no {path}: re-run build-calib")
    names = set(pq.read_schema(path).names)
    return {"keys", "counts", "n_tokens"} <= names


def profile_candidates(
    cfg: SynthesizeConfig, synth_file: Path, out: Path, runs_on: ProfileConfig | None = None
) -> Path:
    """Route accepted synthetic text through the model: samples.parquet with keys/counts (CONTRACTS schema).

    With `runs_on.executor == "ray"` (build-calib's profile settings) the texts are sharded over the same actor
    pool as the seed profile; the counts are the same (one counting rule, same batches)."""
    import pandas as pd

    from pascal_moe.io.artifacts import write_parquet
    from pascal_moe.models.loading import load_model, load_tokenizer
    from pascal_moe.profile.capture import route_counts

    df = pd.read_parquet(synth_file)
    if "accepted" in df:
        df = df[df["accepted"].fillna(False).astype(bool)].reset_index(drop=True)
    if runs_on is not None and runs_on.executor == "ray" and len(df):
        from pascal_moe.executor.ray_pool import collect_ray

        pc = replace(runs_on, out=str(out), seq_len=cfg.seq_len, batch_size=cfg.batch_size, sensitivity=False)
        routed = collect_ray(replace(pc, contexts=0), df["text"].tolist()).counts.samples
        shutil.rmtree(out / "shards", ignore_errors=True)
    else:
        model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.max_memory, cfg.offload_dir, revision=cfg.revision)
        tok = load_tokenizer(cfg.model, cfg.revision)
        routed = route_counts(model, tok, df["text"].tolist(), cfg.seq_len, cfg.batch_size)
    res = pd.DataFrame(
        {
            "sample_id": df["sample_id"].astype(str),
            "text": df["text"],
            "source": df.get("source", "synthetic"),
            "domain": "synthetic",
            "n_tokens": [r.n_tokens for r in routed],
            "keys": [list(map(int, r.keys)) for r in routed],
            "counts": [list(map(int, r.counts)) for r in routed],
            "targets": df["targets"] if "targets" in df else [[] for _ in range(len(df))],
        }
    )
    return write_parquet(res, out / "samples.parquet")
