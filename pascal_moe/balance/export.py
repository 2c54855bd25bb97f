"""`pascal export-calib`: the calibration set in the input format each downstream quantizer expects.

What each consumer silently drops, and what we do about it (methods.md §7):
- llm-compressor `oneshot`: uses a dataset with `input_ids` as-is; only the batch collator truncates
  (to the shortest row when batch_size > 1).  Export: Parquet with `input_ids`, `attention_mask`
  (exactly our tokens); use batch_size=1 (its default).
- AutoRound: skips every sample shorter than `seqlen`.  Export: all samples' tokens concatenated
  (EOS between samples; none between the windows `pascal balance` writes, which are already one EOS-joined
  stream) and cut into rows of exactly `seq_len`; the last row is completed by wrapping
  around to the start of the stream, so every selected token reaches the quantizer (the wrapped
  count is reported).  Load with `autoround_dataset(path)` and pass `nsamples=len(rows)`.
- GPTQModel: drops samples of <= 10 tokens.  Export: such samples are joined to the next sample
  (EOS between), and the count of joins is reported.
- jsonl: text, source, sample_id, n_tokens per line (for tools that tokenize themselves).
Every export writes `export.json` beside it: format, rows, tokens in/out, wrapped/joined counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from pascal_moe.balance.config import ExportConfig
from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import atomic_path, calib_file, read_json, write_json
from pascal_moe.io.batches import pack_windows

console = Console(stderr=True)
FORMATS = {
    "llmcompressor": "llmcompressor.parquet",
    "autoround": "autoround.jsonl",
    "gptqmodel": "gptqmodel.jsonl",
    "jsonl": "calib.jsonl",
}
GPTQMODEL_MIN_TOKENS = 11  # GPTQModel drops samples of <= 10 tokens


@dataclass(slots=True)
class Exported:
    """Rows as the consumer will see them, and the token bookkeeping that proves nothing was lost."""

    rows: list[list[int]]
    tokens_in: int  # sum of our n_tokens
    tokens_out: int  # tokens the consumer will run (incl. separators and wrapped tokens)
    separators: int = 0
    wrapped: int = 0  # tokens repeated from the start to complete the last packed row
    joined: int = 0  # short samples joined to a neighbour
    warnings: list[str] = field(default_factory=list)


def read_calib(path: str | Path) -> pd.DataFrame:
    p = calib_file(path)
    if not p.is_file():
        raise PascalError(f"no calibration set at {path}: give calib.parquet or the directory holding it")
    df = pd.read_parquet(p)
    if "input_ids" not in df or "text" not in df:
        raise PascalError(f"{p} has no input_ids/text columns: write it with `pascal balance`")
    return df


def pack(token_ids: list[list[int]], seq_len: int, sep_id: int | None) -> Exported:
    """`pack_windows` (sep between samples) with the last row completed by wrapping around to the stream's start."""
    windows = pack_windows(token_ids, seq_len, sep_id).windows
    n_in = sum(len(ids) for ids in token_ids)
    if not windows:
        return Exported([], 0, 0)
    n_stream = sum(len(w) for w in windows)
    n_rows = len(windows)
    stream = np.resize(np.asarray([t for w in windows for t in w], dtype=np.int64), n_rows * seq_len)  # repeats
    rows = stream.reshape(n_rows, seq_len).tolist()
    return Exported(rows, n_in, n_rows * seq_len, separators=n_stream - n_in, wrapped=n_rows * seq_len - n_stream)


def join_short(token_ids: list[list[int]], min_tokens: int, sep_id: int | None) -> Exported:
    """Join samples shorter than min_tokens to the following one (the last to the previous one)."""
    out: list[list[int]] = []
    carry: list[int] = []
    joined = seps = 0
    for ids in token_ids:
        row = carry + ([sep_id] if carry and sep_id is not None else []) + [int(t) for t in ids]
        seps += int(bool(carry) and sep_id is not None)
        if len(row) < min_tokens:
            carry, joined = row, joined + 1
            continue
        out.append(row)
        carry = []
    if carry:
        if out:
            out[-1] = out[-1] + ([sep_id] if sep_id is not None else []) + carry
            seps += int(sep_id is not None)
        else:
            out.append(carry)
    n_in = sum(len(ids) for ids in token_ids)
    short = bool(out) and len(out[-1]) < min_tokens
    warn = [f"only {n_in} tokens in all: GPTQModel will drop the single short sample"] if short else []
    return Exported(out, n_in, sum(len(r) for r in out), separators=seps, joined=joined, warnings=warn)


def export_rows(df: pd.DataFrame, fmt: str, seq_len: int, sep_id: int | None) -> Exported:
    """Token rows for one format (llmcompressor/jsonl keep samples as they are)."""
    ids = [list(map(int, x)) for x in df["input_ids"]]
    n_in = sum(len(x) for x in ids)
    if fmt == "autoround":
        return pack(ids, seq_len, sep_id)
    if fmt == "gptqmodel":
        return join_short(ids, GPTQMODEL_MIN_TOKENS, sep_id)
    return Exported(ids, n_in, n_in)


def _target(out: Path, fmt: str) -> Path:
    return out if out.suffix in (".parquet", ".jsonl", ".json") else out / FORMATS[fmt]


def _write_jsonl(records: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _sep_id(calib: Path) -> int | None:
    """EOS of the tokenizer named in manifest.json (the separator between packed samples)."""
    man = (calib if calib.is_dir() else calib.parent) / "manifest.json"
    if not man.is_file():
        return None
    from pascal_moe.models.loading import load_tokenizer

    return load_tokenizer(read_json(man)["tokenizer"]).eos_token_id


def run(cfg: ExportConfig) -> Path:
    """Write the set in `cfg.format`; returns the written file (export.json beside it)."""
    if cfg.format not in FORMATS:
        raise PascalError(f"unknown --format {cfg.format!r}: use {', '.join(FORMATS)}")
    df = read_calib(cfg.calib)
    seq_len = cfg.seq_len or int(df["n_tokens"].max())
    if seq_len < 1:
        raise PascalError("--seq-len must be at least 1")
    packed = "sample_ids" in df  # windows of `pascal balance`: already one EOS-joined stream, no separator to add
    sep = _sep_id(Path(cfg.calib)) if cfg.format in ("autoround", "gptqmodel") and not packed else None
    ex = export_rows(df, cfg.format, seq_len, sep)
    path = _target(Path(cfg.out), cfg.format)
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.format == "llmcompressor":
        table = pa.table(
            {
                "input_ids": pa.array(ex.rows, pa.list_(pa.int32())),
                "attention_mask": pa.array([[1] * len(r) for r in ex.rows], pa.list_(pa.int8())),
            }
        )
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    elif cfg.format == "jsonl":
        ids = df["sample_ids"].map(lambda v: ",".join(map(str, v))) if "sample_ids" in df else df["sample_id"]
        _write_jsonl(
            [
                {"text": t, "source": s, "sample_id": i, "n_tokens": int(n)}
                for t, s, i, n in zip(df["text"], df["source"], ids, df["n_tokens"])
            ],
            path,
        )
    else:
        _write_jsonl([{"input_ids": r, "attention_mask": [1] * len(r)} for r in ex.rows], path)
    for w in ex.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    info = {
        "format": cfg.format,
        "file": path.name,
        "seq_len": seq_len,
        "rows": len(ex.rows),
        "samples": len(df),
        **{k: v for k, v in asdict(ex).items() if k != "rows"},
    }
    write_json(info, path.parent / "export.json")
    console.print(
        f"export-calib: {len(df)} samples -> {len(ex.rows)} {cfg.format} rows, {ex.tokens_out} tokens "
        f"({ex.tokens_in} ours, {ex.wrapped} wrapped, {ex.joined} joined) -> {path}"
    )
    return path


def autoround_dataset(path: str | Path) -> list[dict]:
    """Rows of an autoround export as the list of {input_ids, attention_mask} [1, T] tensors AutoRound iterates."""
    import torch

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [
        {"input_ids": torch.tensor([r["input_ids"]]), "attention_mask": torch.tensor([r["attention_mask"]])}
        for r in rows
    ]
