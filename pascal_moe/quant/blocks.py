"""Block inputs and hooks for block-wise calibration (AutoRound style).

Shape legend: B batch rows, T tokens per row, D hidden size, N = B*T tokens, E experts.

- `capture_block_inputs`: run the model once and keep the hidden states entering layer 0 and
  the kwargs EVERY layer receives (position_embeddings, its own attention mask, ...), stopping
  the forward with an exception at the last layer.
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

from pascal_moe.models.hooks import StopForward, router_hooks
from pascal_moe.models.base import decoder_layers

_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions", "output_router_logits")


@dataclass(slots=True)
class BlockBatch:
    """What one batch feeds every decoder layer besides the hidden states."""

    kwargs: list[dict[str, Any]]  # per decoder layer: position_embeddings, attention_mask (its own type), ...
    mask: torch.Tensor  # [N] bool: real (non-padding) tokens


class TensorCache:
    """A list of tensors kept in memory up to `limit_bytes`, then spilled to a temp dir with torch.save."""

    def __init__(self, limit_bytes: int = 2 << 30, tmp_root: str | None = None, host: bool = False):
        self.limit = limit_bytes
        self.host = host  # keep in-memory items in host RAM (pinned under CUDA), not on the device
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
            if self.host and t.device.type != "cpu":
                self.device = t.device
                return t.to("cpu").pin_memory()
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
        if isinstance(item, Path):
            return torch.load(item, map_location=self.device)
        return item.to(self.device, non_blocking=True) if self.host else item

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
def capture_block_inputs(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cache: TensorCache
) -> list[BlockBatch]:
    """Hidden states [B, T, D] entering layer 0 (appended to `cache`) and every layer's own kwargs, per batch.

    Each decoder layer gets its own keyword arguments (GPT-OSS alternates sliding and full attention
    masks), so a pre-hook on every layer records them; the forward stops at the last layer's hook.
    Layers of one type share the same mask tensor objects: nothing is copied.
    """
    layers = decoder_layers(model)
    seen: dict[str, Any] = {}

    def recorder(index: int):
        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            seen["kwargs"][index] = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _DROP_KWARGS}
            if index == len(layers) - 1:
                raise StopForward

        return pre_hook

    out: list[BlockBatch] = []
    handles = [lay.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, lay in enumerate(layers)]
    try:
        dev = next(model.parameters()).device
        for ids, attn in batches:
            seen["kwargs"] = [None] * len(layers)
            try:
                model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
            except StopForward:
                pass
            if any(k is None for k in seen["kwargs"]):
                raise RuntimeError("a decoder layer did not run during the block-input capture")
            cache.append(seen["hidden"])
            out.append(BlockBatch(list(seen["kwargs"]), attn.reshape(-1).bool().to(dev)))
    finally:
        for h in handles:
            h.remove()
    return out


def block_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder layer on cached inputs with its own kwargs (`batch.kwargs[layer_index]`): [B, T, D] -> [B, T, D]."""
    out = layer(hidden, **kwargs)
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


def logits_until_router(
    layer: nn.Module, router: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
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
            block_forward(layer, hidden, kwargs)
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


def make_batches(ids: list[list[int]], batch_size: int, pad_id: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids [B, T], attention_mask [B, T]) batches in calibration order."""
    from pascal_moe.io.batches import batches

    return [(b.input_ids, b.attention_mask) for b in batches(ids, batch_size, pad_id if pad_id is not None else 0)]
