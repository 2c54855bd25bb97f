"""`pascal eval`: each quantized model against the fp model on the same held-out tokens.

Deterministic by construction: the held-out texts are shuffled with `--seed`, packed
(EOS-separated) into non-overlapping `--seq-len` windows up to `--max-tokens`, and
prompts are the first `--prompt-tokens` tokens of the first `--prompts` texts long
enough; no sampling happens anywhere, so the same command gives the same numbers.

Memory: one model is resident at a time.  The fp model runs first (held-out windows,
each domain's windows, prompts, calibration coverage) and its per-batch references
(`metrics.reference`: reference-token log-probs, top-k expert ids per MoE layer, the
top `--kl-top-n` log-probs) go to a temporary directory under OUT; the fp model is then
freed and each quantized model is loaded in turn and compared with those files.

`eval.parquet` is long format, one row per (model, metric, layer):
model (label; "fp" for the reference), path, method, scheme, metric
(ppl | delta_ppl | kl | jaccard | gen_agreement | tokens), layer (MoE ordinal,
-1 = whole model / mean over layers), value.  The rows with layer == -1 are each
model's summary.  With `--calib`, `calib_coverage.parquet` holds calib, layer, expert,
tokens (top-k routing of each calibration set on the fp model) beside its heatmap.
With `--domains`, eval.json's `domains` holds one row per (quantized model, domain):
ppl_fp, ppl, delta_ppl, kl, jaccard, layer_jaccard, tokens (evaluate/domains.py).
"""

from __future__ import annotations

import gc
import json
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from rich.progress import Progress

from pascal_moe.errors import PascalError
from pascal_moe.evaluate import domains, metrics, plots, report
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.executor import check_executor
from pascal_moe.io.artifacts import (
    calib_file,
    fingerprint_model,
    fingerprint_texts,
    versions,
    write_json,
    write_parquet,
)
from pascal_moe.io.batches import batches, check_seq_len
from pascal_moe.io.texts import load_texts
from pascal_moe.models import moe_layers
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.capture import expert_totals


def heldout_texts(cfg: EvalConfig) -> tuple[list[str], str]:
    ts = load_texts(cfg.data, cfg.text_column, split="heldout" if cfg.data is None else None)
    texts = list(ts.texts)
    random.Random(cfg.seed).shuffle(texts)
    return texts, ts.origin


def windows(tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping windows of `seq_len` over the EOS-joined token stream, `max_tokens` in all (last may be short)."""
    flat: list[int] = []
    for start in range(0, len(texts), 64):
        for ids in tokenizer(texts[start : start + 64], add_special_tokens=False, verbose=False)["input_ids"]:
            flat.extend(ids + [tokenizer.eos_token_id])
        if len(flat) >= max_tokens:
            break
    flat = flat[:max_tokens]
    out = [flat[i : i + seq_len] for i in range(0, len(flat), seq_len)]
    return [w for w in out if len(w) >= 2]


def prompts(tokenizer, texts: list[str], n: int, prompt_tokens: int) -> torch.Tensor:
    """[P, prompt_tokens] prompts: the start of each of the first `n` texts with enough tokens."""
    out: list[list[int]] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
        if len(out) == n:
            break
    if not out:
        raise PascalError(f"no held-out text has {prompt_tokens} tokens for a prompt: lower --prompt-tokens")
    return torch.tensor(out, dtype=torch.long)


def quant_info(qdir: Path) -> dict:
    """method and scheme from QDIR/quantize.json when `pascal quantize` wrote one."""
    f = qdir / "quantize.json"
    if not f.exists():
        return {"method": "unknown", "scheme": "unknown"}
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PascalError(f"malformed {f}: {e}") from e
    return {"method": str(meta.get("method", "unknown")), "scheme": str(meta.get("scheme", "unknown"))}


def _arch(cfg: dict) -> tuple:
    experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    return cfg.get("model_type"), cfg.get("vocab_size"), cfg.get("num_hidden_layers"), experts


def check_settings(cfg: EvalConfig) -> None:
    """Numbers and files that would fail late (after minutes of evaluation) fail first, in one line."""
    for name, low in (
        ("seq_len", 2),
        ("max_tokens", 2),
        ("batch_size", 1),
        ("generate_tokens", 0),
        ("prompts", 1),
        ("prompt_tokens", 1),
        ("kl_top_n", 1),
    ):
        if getattr(cfg, name) < low:
            raise PascalError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(cfg, name)})")
    for c in cfg.calib:
        if not calib_file(c).exists():
            raise PascalError(f"calibration set not found: {c} (pass a calib.parquet or its directory)")


def check_quantized(model: str, quantized: list[str]) -> list[Path]:
    """Every QDIR exists and has the fp model's architecture, vocabulary, depth and expert count."""
    if not quantized:
        raise PascalError("no --quantized model given: pass at least one directory written by `pascal quantize`")
    ref_cfg = Path(model) / "config.json"
    ref = _arch(json.loads(ref_cfg.read_text())) if ref_cfg.exists() else None
    out = []
    for q in quantized:
        p = Path(q)
        if not (p / "config.json").exists():
            raise PascalError(
                f"quantized model not found: {q} has no config.json (pass a `pascal quantize` output dir)"
            )
        got = _arch(json.loads((p / "config.json").read_text()))
        if ref is not None and got != ref:
            raise PascalError(
                f"quantized model {q} (type, vocab, layers, experts = {got}) does not match --model "
                f"{model} ({ref}): pass models quantized from --model"
            )
        out.append(p)
    return out


def labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def calib_counts(model, tokenizer, calib: str, cfg: EvalConfig) -> torch.Tensor:
    """[L, E] tokens per expert of a calibration Parquet, routed on the fp model (input_ids, else text)."""
    p = calib_file(calib)
    if not p.exists():
        raise PascalError(f"calibration set not found: {calib}")
    df = pd.read_parquet(p)
    if "input_ids" in df.columns:
        ids = [list(map(int, x)) for x in df["input_ids"]]
    elif "text" in df.columns:
        ids = tokenizer(df["text"].tolist(), add_special_tokens=False, truncation=True, max_length=cfg.seq_len)[
            "input_ids"
        ]
    else:
        raise PascalError(f"{p} has neither input_ids nor text: pass a calib.parquet written by `pascal balance`")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return expert_totals(model, ids, cfg.batch_size, pad)


def _rows(label: str, path: str, info: dict, metric: str, values: dict[int, float]) -> list[dict]:
    return [
        {
            "model": label,
            "path": path,
            "method": info["method"],
            "scheme": info["scheme"],
            "metric": metric,
            "layer": layer,
            "value": float(v),
        }
        for layer, v in values.items()
    ]


def _model_rows(label: str, path: str, info: dict, st: metrics.PairStats) -> list[dict]:
    """eval.parquet rows of one quantized model: its summary (layer -1) and per-layer Jaccard."""
    rows = _rows(label, path, info, "ppl", {-1: st.ppl_q})
    rows += _rows(label, path, info, "delta_ppl", {-1: st.ppl_q - st.ppl_fp})
    rows += _rows(label, path, info, "kl", {-1: st.kl})
    rows += _rows(label, path, info, "jaccard", {-1: st.mean_jaccard, **dict(enumerate(st.layer_jaccard))})
    rows += _rows(label, path, info, "tokens", {-1: st.n_pred})
    if st.gen_agreement is not None:
        rows += _rows(label, path, info, "gen_agreement", {-1: st.gen_agreement})
    return rows


def _free() -> None:
    """Collect a dropped model now (HF modules hold reference cycles), return its device memory and
    hand its freed heap to the OS (else the next model's peak starts from the last one's)."""
    from pascal_moe.models.lazy import trim_heap

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _add_fp(cfg: EvalConfig, ppl_fp: float, n_pred: int, gen: bool, rows: list[dict], summary: list[dict]) -> None:
    """The fp model's eval.parquet rows and summary entry."""
    fp_info = {"method": "fp", "scheme": "fp"}
    rows += _rows("fp", cfg.model, fp_info, "ppl", {-1: ppl_fp})
    rows += _rows("fp", cfg.model, fp_info, "tokens", {-1: n_pred})
    summary.append(
        {
            "model": "fp",
            "path": cfg.model,
            **fp_info,
            "ppl": ppl_fp,
            "delta_ppl": 0.0,
            "jaccard": 1.0,
            "kl": 0.0,
            "gen_agreement": 1.0 if gen else None,
        }
    )


def _add_model(
    label: str,
    qp: Path,
    st: metrics.PairStats,
    dstats: dict[str, metrics.PairStats],
    rows: list[dict],
    summary: list[dict],
    domain_rows: list[dict],
) -> None:
    """One quantized model's eval.parquet rows, summary entry and per-domain rows."""
    info = quant_info(qp)
    rows += _model_rows(label, str(qp), info, st)
    summary.append(
        {
            "model": label,
            "path": str(qp),
            **info,
            "ppl": st.ppl_q,
            "delta_ppl": st.ppl_q - st.ppl_fp,
            "jaccard": st.mean_jaccard,
            "kl": st.kl,
            "gen_agreement": st.gen_agreement,
            "layer_jaccard": st.layer_jaccard,
        }
    )
    domain_rows += [domains.rows(label, d, ds) for d, ds in dstats.items()]


def _evaluate_local(
    cfg: EvalConfig,
    tok,
    wins: list[list[int]],
    dwins: dict[str, list[list[int]]],
    prompt_ids: torch.Tensor | None,
    qpaths: list[Path],
    out: Path,
    rows: list[dict],
    summary: list[dict],
    domain_rows: list[dict],
) -> list[torch.Tensor]:
    """The passes in this process, one model resident at a time; returns the calibration coverage [L, E] each."""
    pad = tok.pad_token_id
    with tempfile.TemporaryDirectory(prefix=".fp-reference-", dir=out) as tmp:
        fp = load_model(cfg.model, cfg.device, cfg.dtype, cfg.max_memory, cfg.offload_dir, revision=cfg.revision)
        check_seq_len(cfg.seq_len, fp)
        n_moe = len(moe_layers(fp))
        gen_fp = metrics.greedy_generate(fp, prompt_ids, cfg.generate_tokens) if prompt_ids is not None else None
        ref = metrics.reference(fp, batches(wins, cfg.batch_size, pad), cfg.kl_top_n, Path(tmp) / "mixed")
        drefs = {
            d: metrics.reference(fp, batches(w, cfg.batch_size, pad), cfg.kl_top_n, Path(tmp) / f"domain-{i}")
            for i, (d, w) in enumerate(dwins.items())
        }
        coverage = [calib_counts(fp, tok, c, cfg) for c in cfg.calib]  # [L, E] each
        del fp  # one model resident: the quantized ones load only after the fp one is gone
        _free()
        _add_fp(cfg, ref.ppl_fp, ref.n_pred, gen_fp is not None, rows, summary)
        with Progress(transient=True) as bar:
            for label, qp in zip(labels(qpaths), qpaths):
                q = load_model(str(qp), cfg.device, cfg.dtype, cfg.max_memory, cfg.offload_dir)
                if len(moe_layers(q)) != n_moe:
                    raise PascalError(f"quantized model {qp} has a different MoE layer layout than {cfg.model}")
                task = bar.add_task(f"eval {label}", total=len(wins))

                def stream():
                    for b in batches(wins, cfg.batch_size, pad):
                        yield b
                        bar.advance(task, len(b.sample_index))  # noqa: B023 (called within this iteration)

                st = metrics.compare_to(q, ref, stream())
                if gen_fp is not None:
                    st.gen_match, st.gen_total = metrics.agreement(
                        gen_fp, metrics.greedy_generate(q, prompt_ids, cfg.generate_tokens)
                    )
                dstats = {d: metrics.compare_to(q, drefs[d], batches(w, cfg.batch_size, pad)) for d, w in dwins.items()}
                _add_model(label, qp, st, dstats, rows, summary, domain_rows)
                del q
                _free()
    return coverage


def run(cfg: EvalConfig) -> Path:
    """Evaluate every --quantized model against --model; write eval.parquet, eval.json, report.md and plots."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    check_settings(cfg)
    check_executor(cfg)
    qpaths = check_quantized(cfg.model, list(cfg.quantized))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model, cfg.revision)
    dwins = domains.domain_windows(tok, cfg, windows) if domains.parse(cfg.domains) else {}  # fails before loading
    texts, origin = heldout_texts(cfg)
    wins = windows(tok, texts, cfg.seq_len, cfg.max_tokens)
    prompt_ids = prompts(tok, texts, cfg.prompts, cfg.prompt_tokens) if cfg.generate_tokens > 0 else None
    rows: list[dict] = []
    summary: list[dict] = []
    domain_rows: list[dict] = []
    if cfg.executor == "ray":  # the same passes, sharded over Ray actors (evaluate/sharded.py)
        from pascal_moe.evaluate.sharded import evaluate_on_ray

        ev = evaluate_on_ray(cfg, tok, wins, dwins, prompt_ids, qpaths)
        _add_fp(cfg, ev.ppl_fp, ev.n_pred, ev.gen_fp is not None, rows, summary)
        coverage = ev.coverage
        for label, qp, (st, dstats) in zip(labels(qpaths), qpaths, ev.models):
            _add_model(label, qp, st, dstats, rows, summary, domain_rows)
    else:
        coverage = _evaluate_local(cfg, tok, wins, dwins, prompt_ids, qpaths, out, rows, summary, domain_rows)
    df = pd.DataFrame(rows, columns=["model", "path", "method", "scheme", "metric", "layer", "value"])
    write_parquet(df, out / "eval.parquet")
    pngs = [plots.jaccard_lines(df, out / "jaccard.png"), plots.ppl_kl_bars(df, out / "ppl_kl.png")]
    cov_rows = []
    for i, (c, counts) in enumerate(zip(cfg.calib, coverage)):
        pngs.append(plots.coverage_heatmap(counts.numpy(), out / f"calib_coverage_{i}.png", title=f"coverage: {c}"))
        cov_rows += [
            {"calib": c, "layer": layer, "expert": e, "tokens": int(n)}
            for layer, row in enumerate(counts.tolist())
            for e, n in enumerate(row)
        ]
    if cov_rows:
        write_parquet(pd.DataFrame(cov_rows), out / "calib_coverage.parquet")
    meta = {
        "settings": asdict(cfg),
        "model_fingerprint": fingerprint_model(cfg.model, cfg.revision),
        "data": origin,
        "data_fingerprint": fingerprint_texts(texts),
        "windows": len(wins),
        "tokens": sum(map(len, wins)),
        "prompts": 0 if prompt_ids is None else int(prompt_ids.shape[0]),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - t0, 1),
        "summary": summary,
        "domain_windows": {d: len(w) for d, w in dwins.items()},
        "domains": domain_rows,
    }
    write_json(meta, out / "eval.json")
    report.write(out / "report.md", summary, meta, [p.name for p in pngs])
    return out
