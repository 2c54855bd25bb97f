"""Where a model's weights live: on the device, on the CPU, or on disk (issue #15).

Why a module of its own: every stage that runs the model (profile, synthesize, verify, eval,
quantize, build-calib) takes the same three options and must make the same decision.

- `--device auto|cpu|cuda|cuda:N`: where compute runs.
- `--max-memory "0=70GiB,cpu=100GiB"`: accelerate's budget keys (a GPU index or `cpu`); the
  default is 90% of each GPU's free memory and 80% of the available host RAM.
- `--offload-dir D`: disk offload; needed only when the model does not fit device + CPU budgets.

Full-forward stages: the model at its dtype fits the device budget -> all on the device (the old
path); else accelerate's device map (decoder layers never split): device, then CPU, then disk.
The quantizer keeps one decoder block on the device (`quantizer_device_map`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pascal_moe.errors import PascalError

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, where: str = "--max-memory") -> int:
    """Bytes of a size such as `70GiB`, `512MB` or `1.5GB`; one-line PascalError otherwise."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "B").upper() if m else ""
    if m is None or unit not in _UNITS:
        raise PascalError(f"bad size {text!r} in {where}: write a number with a unit, e.g. 70GiB, 512MB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_max_memory(text: str | None) -> dict[int | str, int]:
    """`"0=70GiB,cpu=100GiB"` -> {0: bytes, "cpu": bytes}; empty or None -> {} (defaults apply)."""
    out: dict[int | str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not (key == "cpu" or key.isdigit()):
            raise PascalError(
                f"bad --max-memory entry {part.strip()!r}: write DEVICE=SIZE pairs, DEVICE a GPU index or cpu, "
                'e.g. "0=70GiB,cpu=100GiB"'
            )
        dev: int | str = int(key) if key.isdigit() else "cpu"
        out[dev] = parse_size(size)
    return out


def default_max_memory() -> dict[int | str, int]:
    """90% of each GPU's free memory and 80% of the available host RAM."""
    import psutil

    out: dict[int | str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(i)
            out[i] = int(free * 0.9)
    out["cpu"] = int(psutil.virtual_memory().available * 0.8)
    return out


@dataclass
class Placement:
    """Compute device, per-device budgets in bytes (accelerate keys) and the disk offload folder."""

    device: torch.device
    max_memory: dict[int | str, int] = field(default_factory=dict)
    offload_dir: str | None = None

    @property
    def device_key(self) -> int | str:
        """The device's key in `max_memory`: its GPU index, or "cpu"."""
        if self.device.type == "cuda":
            return self.device.index if self.device.index is not None else torch.cuda.current_device()
        return "cpu"

    @property
    def device_budget(self) -> int:
        return self.max_memory.get(self.device_key, 0)

    @property
    def cpu_budget(self) -> int:
        return self.max_memory.get("cpu", 0)


def make_placement(device: str = "auto", max_memory: str | None = None, offload_dir: str | None = None) -> Placement:
    """A Placement from the three CLI options; user budgets override the defaults key by key."""
    from pascal_moe.models.loading import resolve_device

    dev = resolve_device(device)
    given = parse_max_memory(max_memory)
    budgets = {**default_max_memory(), **given}
    if dev.type == "cpu":
        budgets = {"cpu": budgets["cpu"]}  # compute on CPU: GPUs take no weights
    if offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
        raise PascalError(f"--offload-dir {offload_dir} exists and is not a directory: pass a directory path")
    return Placement(dev, budgets, offload_dir)


def empty_model(model: str, dtype: torch.dtype, revision: str | None = None) -> nn.Module:
    """The model's skeleton on the meta device (no memory): for sizes and device maps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model, revision=revision)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def host_rss() -> int:
    """Bytes this process holds in host memory now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def no_split_classes(model: nn.Module) -> list[str]:
    """Module classes accelerate must not split across devices: at least the decoder layer's class."""
    from pascal_moe.models.base import decoder_layers

    names = list(getattr(model, "_no_split_modules", None) or [])
    layer_cls = type(decoder_layers(model)[0]).__name__
    return names if layer_cls in names else [*names, layer_cls]


def full_forward_map(skeleton: nn.Module, placement: Placement) -> dict[str, int | str] | None:
    """None when the model fits the device budget (all on the device), else accelerate's device map.

    Order: the device, then the CPU, then disk (which needs --offload-dir); decoder layers never split.
    """
    from accelerate import infer_auto_device_map

    size = module_bytes(skeleton)
    if size <= placement.device_budget:
        return None
    used = host_rss()  # the host budget holds the process as well (libraries, buffers), not weights alone
    budgets: dict[int | str, int] = {placement.device_key: placement.device_budget}
    if placement.device.type == "cuda":
        budgets["cpu"] = max(placement.cpu_budget - used, 0)
    else:
        budgets["cpu"] = max(placement.device_budget - used, 0)
    dmap = infer_auto_device_map(skeleton, max_memory=budgets, no_split_module_classes=no_split_classes(skeleton))
    if "disk" in dmap.values() and placement.offload_dir is None:
        raise PascalError(
            f"the model ({size / 2**30:.2f} GiB) does not fit the --max-memory budgets "
            f"({_fmt(budgets)}): pass --offload-dir DIR for disk offload, or raise --max-memory"
        )
    return dmap


def quantizer_map(skeleton: nn.Module, placement: Placement, reserve: int = 0) -> dict[str, int | str] | None:
    """The quantizer's device map: None (all on the device) when the model fits and no --offload-dir is given.

    Otherwise embeddings, final norm and lm_head on the device; decoder layers on the CPU when ALL of
    them fit the CPU budget less `reserve` (caches, working block), else all on disk: one block is
    onloaded at a time, so partly filling the CPU would only make peak memory grow with the layers.
    """
    from pascal_moe.models.base import decoder_layers

    size = module_bytes(skeleton)
    if size + reserve <= placement.device_budget and placement.offload_dir is None:
        return None
    layers = decoder_layers(skeleton)
    names = {id(m): n for n, m in skeleton.named_modules()}
    layer_names = [names[id(m)] for m in layers]
    layer_bytes = sum(module_bytes(m) for m in layers)
    on_cpu = (
        placement.offload_dir is None
        and placement.device.type == "cuda"
        and layer_bytes + reserve <= placement.cpu_budget
    )
    if not on_cpu and placement.offload_dir is None:
        raise PascalError(
            f"the model's decoder layers ({layer_bytes / 2**30:.2f} GiB) do not fit the --max-memory budgets "
            f"({_fmt(placement.max_memory)}): pass --offload-dir DIR for disk offload, or raise --max-memory"
        )
    dev: int | str = placement.device_key
    dmap: dict[str, int | str] = {}
    for name, child in skeleton.named_children():  # the causal-LM head level: model, lm_head
        if not any(ln.startswith(name + ".") for ln in layer_names):
            dmap[name] = dev
            continue
        for sub, _m in child.named_children():
            full = f"{name}.{sub}"
            if any(ln.startswith(full + ".") for ln in layer_names):
                for ln in layer_names:
                    dmap[ln] = "cpu" if on_cpu else "disk"
            else:
                dmap[full] = dev
    return dmap


def _fmt(budgets: dict[int | str, int]) -> str:
    return ", ".join(f"{k}={v / 2**30:.2f}GiB" for k, v in budgets.items())
