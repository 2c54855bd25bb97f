"""Block inputs and hooks for block-wise calibration (AutoRound style).

Shape legend: B batch rows, T tokens per row, D hidden size, N = B*T tokens, E experts.

- `capture_block_inputs`: run the model up to decoder layer 0 and keep what it receives
  (hidden states and the kwargs it needs: position_embeddings, attention mask, ...), stopping
  the forward with an exception so nothing past layer 0 runs.
- `TensorCache`: the cached block inputs/outputs of every batch; moves to disk (torch.save in a
  temp dir) once it holds more than `limit_bytes`, so memory stays one block + the cache limit.
- `router_tap` / `logits_until_router`: context-managed forward hooks on a router (removed in
  `finally`, nothing leaks into the model).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pascal_moe.models.hooks import router_hooks
from pascal_moe.models.base import decoder_layers

_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions", "output_router_logits")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor is recorded."""


@dataclass(slots=True)
class BlockBatch:
    """What one batch feeds every decoder layer besides the hidden states."""

    kwargs: dict[str, Any]  # position_embeddings, attention_mask (causal, maybe None), position_ids, ...
    mask: torch.Tensor  # [N] bool: real (non-padding) tokens


class TensorCache:
    """A list of tensors kept in memory up to `limit_bytes`, then spilled to a temp dir with torch.save."""

    def __init__(self, limit_bytes: int = 2 << 30, tmp_root: str | None = None):
        self.limit = limit_bytes
        self.items: list[torch.Tensor | Path] = []
        self.in_memory = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tmp_root = tmp_root
        self.device = torch.device("cpu")

    def _spill_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pascal-quant-", dir=self._tmp_root)
        return Path(self._tmp.name)

    def _store(self, t: torch.Tensor, i: int) -> torch.Tensor | Path:
        t = t.detach()
        size = t.numel() * t.element_size()
        if self.in_memory + size <= self.limit:
            self.in_memory += size
            return t
        path = self._spill_dir() / f"{id(self)}-{i}.pt"
        torch.save(t.cpu(), path)
        self.device = t.device
        return path

    def append(self, t: torch.Tensor) -> None:
        self.items.append(self._store(t, len(self.items)))

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        old = self.items[i]
        if isinstance(old, torch.Tensor):
            self.in_memory -= old.numel() * old.element_size()
        self.items[i] = self._store(t, i)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return torch.load(item, map_location=self.device) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    @property
    def spilled(self) -> int:
        return sum(isinstance(x, Path) for x in self.items)

    def close(self) -> None:
        self.items.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cache: TensorCache
                         ) -> list[BlockBatch]:
    """Hidden states [B, T, D] entering layer 0 (appended to `cache`) and the kwargs it gets, per batch."""
    layer0 = decoder_layers(model)[0]
    seen: dict[str, Any] = {}

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _DROP_KWARGS}
        raise StopForward

    out: list[BlockBatch] = []
    handle = layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        dev = next(model.parameters()).device
        for ids, attn in batches:
            try:
                model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
            except StopForward:
                pass
            cache.append(seen["hidden"])
            out.append(BlockBatch(seen["kwargs"], attn.reshape(-1).bool().to(dev)))
    finally:
        handle.remove()
    return out


def block_forward(layer: nn.Module, hidden: torch.Tensor, batch: BlockBatch) -> torch.Tensor:
    """One decoder layer on cached inputs: [B, T, D] -> [B, T, D]."""
    out = layer(hidden, **batch.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def router_tap(router: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Record the router's logits [N, E] of every forward inside the block (nothing when router is None)."""
    logs: list[torch.Tensor] = []
    if router is None:
        yield logs
        return
    with router_hooks([router], lambda _i, z, _a: logs.append(z)):  # not detached: the loss needs gradients
        yield logs


def logits_until_router(layer: nn.Module, router: nn.Module, hidden: torch.Tensor, batch: BlockBatch
                        ) -> torch.Tensor:
    """Router logits [N, E] of `layer` on `hidden`, stopping right after the router (no expert compute).

    Used for downstream-router supervision: the next layer (still fp) judges this block's output.
    """
    got: list[torch.Tensor] = []

    def stop(_i: int, logits: torch.Tensor, _a: tuple) -> None:
        got.append(logits)
        raise StopForward

    with router_hooks([router], stop):
        try:
            block_forward(layer, hidden, batch)
        except StopForward:
            pass
    return got[0]


def expert_token_counts(logits: list[torch.Tensor], masks: list[torch.Tensor], select: Callable) -> torch.Tensor:
    """Calibration tokens routed to each expert [E] (top-k membership, padding excluded)."""
    counts: torch.Tensor | None = None
    for z, m in zip(logits, masks):
        _, idx = select(z[m])  # [n, k]
        c = torch.bincount(idx.reshape(-1), minlength=z.shape[-1])
        counts = c if counts is None else counts + c
    assert counts is not None
    return counts


def load_calib(calib: str, tokenizer, seq_len: int, n_samples: int) -> tuple[list[list[int]], dict]:
    """Token ids of the first `n_samples` calibration rows, truncated to `seq_len`, and their fingerprint.

    `calib` is a Parquet file or a directory holding calib.parquet; its `input_ids` column is used
    as-is when present (balance writes it), else its `text` column is tokenized.
    """
    import pandas as pd

    from pascal_moe.errors import PascalError
    from pascal_moe.io.artifacts import fingerprint_obj, sha256_file
    from pascal_moe.io.batches import tokenize

    path = Path(calib)
    if path.is_dir():
        path = path / "calib.parquet"
    if not path.exists():
        raise PascalError(f"calibration file not found: {path} (pass a Parquet with a text column or its directory)")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is one actionable line
        raise PascalError(f"malformed calibration Parquet {path}: {str(e).splitlines()[0]}") from e
    if "input_ids" in df.columns:
        ids = [[int(t) for t in row][:seq_len] for row in df["input_ids"].iloc[:n_samples]]
    elif "text" in df.columns:
        texts = [t for t in df["text"].tolist() if isinstance(t, str) and t.strip()][:n_samples]
        ids = tokenize(texts, tokenizer, seq_len) if texts else []
    else:
        raise PascalError(f"{path} has neither a text nor an input_ids column (columns: {', '.join(df.columns)})")
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise PascalError(f"no usable calibration samples in {path} (need rows with at least 2 tokens)")
    fp = {"path": str(path), "sha256": sha256_file(path), "samples": len(ids), "tokens": sum(map(len, ids)),
          "seq_len": seq_len, "ids_fingerprint": fingerprint_obj(ids)}
    return ids, fp


def make_batches(ids: list[list[int]], batch_size: int, pad_id: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids [B, T], attention_mask [B, T]) batches in calibration order."""
    from pascal_moe.io.batches import batches

    return [(b.input_ids, b.attention_mask) for b in batches(ids, batch_size, pad_id if pad_id is not None else 0)]
