"""Build a random-initialised model with Qwen3-30B-A3B's routing geometry, for memory and scale tests.

Why: placement and offload (issue #15) must be shown on a model whose layer count, expert count
and top-k are those of a real MoE, yet small enough for a CPU machine.  The config is checked in
(data/configs/qwen3-30b-a3b-shape.json: 48 MoE layers, 128 experts, top-8, normalised top-k, its
32q/4kv heads scaled to 8q/1kv, width 256: 2.45 GB in fp32 at 48 layers); the vocabulary and
tokenizer are the bundled qwen3-moe-tiny's.  The model is built on the meta device and
materialised one decoder layer at a time (seeded normal init, norms at one), each layer written
into ~200 MB safetensors shards in the checkpoint layout (per-expert keys, through transformers'
`revert_weight_conversion`) and dropped: peak memory is one shard, never the model.

    python scripts/shape_real.py --layers 8 --out runs/shape-real-8     # runs/ is gitignored
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "data/configs/qwen3-30b-a3b-shape.json"
TOKENIZER = ROOT / "data/models/qwen3-moe-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def init_(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Materialise `module` on the CPU: norms at one, every other parameter N(0, std) from `gen`."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__
            for p in mod.parameters(recurse=False):
                p.fill_(1.0) if is_norm else p.normal_(0.0, std, generator=gen)


class Shards:
    """Accumulates checkpoint tensors and writes a shard whenever `max_bytes` is reached."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, sd: dict[str, torch.Tensor]) -> None:
        self.pending.update({k: v.contiguous().clone() for k, v in sd.items()})
        if sum(v.numel() * v.element_size() for v in self.pending.values()) >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, self.out / f"part-{len(self.files):05d}.safetensors", metadata={"format": "pt"})
        self.total += sum(v.numel() * v.element_size() for v in self.pending.values())
        self.files.append(sorted(self.pending))
        self.pending = {}

    def close(self) -> None:
        """Rename parts to model-XXXXX-of-YYYYY.safetensors and write the index."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{i:05d}.safetensors").rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build(
    out: Path, layers: int | None, seed: int, shard_mb: int, config: Path = CONFIG, dtype: str = "float32"
) -> dict:
    """Write the model directory; returns its size summary."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from transformers.core_model_loading import revert_weight_conversion

    config = config / "config.json" if config.is_dir() else config
    skip = ("_", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype")
    raw = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith(skip)}
    if layers is not None:
        raw["num_hidden_layers"] = layers
    cfg = Qwen3MoeConfig(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards = Shards(out, shard_mb * 10**6)
    blocks = list(model.model.layers)
    for i, layer in enumerate(blocks):
        init_(layer, gen, cfg.initializer_range)
        sd = {f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()}
        shards.add(revert_weight_conversion(model, sd))
        layer.to("meta")
    rest = {}
    for name in ("embed_tokens", "norm"):
        mod = getattr(model.model, name)
        init_(mod, gen, cfg.initializer_range)
        rest.update({f"model.{name}.{k}": v for k, v in mod.state_dict().items()})
    init_(model.lm_head, gen, cfg.initializer_range)
    rest.update({f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()})
    shards.add(rest)
    shards.close()
    cfg.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (TOKENIZER / f).exists():
            shutil.copy2(TOKENIZER / f, out / f)
    return {"out": str(out), "layers": cfg.num_hidden_layers, "bytes": shards.total, "shards": len(shards.files)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: 48)")
    ap.add_argument("--out", default=None, help="output directory (default: runs/shape-real-N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=200, help="safetensors shard size in MB")
    ap.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help="a Qwen3-MoE config.json (or its directory), e.g. data/configs/Qwen3-30B-A3B for the real width",
    )
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="storage dtype")
    args = ap.parse_args()
    cfg_file = args.config / "config.json" if args.config.is_dir() else args.config
    n = args.layers or json.loads(cfg_file.read_text())["num_hidden_layers"]
    out = Path(args.out) if args.out else ROOT / f"runs/shape-real-{n}"
    info = build(out, args.layers, args.seed, args.shard_mb, args.config, args.dtype)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
