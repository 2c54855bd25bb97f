"""Token batches for the model: truncate texts to `seq_len` or pack them into windows (`pack_windows`, the one
packing rule: EOS-joined stream cut every `seq_len`), padding masked out.

Shape legend: B batch, T sequence length.  Padding positions have
`attention_mask == 0` and are never counted as routed tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pascal_moe.errors import PascalError


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    sample_index: list[int]  # which sample each row is


def tokenize(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """Token ids of each text, truncated to `seq_len` (no special tokens added: calibration text is raw)."""
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
    return [ids for ids in enc]


def check_seq_len(seq_len: int, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise PascalError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}: lower --seq-len")


def batches(token_ids: list[list[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Right-padded batches in input order (sorted by length within a window would reorder ids: we keep order)."""
    for start in range(0, len(token_ids), batch_size):
        chunk = [ids for ids in token_ids[start : start + batch_size]]
        idx = list(range(start, start + len(chunk)))
        keep = [(i, ids) for i, ids in zip(idx, chunk) if ids]
        if not keep:
            continue
        T = max(len(ids) for _, ids in keep)
        ids_t = torch.full((len(keep), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(keep), T), dtype=torch.long)
        for r, (_, ids) in enumerate(keep):
            ids_t[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        yield Batch(ids_t, mask, [i for i, _ in keep])


@dataclass(slots=True)
class Packed:
    """Documents packed into windows: the token rows a quantizer runs, and which documents each holds."""

    windows: list[list[int]]  # each exactly seq_len tokens, the last one possibly shorter
    members: list[list[int]]  # per window: indices of the documents with at least one token in it

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.windows)


def pack_windows(token_ids: list[list[int]], seq_len: int, sep_id: int | None) -> Packed:
    """Join documents with `sep_id` (none after the last) and cut the stream into `seq_len` windows.

    Why: a short document alone would fill a fraction of a window, and the quantizers that concatenate
    (llm-compressor, AutoRound) join with EOS exactly like this; nothing is dropped (the tail is the last,
    shorter window).  A separator belongs to no document.
    """
    if seq_len < 1:
        raise PascalError("--seq-len must be at least 1")
    parts: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    for d, ids in enumerate(token_ids):
        if parts and sep_id is not None:
            parts.append(np.array([sep_id], dtype=np.int64))
            owners.append(np.array([-1], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
        owners.append(np.full(len(ids), d, dtype=np.int64))
    if not parts:
        return Packed([], [])
    flat, owner = np.concatenate(parts), np.concatenate(owners)
    windows, members = [], []
    for lo in range(0, len(flat), seq_len):
        own = owner[lo : lo + seq_len]
        windows.append(flat[lo : lo + seq_len].tolist())
        members.append(np.unique(own[own >= 0]).tolist())
    return Packed(windows, members)
