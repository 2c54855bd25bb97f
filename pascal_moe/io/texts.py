"""Text sources in: .txt / .jsonl / .json / .parquet files, a directory of them, or a hub dataset.

Why one loader: every stage (profile, synthesize, balance, quantize, eval) reads
text the same way and must fail the same way on bad input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pascal_moe.errors import PascalError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
BUNDLED_SEED = Path(__file__).resolve().parents[2] / "data" / "seed" / "seed.parquet"


@dataclass(slots=True)
class TextSet:
    """Texts with their ids and (optional) domain labels, plus where they came from."""

    texts: list[str]
    ids: list[str]
    domains: list[str]
    origin: str


def _read_file(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".txt":
            docs = [d.strip() for d in path.read_text(errors="replace").split("\n\n") if d.strip()]
            return pd.DataFrame({"text": docs})
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            if isinstance(obj, dict):  # {"text": [...]} or {"data": [{...}]}
                obj = next((v for v in obj.values() if isinstance(v, list)), [obj])
            if obj and isinstance(obj[0], str):
                obj = [{"text": t} for t in obj]
            return pd.DataFrame(obj)
        return pd.read_parquet(path)
    except (ValueError, json.JSONDecodeError, OSError) as e:
        raise PascalError(f"malformed data file {path}: {str(e).splitlines()[0]}") from e


def _read_hub(spec: str) -> pd.DataFrame:
    from datasets import load_dataset

    name, _, split = spec.partition(":")
    try:
        return load_dataset(name, split=split or "train").to_pandas()
    except Exception as e:  # noqa: BLE001
        raise PascalError(f"cannot load dataset {spec!r}: not a local file and the hub gave: "
                          f"{str(e).splitlines()[0]}") from e


def load_texts(data: str | Path | None, text_column: str = "text", max_samples: int | None = None,
               split: str | None = None) -> TextSet:
    """Load texts; `None` means the bundled seed corpus (its `split` column filters when given)."""
    path = Path(data) if data is not None else BUNDLED_SEED
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES)
        if not files:
            raise PascalError(f"no {'/'.join(SUFFIXES)} files in directory {path}")
        df = pd.concat([_read_file(f) for f in files], ignore_index=True)
    elif path.exists():
        if path.suffix not in SUFFIXES:
            raise PascalError(f"unsupported data file {path}: use {', '.join(SUFFIXES)}, a directory, or hub-id:split")
        df = _read_file(path)
    elif str(data).startswith((".", "/")) or str(data).endswith(SUFFIXES):
        raise PascalError(f"data not found: {data}")
    else:
        df = _read_hub(str(data))
    if text_column not in df.columns:
        raise PascalError(f"no column {text_column!r} in {data or path} (columns: {', '.join(map(str, df.columns))}); "
                          "pass --text-column")
    if split is not None and "split" in df.columns:
        df = df[df["split"] == split]
    df = df[df[text_column].map(lambda t: isinstance(t, str) and bool(t.strip()))]
    if df.empty:
        raise PascalError(f"no non-empty texts in {data or path} (column {text_column!r})")
    if max_samples:
        df = df.iloc[:max_samples]
    ids = df["doc_id"].astype(str).tolist() if "doc_id" in df.columns else [f"{path.stem}-{i}" for i in range(len(df))]
    domains = df["domain"].astype(str).tolist() if "domain" in df.columns else ["unknown"] * len(df)
    return TextSet(df[text_column].tolist(), ids, domains, str(data or path))
