"""Text sources in: .txt / .jsonl / .json / .parquet files, a directory of them, or a hub dataset `name[:config]`.

Why one loader: every stage (profile, synthesize, balance, quantize, eval) reads
text the same way and must fail the same way on bad input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from pascal_moe.errors import PascalError
from pascal_moe.io.bundled import bundled_seed

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
STREAM_FACTOR = 10  # stream a hub split when it holds more than this many times the rows we keep


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
        df = pd.read_parquet(path)
        # Arrow's pool keeps the decode buffers (tens of MiB for the 4 MB seed) under every later peak
        pa.default_memory_pool().release_unused()
        return df
    except (ValueError, json.JSONDecodeError, OSError) as e:
        raise PascalError(f"malformed data file {path}: {str(e).splitlines()[0]}") from e


@dataclass(frozen=True, slots=True)
class HubSpec:
    """A hub dataset named on the command line: `name` or `name:config` (e.g. `wikitext:wikitext-2-raw-v1`)."""

    name: str
    config: str | None
    split: str


def parse_hub(spec: str, split: str | None = None) -> HubSpec:
    """`name[:config]` plus `--split` (default train); one-line error on an empty part."""
    name, sep, config = spec.strip().partition(":")
    if not name or (sep and not config) or ":" in config:
        raise PascalError(
            f"bad hub dataset {spec!r}: write name or name:config (e.g. wikitext:wikitext-2-raw-v1), "
            "and the split with --split"
        )
    return HubSpec(name, config or None, split or "train")


def should_stream(keep_rows: int | None, split_rows: int | None) -> bool:
    """Stream when we keep few rows: the split is unknown-sized or over STREAM_FACTOR x what we keep.

    Why: downloading a multi-GB split to profile a few hundred samples wastes the user's disk and hours.
    """
    return keep_rows is not None and (split_rows is None or split_rows > STREAM_FACTOR * keep_rows)


def _split_rows(hub: HubSpec) -> int | None:
    """The split's row count from the hub's metadata, or None when it cannot be read (offline, no info)."""
    from datasets import load_dataset_builder

    try:
        splits = load_dataset_builder(hub.name, hub.config).info.splits or {}
        return splits[hub.split].num_examples if hub.split in splits else None
    except Exception:  # noqa: BLE001 (offline or a script dataset: streaming is the safe choice)
        return None


def _read_hub(spec: str, split: str | None, text_column: str, keep_rows: int | None) -> pd.DataFrame:
    """Load a hub split; stream only its first non-empty `keep_rows` rows when that is far below its size."""
    from datasets import load_dataset

    hub = parse_hub(spec, split)
    try:
        if should_stream(keep_rows, _split_rows(hub)):
            rows = []
            for row in load_dataset(hub.name, hub.config, split=hub.split, streaming=True):
                if text_column not in row:
                    raise PascalError(
                        f"no column {text_column!r} in {spec} (columns: {', '.join(row)}); pass --text-column"
                    )
                t = row[text_column]
                if isinstance(t, str) and t.strip():
                    rows.append(row)
                if len(rows) >= (keep_rows or 0):
                    break
            return pd.DataFrame(rows, columns=list(rows[0]) if rows else [text_column])
        return load_dataset(hub.name, hub.config, split=hub.split).to_pandas()
    except PascalError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PascalError(
            f"cannot load dataset {spec!r} (split {hub.split!r}): not a local file and the hub gave: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def load_texts(
    data: str | Path | None,
    text_column: str = "text",
    max_samples: int | None = None,
    split: str | None = None,
    max_tokens: int | None = None,
) -> TextSet:
    """Load texts; `None` means the bundled seed corpus.

    `split` filters a local file's `split` column, or names a hub dataset's split (default train).
    `max_tokens` only bounds how many hub rows are streamed (each non-empty row holds >= 1 token).
    """
    if data is not None and not str(data).strip():
        raise PascalError(
            "--data is empty: pass a file, a directory or a hub dataset name, or omit it for the bundled seed corpus"
        )
    path = Path(data) if data is not None else bundled_seed()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES)
        if not files:
            raise PascalError(f"no {'/'.join(SUFFIXES)} files in directory {path}")
        df = pd.concat([_read_file(f) for f in files], ignore_index=True)
    elif path.exists():
        if path.suffix not in SUFFIXES:
            raise PascalError(
                f"unsupported data file {path}: use {', '.join(SUFFIXES)}, a directory, or a hub name[:config]"
            )
        df = _read_file(path)
    elif str(data).startswith((".", "/")) or str(data).endswith(SUFFIXES):
        raise PascalError(f"data not found: {data}")
    else:
        df = _read_hub(str(data), split, text_column, max_samples or max_tokens)
        split = None  # the hub split is chosen already; no `split` column filter
    if text_column not in df.columns:
        raise PascalError(
            f"no column {text_column!r} in {data or path} (columns: {', '.join(map(str, df.columns))}); "
            "pass --text-column"
        )
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
