"""`pascal plan`: from the config alone, the memory each stage needs and where its weights will live.

Why: a 30B MoE run that runs out of memory in stage 4 wastes hours; its sizes are known from the
config.  The model is built on the meta device (no weights read or allocated), so parameter counts
are exact, fused expert tensors included.  Placement follows the shared rules of issue #15
(docs: pascal_moe/models/placement.py):

- full-forward stages (profile, synthesize's router check, balance's measurement, eval): all on the
  device when the weights fit its budget, else a device map (device, then CPU, then disk; a decoder
  layer is never split);
- quantize: all on the device when weights + caches fit, else embeddings/norm/lm_head and one block
  on the device, the other blocks on the CPU (all of them, when they fit its budget) or on disk;
  three block-input caches (fp inputs, quantized-chain inputs, fp targets; tokens x hidden x 4 B each)
  in memory up to 1.5 x --cache-limit-gb, the rest on disk.

Peaks are estimates: weights + activations of one forward (or one block's optimisation step),
formulas below (device peaks are torch's allocated bytes: the CUDA context, ~0.5 GiB, comes on top),
checked against measured peaks in docs/scale.md ("Plan vs measured").  Time per
stage is the preflight's (pascal_moe/preflight/plan.py, printed by --dry-run); this module adds memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pascal_moe.errors import PascalError
from pascal_moe.settings import REVISION_HELP, option

GIB = 1 << 30
# RSS of a stage process besides the model: imports (0.24 GiB measured), tokenizer, data, allocator (the
# bundled qwen3-moe-fine profile peaked at 0.82 GiB with 0.04 GiB of weights: docs/scale.md).
HOST_BASE = int(0.55 * GIB)
# Loading reads the checkpoint (mmap, resident) and builds transformers' fused expert tensors from its
# per-expert keys: two copies of the weights pass through host memory (measured 5.78 GiB for 2.29 GiB of
# weights, docs/scale.md); saving a quantized model writes one more (the checkpoint layout).
LOAD_COPIES = 2
# The unstreamed export (model in memory, saved at the end) held 2 more copies at its peak (measured: RTN
# quantize of the shape-real model peaked at 7.60 GiB = 0.55 + 3.1 x 2.29 GiB on CPU).
SAVE_COPIES = 2


@dataclass
class PlanConfig:
    """Settings of `pascal plan` (sizes of the stages a build-calib + quantize + eval run will take)."""

    model: str = option(help="model directory, hub id, short name (e.g. Qwen3-30B-A3B), or a dir with config.json")
    revision: str | None = option(None, REVISION_HELP)
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ... (where compute runs)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    max_memory: str | None = option(
        None,
        'memory budget per device, e.g. "0=80GiB,cpu=200GiB" (default: 0.9 of each GPU\'s free memory, 0.8 of '
        "available host RAM; planning for a GPU this machine lacks needs its index here)",
    )
    offload_dir: str | None = option(None, "disk offload folder the runs will be given (allows disk placement)")
    tokens: int = option(1_048_576, "calibration tokens the quantizer caches (build-calib's --tokens)")
    seq_len: int = option(2048, "calibration window (quantize, balance)")
    profile_seq_len: int = option(512, "tokens per sample in profile, synthesize and eval forwards")
    batch_size: int = option(8, "samples per forward pass (every stage's --batch-size)")
    cache_limit_gb: float = option(2.0, "quantize --cache-limit-gb: caches beyond it go to disk")
    method: str = option("vsraq", "quantize method: rtn, autoround, topk or vsraq (rtn needs no gradients)")


@dataclass(slots=True)
class Shape:
    """What the plan needs from the config: sizes, counts, and per-block parameters."""

    info: Any  # preflight ModelInfo (config dict, params, active params, block params)
    elem: int  # bytes per weight element at the run's dtype

    def get(self, *keys: str, default: int = 0) -> int:
        c = self.info.config
        return int(next((c[k] for k in keys if c.get(k)), default))

    @property
    def hidden(self) -> int:
        return self.get("hidden_size")

    @property
    def experts(self) -> int:
        return self.get("num_experts", "n_routed_experts", "num_local_experts", default=1)

    @property
    def top_k(self) -> int:
        return self.get("num_experts_per_tok", default=1)

    @property
    def weights(self) -> int:
        return self.info.params * self.elem

    @property
    def block_bytes(self) -> list[int]:
        return [n * self.elem for n in self.info.block_params]

    @property
    def other_bytes(self) -> int:
        """Embeddings, final norm, lm_head: what is not a decoder block."""
        return self.weights - sum(self.block_bytes)

    def activations(self, tokens: int, seq_len: int, kind: str, logits: bool = False, grads: bool = False) -> int:
        """Peak activation bytes of one forward over `tokens` tokens (batch x seq_len).

        Per token: hidden stream 4·D, q/k/v/o (2H + 2Hkv)·hd and expert intermediates k·(3·I + 2·D)
        at the model dtype, plus fp32 router logits E of every MoE layer (the routing recorder keeps
        them for the batch); `logits`: the vocabulary logits V at the dtype + two fp32 log-softmax
        copies (eval's KL; routing forwards keep one position only); the attention matrix B·H·S²
        (fp32) only on CPU (CUDA's SDPA is memory-efficient).  `grads` (one block's optimisation
        step): fp32, one layer's router logits, x2 for the backward.
        """
        e = 4 if grads else self.elem
        d, heads = self.hidden, self.get("num_attention_heads", default=1)
        hd = self.get("head_dim", default=d // max(heads, 1))
        kv = self.get("num_key_value_heads", default=heads)
        inter = self.get("moe_intermediate_size", "intermediate_size")
        moe = 1 if grads else sum(1 for q in self.info.block_quantized if q)
        per_tok = (4 * d + (2 * heads + 2 * kv) * hd + self.top_k * (3 * inter + 2 * d)) * e + moe * self.experts * 4
        if logits:
            per_tok += self.get("vocab_size") * (self.elem + 8)
        scores = (tokens // max(seq_len, 1)) * heads * seq_len * seq_len * 4 if kind == "cpu" else 0
        return (per_tok * tokens + scores) * (2 if grads else 1)


@dataclass(slots=True)
class Budget:
    """Where memory is: the compute device's key and budget, the CPU budget, and whether disk is allowed."""

    device: str  # "cpu" or "cuda:N"
    device_bytes: int
    cpu_bytes: int
    disk: bool

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


@dataclass(slots=True)
class StagePlan:
    """One stage: where its weights go and its peaks per device (bytes)."""

    stage: str
    placement: str
    device_peak: int
    host_peak: int
    disk: int = 0
    fits: bool = True
    why: str = ""
    notes: list[str] = field(default_factory=list)


def budget(device: str, max_memory: str | None, offload_dir: str | None) -> Budget:
    """Budgets for the plan: given ones first, else the runs' own defaults (`default_max_memory`: 0.9 of
    each GPU's free memory, 0.8 of the available host RAM)."""
    import torch

    from pascal_moe.models.placement import default_max_memory, parse_max_memory  # torch: not at CLI import

    given = parse_max_memory(max_memory)
    defaults = default_max_memory()
    cpu = given.get("cpu", defaults["cpu"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() or any(k != "cpu" for k in given) else "cpu"
    if device == "cpu":
        return Budget("cpu", cpu, cpu, offload_dir is not None)
    index = int(device.split(":")[1]) if ":" in device else 0
    dev = given.get(index, defaults.get(index))
    if dev is None:
        raise PascalError(
            f"no GPU {index} on this machine: give its budget, e.g. --max-memory {index}=80GiB,cpu=200GiB"
        )
    return Budget(f"cuda:{index}", dev, cpu, offload_dir is not None)


def _layers_split(sizes: list[int], room: int) -> int:
    """How many leading blocks fit in `room` bytes (a block is never split)."""
    n, used = 0, 0
    for s in sizes:
        if used + s > room:
            break
        n, used = n + 1, used + s
    return n


def full_forward(stage: str, shape: Shape, b: Budget, tokens: int, seq_len: int, models: int = 1) -> StagePlan:
    """A stage that runs whole forwards: all on the device when the weights fit its budget, else a device map.

    `models` 2 is eval: the fp and the quantized model side by side, each with its vocabulary logits.
    """
    act = shape.activations(tokens, seq_len, "cpu" if b.on_cpu else "cuda", logits=models > 1) * models
    weights, other = shape.weights * models, shape.other_bytes * models
    blocks = shape.block_bytes * models
    largest = max(blocks, default=0)
    if weights <= b.device_bytes:
        peak = weights + act
        single = shape.weights
        load = HOST_BASE + (weights - single if b.on_cpu else 0) + LOAD_COPIES * single  # eval: the second load
        host = max(HOST_BASE + (peak if b.on_cpu else 0), load)
        p = StagePlan(stage, f"all on {b.device}", host if b.on_cpu else peak, host)
        if peak > b.device_bytes:
            p.fits, p.why = False, f"the weights fit {b.device} but not with activations: lower --batch-size"
        elif not b.on_cpu and host > b.cpu_bytes:
            p.fits, p.why = False, "loading passes the weights through host memory twice: raise the cpu budget"
        return p
    if b.on_cpu:  # host memory is the device: the blocks beyond it go to disk, onloaded one at a time
        n_dev, room = 0, b.device_bytes - other - act - largest
        # placement.full_forward_map gives the blocks what the budget leaves after the process's own RSS
        n_cpu = _layers_split(blocks, max(room - HOST_BASE, 0))
        host = HOST_BASE + other + sum(blocks[:n_cpu]) + largest + act
        dev_peak = host
    else:  # accelerate keeps room on the device to onload the largest offloaded block
        room = b.device_bytes - other - act - largest
        n_dev = _layers_split(blocks, max(room, 0))
        n_cpu = _layers_split(blocks[n_dev:], b.cpu_bytes)
        host = HOST_BASE + sum(blocks[n_dev : n_dev + n_cpu])
        dev_peak = other + sum(blocks[:n_dev]) + largest + act
    n_disk = len(blocks) - n_dev - n_cpu
    where = ([] if b.on_cpu else [f"{n_dev} blocks on {b.device}"]) + [f"{n_cpu} on cpu"]
    where += [f"{n_disk} on disk"] if n_disk else []
    p = StagePlan(stage, "device map: " + ", ".join(where), dev_peak, host, sum(blocks[n_dev + n_cpu :]))
    if room < 0:
        p.fits, p.why = False, f"{b.device} cannot hold embeddings, lm_head, activations and one block"
    elif n_disk and not b.disk:
        p.fits, p.why = False, f"{n_disk} blocks need disk: pass --offload-dir, or raise --max-memory"
    return p


def quantize(shape: Shape, b: Budget, cfg: Any) -> tuple[StagePlan, dict[str, int]]:
    """One block on the device at a time (when the model does not fit), caches in memory up to the limit."""
    n, d = cfg.tokens, shape.hidden
    caches = 3 * n * d * 4
    in_mem = min(caches, int(cfg.cache_limit_gb * GIB) * 3 // 2)
    reserve = in_mem + 2 * n * shape.experts * 4  # + fp32 router logits [N, E] of the current layer, fp and quantized
    kind = "cpu" if b.on_cpu else "cuda"
    batch = cfg.batch_size * cfg.seq_len
    q_elems = max(shape.info.block_quantized, default=0)
    if cfg.method == "rtn":  # one tensor at a time: fp32 copy, scaled and rounded copies
        work = shape.info.largest_target * 4 * 3 + shape.activations(batch, cfg.seq_len, kind)
    else:  # V and its gradient (fp32), the fake-quantized weights and their gradient, per block
        work = q_elems * 4 * 4 + shape.activations(batch, cfg.seq_len, kind, grads=True)
    block = max(shape.block_bytes, default=0)
    nxt = block if cfg.method in ("vsraq", "topk") else 0  # the downstream-router term reads the next block
    cache_info = {"caches": caches, "in_memory": in_mem, "on_disk": caches - in_mem, "reserve": reserve}
    if shape.weights + reserve <= b.device_bytes - (HOST_BASE if b.on_cpu else 0) and not b.disk:
        peak = shape.weights + reserve + work
        run_peak = HOST_BASE + (peak if b.on_cpu else 0)
        save = HOST_BASE + (shape.weights if b.on_cpu else 0) + SAVE_COPIES * shape.weights
        host = max(run_peak, HOST_BASE + LOAD_COPIES * shape.weights, save)
        p = StagePlan("quantize", f"all on {b.device}", host if b.on_cpu else peak, host, caches - in_mem)
        if (host if b.on_cpu else peak) > b.device_bytes:
            p.fits, p.why = False, "one block's optimisation does not fit: lower --batch-size or --cache-limit-gb"
        elif not b.on_cpu and host > b.cpu_bytes:
            p.fits, p.why = False, "loading and saving pass the weights through host memory: raise the cpu budget"
        return p, cache_info
    layers = sum(shape.block_bytes)
    on_cpu = not b.on_cpu and not b.disk and layers + reserve <= b.cpu_bytes - HOST_BASE
    save = SAVE_COPIES * block  # the streamed export packs and writes one block's shard at a time
    dev_peak = shape.other_bytes + block + nxt + work
    host = HOST_BASE + reserve + (layers if on_cpu else block) + save
    if b.on_cpu:  # one memory: the block's work, the caches and the export share it (measured: docs/scale.md)
        dev_peak = host = HOST_BASE + reserve + shape.other_bytes + block + nxt + work + save
    where = f"1 block at a time on {b.device}, the others on {'cpu' if on_cpu else 'disk'}"
    p = StagePlan("quantize", where, dev_peak, host, (0 if on_cpu else layers) + caches - in_mem)
    if not on_cpu and not b.disk:
        p.fits, p.why = False, "decoder blocks do not fit the cpu budget: pass --offload-dir, or raise --max-memory"
    elif b.on_cpu:  # the --max-memory budget counts tensors, not the interpreter (HOST_BASE)
        if host - HOST_BASE > b.cpu_bytes:
            p.fits, p.why = (
                False,
                "one block's work and the caches do not fit cpu: lower --batch-size or --cache-limit-gb",
            )
    elif dev_peak > b.device_bytes:
        p.fits, p.why = False, f"one block's optimisation does not fit {b.device}: lower --batch-size"
    elif host > b.cpu_bytes:
        p.fits, p.why = False, "caches do not fit host memory: lower --cache-limit-gb"
    return p, cache_info


def stages(shape: Shape, b: Budget, cfg: Any) -> tuple[list[StagePlan], dict[str, int]]:
    """Every stage of profile -> synthesize -> balance -> quantize -> eval for these settings."""
    fwd = cfg.batch_size * cfg.profile_seq_len
    q, cache = quantize(shape, b, cfg)
    rows = [
        full_forward("profile", shape, b, fwd, cfg.profile_seq_len),
        full_forward("synthesize", shape, b, fwd, cfg.profile_seq_len),
        full_forward("balance", shape, b, cfg.batch_size * cfg.seq_len, cfg.seq_len),
        q,
        full_forward("eval", shape, b, fwd, cfg.profile_seq_len, models=2),
    ]
    rows[1].notes.append("router check of synthetic passages")
    rows[2].notes.append("routes the packed windows")
    rows[4].notes.append("fp and quantized model side by side")
    return rows, cache


def model_shape(model: str, revision: str | None, device: str, dtype: str) -> Shape:
    """The meta-device skeleton of `model`'s config (a local dir, a hub id or short name in the cache/hub)."""
    from pascal_moe.models.loading import resolve_device, resolve_dtype
    from pascal_moe.preflight.checks import check_model

    found, info = check_model(model, full=True, revision=revision)
    bad = [f.detail for f in found if f.status == "error"] or ([found[0].detail] if info is None else [])
    if bad or info is None or not info.block_params:
        raise PascalError(bad[0] if bad else f"{model}: cannot size the model from its config")
    return Shape(info, resolve_dtype(dtype, resolve_device(device)).itemsize)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def run(cfg: PlanConfig) -> list[StagePlan]:
    """`pascal plan`: print the model's sizes and each stage's placement and peaks; returns the rows."""
    from rich.console import Console
    from rich.table import Table

    b = budget(cfg.device, cfg.max_memory, cfg.offload_dir)
    shape = model_shape(cfg.model, cfg.revision, b.device, cfg.dtype)
    rows, cache = stages(shape, b, cfg)
    c, info = Console(), shape.info
    moe = sum(1 for q in info.block_quantized if q) if info.block_quantized else 0
    c.print(f"[bold]plan[/] {cfg.model}: {info.config.get('model_type')}, {len(info.block_params)} blocks", end="")
    c.print(f", MoE layers x experts x top-k = {moe} x {shape.experts} x {shape.top_k}", highlight=False)
    c.print(
        f"  parameters {info.params / 1e9:.2f}B total, {info.active_params / 1e9:.2f}B active; weights "
        f"{gib(info.params * 2)} at bf16, {gib(info.params * 4)} at fp32 (run dtype: {shape.elem} B)",
        highlight=False,
    )
    c.print(
        f"  budgets {b.device} {gib(b.device_bytes)}"
        + ("" if b.on_cpu else f", cpu {gib(b.cpu_bytes)}")
        + (", disk allowed" if b.disk else ", no --offload-dir"),
        highlight=False,
    )
    c.print(
        f"  calibration caches 3 x {gib(cache['caches'] // 3)} ({cfg.tokens:,} tokens x {shape.hidden} x 4 B): "
        f"{gib(cache['in_memory'])} in memory, {gib(cache['on_disk'])} on disk (--cache-limit-gb {cfg.cache_limit_gb})",
        highlight=False,
    )
    t = Table(show_edge=False)
    for col in ("stage", "placement", f"{b.device} peak", "host peak", "disk", "fits"):
        t.add_column(col)
    for r in rows:
        ok = "[green]yes[/]" if r.fits else f"[red]no[/]: {r.why}"
        dev = r.device_peak if not b.on_cpu else r.host_peak
        t.add_row(r.stage, r.placement, gib(dev), gib(r.host_peak), gib(r.disk) if r.disk else "-", ok)
    c.print(t)
    return rows


def stage_plan(cfg: Any, info: Any) -> StagePlan | None:
    """The memory row of one stage's settings (for --dry-run); None for a stage that loads no model here."""
    from pascal_moe.agent.config import SynthesizeConfig
    from pascal_moe.evaluate.config import EvalConfig
    from pascal_moe.models.loading import resolve_device, resolve_dtype
    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.quant.config import QuantizeConfig

    if info is None or not info.block_params or not hasattr(cfg, "device"):
        return None
    b = budget(cfg.device, getattr(cfg, "max_memory", None), getattr(cfg, "offload_dir", None))
    shape = Shape(info, resolve_dtype(cfg.dtype, resolve_device(b.device)).itemsize)
    if isinstance(cfg, QuantizeConfig):
        q = PlanConfig(
            model=cfg.model,
            tokens=cfg.tokens or PlanConfig.tokens,
            seq_len=cfg.seq_len or PlanConfig.seq_len,
            batch_size=cfg.batch_size,
            cache_limit_gb=cfg.cache_limit_gb,
            method=cfg.method,
        )
        return quantize(shape, b, q)[0]
    tokens = cfg.batch_size * cfg.seq_len
    if isinstance(cfg, EvalConfig):
        return full_forward("eval", shape, b, tokens, cfg.seq_len, models=2)
    if isinstance(cfg, (ProfileConfig, SynthesizeConfig)):
        return full_forward(type(cfg).__name__.removesuffix("Config").lower(), shape, b, tokens, cfg.seq_len)
    return None
