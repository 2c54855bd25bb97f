"""Artifacts between stages: atomic Parquet/JSON writes, fingerprints, manifests.

Atomic = write to a temp file in the same directory, fsync, `os.replace`: a crash
or Ctrl-C never leaves a half-written artifact that a resumed run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pandas as pd


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temp path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(df: pd.DataFrame, path: Path | str) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_json(obj: object, path: Path | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    return Path(path)


def write_text(text: str, path: Path | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fingerprint_texts(texts: Iterable[str]) -> str:
    """Order-sensitive hash of a text collection (what a resumed stage compares)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def fingerprint_obj(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_model(model: str, revision: str | None = None) -> str:
    """Config + tokenizer + weight-file sizes of a local model dir (cheap); a hub model's id and resolved commit.

    Why the commit: a hub model's files change with its revisions, so a resumed run must notice a new one.
    """
    from pascal_moe.models.hub import hub_id, looks_local, pinned_commit

    if not looks_local(model):
        commit = pinned_commit(model, revision or None)
        return fingerprint_obj({"hub_id": hub_id(model), "commit": commit or revision or "unresolved"})
    p = Path(model).expanduser()
    if not p.is_dir():
        return fingerprint_obj({"path": model})
    parts = {
        f.name: (f.read_text() if f.suffix == ".json" and f.stat().st_size < 5_000_000 else f.stat().st_size)
        for f in sorted(p.iterdir())
        if f.is_file() and f.suffix in (".json", ".safetensors", ".jinja")
    }
    return fingerprint_obj(parts)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("pascal-moe", "torch", "transformers", "datasets", "pandas", "pyarrow", "openai", "vllm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["cpu"] = cpu_kind()
    return out


_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_kind() -> str:
    """torch's CPU dispatch level plus the ISA flags that pick other kernels, e.g. `AVX512 avx2,avx512f,amx_bf16`.

    Why: same code, input and pinned stack give different autoround weights on CPUs with other kernel
    paths (issue #14: ulp-level matmul differences flip sign-SGD rounding decisions), so a result names its CPU.
    """
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        flags = set()
    return f"{torch.backends.cpu.get_cpu_capability()} {','.join(f for f in _ISA_FLAGS if f in flags) or '-'}"


def calib_file(path: str | Path) -> Path:
    """The calib.parquet a user means: the file, a directory holding it, or a build-calib run directory.

    Why one resolver: quantize, eval, export-calib and the preflight all take `--calib`, and a user
    naturally passes the run directory that `pascal build-calib --out` printed.  The returned path may
    not exist; callers say so in their own words.
    """
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "calib.parquet", p / "calib" / "calib.parquet"):
            if candidate.is_file():
                return candidate
        return p / "calib.parquet"
    return p
