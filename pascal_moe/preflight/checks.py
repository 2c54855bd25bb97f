"""Individual preflight checks: each returns findings, none loads weights or writes anything that stays.

Why: a 30B profile that dies at stage 2 (endpoint down, a missing package, an output directory that
cannot be created) wastes an hour; every such failure is cheap to see before stage 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pascal_moe.agent.endpoints import endpoint_list
from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import calib_file

FILE_SUFFIXES = (".parquet", ".jsonl", ".json")  # an --out ending so is a file (export-calib)

# Option values by name (every stage dataclass uses these names with one meaning).
AT_LEAST_ONE = (
    "seq_len",
    "profile_seq_len",
    "n_samples",
    "tokens",
    "rounds",
    "samples_per_target",
    "batch_size",
    "max_samples",
    "max_seed_samples",
    "concurrency",
    "group_size",
    "self_tokens",
    "self_width",
    "passage_words",
    "cover_tokens",
    "max_attempts",
    "max_tokens",
    "prompt_tokens",
    "max_tokens_budget",
)
AT_LEAST_ZERO = (
    "iters",
    "boundary",
    "prompts",
    "top_sensitive",
    "min_tokens_per_expert",
    "weight_error_tokens",
    "generate_tokens",
    "min_expert_tokens",
    "contexts",
    "top_triggers",
    "min_token_count",
    "seed",
    "lambda_router",
    "alpha",
    "gamma",
    "beta_rank",
    "beta_margin",
    "sensitivity_weight",
    "boundary_weight",
    "temperature",
    "backoff",
    "self_bonus",
)
SHARES = ("max_synthetic_share", "natural_share", "demand_share", "starved_ratio", "selective_quantile")
POSITIVE = ("request_timeout", "ready_timeout", "cache_limit_gb", "accept_ratio")
CHOICES = {
    "method": ("rtn", "autoround", "topk", "vsraq"),
    "export_format": ("auto", "fake"),
    "agent": ("openai", "vllm", "self", "auto"),
    "format": ("llmcompressor", "autoround", "gptqmodel", "jsonl"),
}
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass(slots=True)
class Finding:
    """One line of the preflight: ok, note (works, but read this), skipped, or error (would fail later)."""

    what: str
    status: str
    detail: str


@dataclass
class ModelInfo:
    """What the config alone tells: architecture, shapes, parameter counts (from a meta-device skeleton)."""

    source: str
    config: dict[str, Any] = field(default_factory=dict)
    in_dims: set[int] = field(default_factory=set)  # input widths of every weight a scheme groups
    params: int = 0
    active_params: int = 0
    block_params: list[int] = field(default_factory=list)  # parameters of each decoder layer (pascal plan)
    block_quantized: list[int] = field(default_factory=list)  # of those, the weights a scheme quantizes
    largest_target: int = 0  # elements of the largest single quantized tensor (fused experts: all experts)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(cfg: Any) -> list[Finding]:
    """Lengths and counts >= 1, shares in [0, 1], choices, dtype; by field name."""
    out = []
    for name, value in vars(cfg).items():
        if value is None or isinstance(value, bool):
            continue
        bad = None
        if name in AT_LEAST_ONE and isinstance(value, (int, float)) and value < 1:
            bad = "must be at least 1"
        elif name in AT_LEAST_ZERO and isinstance(value, (int, float)) and value < 0:
            bad = "must not be negative"
        elif name in SHARES and isinstance(value, (int, float)) and not 0 <= value <= 1:
            bad = "must be a share in [0, 1]"
        elif name in POSITIVE and isinstance(value, (int, float)) and value <= 0:
            bad = "must be positive"
        elif name in CHOICES and value not in CHOICES[name]:
            bad = f"must be one of {', '.join(CHOICES[name])}"
        elif name == "dtype" and value not in DTYPES:
            bad = f"must be one of {', '.join(DTYPES)}"
        elif name == "targets" and (not value or set(str(value).split(",")) - {"starved", "sensitive"}):
            bad = "must be starved, sensitive or starved,sensitive"
        if bad:
            out.append(Finding("options", "error", f"{flag(name)} {bad} (got {value!r})"))
    return out or [Finding("options", "ok", "values in range")]


def check_out(path: str, need_bytes: int = 0) -> Finding:
    """The output directory (or a file's directory) can be created and written, with room for `need_bytes`."""
    p = Path(path).expanduser().absolute()
    d = p.parent if p.suffix in FILE_SUFFIXES else p
    if d.exists() and not d.is_dir():
        return Finding("output", "error", f"cannot write to {path}: {d} exists and is not a directory")
    anc = d
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return Finding("output", "error", f"cannot create {path}: {anc} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pascal-preflight-", dir=anc))
    except OSError as e:
        return Finding(
            "output",
            "error",
            f"cannot create output directory {path}: {anc} is not writable "
            f"({e.strerror or type(e).__name__}); pick another --out",
        )
    free = shutil.disk_usage(anc).free
    if need_bytes and free < need_bytes:
        return Finding(
            "output",
            "error",
            f"{anc} has {free / 1e9:.1f} GB free, {path} needs about "
            f"{need_bytes / 1e9:.1f} GB: free space or pick another --out",
        )
    state = "exists" if d.exists() else "will be created"
    return Finding("output", "ok", f"{path} {state}, writable, {free / 1e9:.1f} GB free")


def _hub_config(model: str, full: bool, revision: str | None = None) -> tuple[dict | None, str]:
    """config.json of a hub id: from the local cache, else fetched (<= 10 s) when full and online."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        cached = try_to_load_from_cache(model, "config.json", revision=revision)
    except ValueError:  # not a valid repository id: the loader says so in one line
        return None, "not a valid hub id"
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), "hub cache"
    if not full or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return None, "not in the local cache"
    import logging
    import threading

    result: dict[str, Any] = {}

    def fetch() -> None:  # a daemon thread: an unreachable hub cannot hold the process past the timeout
        try:
            result["path"] = hf_hub_download(model, "config.json", revision=revision, etag_timeout=5)
        except Exception as e:  # noqa: BLE001 - any failure: the weights loader will say more at run time
            result["error"] = e

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings are not ours to print
    t = threading.Thread(target=fetch, daemon=True)
    t.start()
    t.join(timeout=10)
    if "path" in result:
        return json.loads(Path(result["path"]).read_text()), "fetched config.json from the hub"
    return None, f"hub not reachable ({type(result.get('error', TimeoutError())).__name__})"


def _skeleton(info: ModelInfo) -> None:
    """Shapes and parameter counts from a meta-device model (no weights are read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pascal_moe.models import moe_layers
    from pascal_moe.models.base import decoder_layers

    conf = AutoConfig.for_model(**info.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    routers: set[int] = set()
    expert_numel = 0
    quantized: dict[int, int] = {}  # id(tensor) -> elements, for every tensor a scheme quantizes
    for moe in moe_layers(model):
        routers |= {id(m) for m in moe.router.modules()}
        for x in moe.experts:
            if x.expert_dim is not None:
                info.in_dims.add(int(x.tensor.shape[x.in_dim]))
            expert_numel += x.tensor.numel()
            quantized[id(x.tensor)] = x.tensor.numel()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod) not in routers and "lm_head" not in name:
            info.in_dims.add(int(mod.weight.shape[1]))
            quantized[id(mod.weight)] = mod.weight.numel()
    info.params = sum(p.numel() for p in model.parameters())
    for layer in decoder_layers(model):
        ps = list(layer.parameters())
        info.block_params.append(sum(p.numel() for p in ps))
        info.block_quantized.append(sum(quantized.get(id(p), 0) for p in ps))
    info.largest_target = max(quantized.values(), default=0)
    n_exp = _n_experts(info.config)
    k = int(info.config.get("num_experts_per_tok") or 1)
    info.active_params = int(info.params - expert_numel * (1 - k / n_exp))


def _n_experts(conf: dict) -> int:
    return int(conf.get("num_experts") or conf.get("n_routed_experts") or conf.get("num_local_experts") or 1)


def check_model(
    model: str, full: bool, what: str = "model", revision: str | None = None
) -> tuple[list[Finding], ModelInfo | None]:
    """config.json of a local directory or hub id (short names expanded); architecture supported; skeleton shapes."""
    from pascal_moe.models import SUPPORTED
    from pascal_moe.models.hub import hub_id, missing, offline

    p = Path(model).expanduser()
    info = ModelInfo(model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            return [Finding(what, "error", f"model not found: {model} has no config.json")], None
        try:
            info.config, where = json.loads((p / "config.json").read_text()), "local"
        except (OSError, ValueError) as e:
            return [Finding(what, "error", f"malformed {p / 'config.json'}: {str(e).splitlines()[0]}")], None
    elif model.startswith((".", "/", "~")) or p.exists() or model.count("/") > 1:
        return [
            Finding(what, "error", f"model not found: {model} has no config.json (pass a model directory or a hub id)")
        ], None
    else:
        model = hub_id(model)
        conf, where = _hub_config(model, full, revision)
        if conf is None and offline():
            why = "is not in the local hub cache and HF_HUB_OFFLINE=1 is set"
            return [Finding(what, "error", str(missing(model, revision, why)))], None
        if conf is None:
            return [Finding(what, "note", f"{model}: {where}; weights and config will be downloaded at run time")], None
        info.config = conf
    mt = info.config.get("model_type")
    if mt not in SUPPORTED:
        return [
            Finding(what, "error", f"unsupported architecture {mt!r} in {model}: supported are {', '.join(SUPPORTED)}")
        ], None
    try:
        _skeleton(info)
    except PascalError as e:
        return [Finding(what, "error", f"{model}: {e}")], None
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build is reported, the run may still load it
        return [
            Finding(
                what,
                "note",
                f"{model} ({mt}, {where}): shapes unknown ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
            )
        ], info
    return [
        Finding(
            what,
            "ok",
            f"{model}: {mt}, {_n_experts(info.config)} experts, top-"
            f"{info.config.get('num_experts_per_tok')}, {info.params / 1e9:.3g}B params "
            f"({info.active_params / 1e9:.3g}B active), {where}",
        )
    ], info


def element_bytes(dtype: str, device: str) -> int:
    """Bytes per weight element in the run: `auto` is bf16 on GPU and fp32 on CPU (models/loading.py)."""
    if dtype in ("bfloat16", "bf16", "float16", "fp16"):
        return 2
    if dtype == "auto" and device != "cpu":
        import torch

        return 2 if device.startswith("cuda") or torch.cuda.is_available() else 4
    return 4


def check_scheme(name: str, info: ModelInfo | None, elem_bytes: int = 4) -> Finding:
    """A known scheme whose groups the kernels can run on this model.

    Weights are zero-padded to whole groups and cut back (quant/schemes.py from_groups); in fp32 the
    result keeps the padded row stride, and the grouped expert matmul needs 16-byte strides, so the
    padded width must be a multiple of 4: `int5-g7` on a 128-wide model pads to 133 and fails with a
    kernel RuntimeError.  In bf16/fp16 the cast back copies the weight contiguously (measured: int4-g6
    runs in bf16, fails nowhere).  Without the model's shapes the group size itself must be a multiple of 4.
    """
    from pascal_moe.quant.schemes import parse_scheme

    try:
        s = parse_scheme(name)
    except PascalError as e:
        return Finding("scheme", "error", str(e))
    g, m = s.group_size, 16 // elem_bytes
    dims = sorted(info.in_dims) if info is not None and info.in_dims else []
    bad = [d for d in dims if (-(-d // g) * g) % m] if dims else ([0] if g % m else [])
    if elem_bytes != 4:
        bad = []
    if bad:
        where = (
            f"the padded input width(s) {', '.join(str(-(-d // g) * g) for d in bad)} of {info.source}"
            if dims
            else "unknown widths"
        )
        return Finding(
            "scheme",
            "error",
            f"--scheme {name}: groups of {g} give {where}, not a multiple of {m} "
            f"(16-byte rows at {elem_bytes} bytes per weight) as the grouped kernels "
            f"need; use a group size that is a multiple of 4 (32, 64, 128)",
        )
    ragged = [d for d in dims if d % g]
    part = f"; partial last group on width(s) {', '.join(map(str, ragged))}" if ragged else ""
    return Finding("scheme", "ok", f"{s.name}: {s.fmt}, {s.bits} bits, groups of {g}{part}")


def check_device(device: str) -> Finding:
    import torch

    if device == "auto":
        return Finding("device", "ok", "auto: " + ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        return Finding("device", "error", f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            return Finding("device", "error", f"--device {device}: no CUDA GPU is visible here (use --device cpu)")
        if dev.index is not None and dev.index >= n:
            return Finding("device", "error", f"--device {device}: only {n} GPU(s) visible")
    return Finding("device", "ok", device)


def check_data(data: str | None, text_column: str = "text") -> Finding:
    """The seed text: the bundled corpus, a local file/directory (its column), or a hub dataset (downloaded later)."""
    from pascal_moe.errors import PascalError
    from pascal_moe.io.bundled import bundled_seed
    from pascal_moe.io.texts import SUFFIXES, parse_hub

    if data is None:
        try:
            return Finding("data", "ok", f"bundled seed corpus {bundled_seed()}")
        except PascalError as e:
            return Finding("data", "error", str(e))
    if not data.strip():
        return Finding(
            "data",
            "error",
            "--data is empty: pass a file, a directory or a hub dataset name, or omit it for the bundled seed corpus",
        )
    p = Path(data)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.suffix in SUFFIXES]
        return (
            Finding("data", "ok", f"{data}: {len(files)} text file(s)")
            if files
            else Finding("data", "error", f"no {'/'.join(SUFFIXES)} files in directory {data}")
        )
    if p.is_file():
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.read_schema(p).names
            except (OSError, ValueError) as e:
                return Finding("data", "error", f"malformed data file {data}: {str(e).splitlines()[0]}")
            if text_column not in names:
                return Finding(
                    "data",
                    "error",
                    f"{data} has no column {text_column!r} (it has {', '.join(names)}): pass --text-column",
                )
        return Finding("data", "ok", data)
    if p.suffix in SUFFIXES or data.startswith((".", "/", "~")):
        return Finding("data", "error", f"data not found: {data}")
    try:
        hub = parse_hub(data)
    except PascalError as e:
        return Finding("data", "error", str(e))
    return Finding(
        "data",
        "note",
        f"{data}: not a local path; loaded as hub dataset {hub.name}"
        f"{f' (config {hub.config})' if hub.config else ''} at run time",
    )


def check_inputs(cfg: Any, produced: set[str]) -> list[Finding]:
    """Directories and files an earlier stage or command writes (skipped when this run produces them)."""
    out = []
    wanted = {
        "profile": ("profile.json", "profile directory not found: {} has no profile.json (run `pascal profile` first)"),
        "calib": (
            "calib.parquet",
            "calibration set not found: {} (pass a calib.parquet, its directory or a build-calib run directory)",
        ),
    }
    for name, (marker, msg) in wanted.items():
        v = getattr(cfg, name, None)
        for item in [v] if isinstance(v, str) else v or []:
            if str(item) in produced:
                out.append(Finding(name, "skipped", f"{item}: written by an earlier stage of this run"))
                continue
            p = Path(item)
            ok = (p / marker).is_file() if name != "calib" else calib_file(p).is_file()
            out.append(Finding(name, "ok", str(item)) if ok else Finding(name, "error", msg.format(item)))
    cands = getattr(cfg, "candidates", None)
    for item in [cands] if isinstance(cands, str) else cands or []:  # verify takes one file, balance directories
        if str(item) in produced:
            continue
        ok = Path(item).is_file() or any((Path(item) / f).is_file() for f in ("synthetic.parquet", "samples.parquet"))
        out.append(
            Finding("candidates", "ok", str(item))
            if ok
            else Finding("candidates", "error", f"no synthetic.parquet or samples.parquet in {item}")
        )
    for item in getattr(cfg, "quantized", None) or []:
        ok = (Path(item) / "config.json").is_file() or str(item) in produced
        out.append(
            Finding("quantized", "ok", str(item))
            if ok
            else Finding(
                "quantized",
                "error",
                f"quantized model not found: {item} has no config.json (pass a `pascal quantize` output dir)",
            )
        )
    return out


def check_package(module: str, why: str, install: str, required: bool = True) -> Finding:
    if importlib.util.find_spec(module) is not None:
        return Finding("packages", "ok", f"{module} installed ({why})")
    return Finding("packages", "error" if required else "note", f"{module} is not installed, {why}: {install}")


def check_endpoint(base_url: str, agent_model: str | None, api_key: str, timeout: float = 5.0) -> list[Finding]:
    """List the endpoint's models and send one 1-token request; fails in about `timeout` seconds when nobody listens."""
    import httpx

    url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        r = httpx.get(f"{url}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        return [
            Finding(
                "endpoint",
                "error",
                f"agent endpoint {url} is not reachable ({type(e).__name__}): start "
                f"the server (e.g. `vllm serve MODEL --port 8000`) or fix --base-url",
            )
        ]
    if r.status_code == 401:
        return [
            Finding(
                "endpoint",
                "error",
                f"{url} rejected the API key (401): set the variable named by --api-key-env or --api-key-file",
            )
        ]
    ids = [m.get("id") for m in r.json().get("data", [])] if r.status_code == 200 else []
    if agent_model and ids and agent_model not in ids:
        return [
            Finding(
                "endpoint",
                "error",
                f"model {agent_model!r} is not served at {url} (it serves {', '.join(ids[:5])}): fix --agent-model",
            )
        ]
    model = agent_model or (ids[0] if ids else None)
    if not model:
        return [Finding("endpoint", "error", f"{url} lists no models: name one with --agent-model")]
    t0 = time.perf_counter()
    try:
        r = httpx.post(
            f"{url}/chat/completions",
            headers=headers,
            timeout=max(timeout, 30.0),
            json={"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Say OK."}]},
        )
        ok = r.status_code == 200 and bool(r.json().get("choices"))
    except (httpx.HTTPError, ValueError) as e:
        return [Finding("endpoint", "error", f"{url} did not answer a 1-token request ({type(e).__name__})")]
    if not ok:
        return [
            Finding(
                "endpoint", "error", f"{url} answered a 1-token request with HTTP {r.status_code}: {r.text[:120]!r}"
            )
        ]
    return [
        Finding(
            "endpoint",
            "ok",
            f"{url}: serves {len(ids)} model(s), using {model}; a 1-token request took "
            f"{time.perf_counter() - t0:.2f} s",
        )
    ]


def check_agent(cfg: Any, full: bool) -> list[Finding]:
    """Which backend runs (auto resolved), what it needs, and (full) whether the endpoint answers."""
    from pascal_moe.agent.backends import resolve_api_key

    base_url = ", ".join(endpoint_list(cfg.base_url))
    agent = cfg.agent if cfg.agent != "auto" else ("openai" if base_url else "self")
    if agent == "self":
        return [
            Finding("agent", "ok", "self backend (the target model writes its own passages)"),
            Finding("endpoint", "skipped", "no endpoint given (self backend)"),
        ]
    if agent == "vllm":
        out = [
            check_package(
                "vllm",
                "--agent vllm runs the agent model in-process",
                "pip install 'pascal-moe[vllm]', or serve it and use --agent openai --base-url URL",
            )
        ]
        if not cfg.agent_model:
            out.append(Finding("agent", "error", "--agent vllm needs --agent-model (a local path or model name)"))
        if cfg.base_url:
            out.append(
                Finding(
                    "agent",
                    "error",
                    f"--agent vllm runs in-process and ignores --base-url {base_url}: "
                    f"use --agent openai for a served endpoint",
                )
            )
        return out + [Finding("endpoint", "skipped", "in-process vLLM: no endpoint")]
    if agent != "openai":
        return []  # check_values reports the bad name
    if not base_url:
        return [Finding("agent", "error", "--agent openai needs an endpoint: pass --base-url or set OPENAI_BASE_URL")]
    if not full:
        return [Finding("endpoint", "skipped", f"{base_url}: checked with --dry-run and by build-calib")]
    try:
        key = resolve_api_key(cfg.api_key_env, cfg.api_key_file)
    except PascalError as e:
        return [Finding("agent", "error", str(e))]
    found = [check_endpoint(u, cfg.agent_model, key) for u in endpoint_list(cfg.base_url)]
    if len(found) > 1 and any(all(f.status != "error" for f in fs) for fs in found):  # one up is enough
        found = [[Finding(f.what, "note" if f.status == "error" else f.status, f.detail) for f in fs] for fs in found]
    return [f for fs in found for f in fs]
