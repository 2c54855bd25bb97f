"""`pascal balance`: profile + candidate dirs in, packed calib.parquet + measured coverage + dataset card out.

Why a stage of its own: selection is cheap and deterministic given its inputs, so it can be
re-run with other budgets (tokens, seq_len, caps) without re-profiling or re-synthesising.
Reads only the artifacts of docs/CONTRACTS.md (profile DIR, synthetic.parquet/samples.parquet).

Sizes are tokens: documents are selected under a token budget (balance/select.py), truncated to
`seq_len`, joined with the tokenizer's EOS and cut into windows of exactly `seq_len` tokens (the last
one may be shorter).  Outputs:
- `calib.parquet`: one row per window: input_ids, n_tokens, text (the window decoded), sample_ids,
  sources, source (seed | synthetic | self | mixed), keys/counts (the window's measured routed tokens).
  Row order means nothing: every consumer takes all rows.
- `documents.parquet`: one row per selected document: sample_id, text, source, n_tokens, domain,
  targets, selected_by (natural | greedy | single | fill), pick (selection order), windows.
- `coverage.parquet`, per (layer, expert): `tokens_measured` = tokens the packed windows route to the
  expert when run through the fp model of profile.json (load_model with the profile's device and dtype;
  every non-pad token once per expert of its top-k set per MoE layer, capture.route_token_ids), which is
  what a quantizer's own router hooks count on the same windows; `tokens_predicted` = the sum of the
  selected documents' profiled counts (what the greedy optimised; packing changes each document's
  context, so the two differ slightly); `tokens_random` = measured tokens of random seed text at the
  same token count, packed the same way; demand, weight, below_after/below_before (measured vs demand).
- `manifest.json` (calib_tokens, calib_windows, budget, summaries) and `README.md` (dataset card).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from pascal_moe.balance.card import dataset_card
from pascal_moe.balance.config import BalanceConfig
from pascal_moe.balance.coverage import coverage_table, plot_coverage, summarize
from pascal_moe.balance.counts import counts_dtype, read_counts, row_scale
from pascal_moe.balance.objective import Objective, build_objective
from pascal_moe.balance.select import Selection, random_baseline_tokens, select
from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import (
    atomic_path,
    fingerprint_obj,
    read_json,
    sha256_file,
    versions,
    write_json,
    write_parquet,
    write_text,
)
from pascal_moe.io.batches import Packed, pack_windows

console = Console(stderr=True)
META = ["sample_id", "text", "source", "n_tokens"]


@dataclass(slots=True)
class Pool:
    """All candidates: metadata per row and their routed-token matrix X [N, K] (balance/counts.py)."""

    frame: pd.DataFrame  # sample_id, text, source, n_tokens, targets, domain, origin
    X: np.ndarray  # [N, K] column-major, int16 (float32 when a sample is scaled for truncation)
    inputs: dict[str, str]  # file -> sha256 (input fingerprints)

    @property
    def natural(self) -> np.ndarray:
        return (self.frame["source"] == "seed").to_numpy()


def _read_meta(path: Path, accepted_only: bool) -> pd.DataFrame:
    """The file's rows without their counts (`row` = position in the file), accepted rows only if asked."""
    try:
        schema = pq.read_schema(path)
        missing = [c for c in [*META, "keys", "counts"] if c not in schema.names]
        if missing:
            raise PascalError(
                f"{path} lacks column(s) {', '.join(missing)}: candidates need routed counts "
                "(run `pascal profile --data` on them, or use `pascal build-calib`)"
            )
        table = pq.read_table(path, columns=[c for c in schema.names if c not in ("keys", "counts")])
    except (OSError, pa.ArrowInvalid) as e:
        raise PascalError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    meta = table.to_pandas()
    meta["row"] = np.arange(len(meta))
    if accepted_only and "accepted" in meta:
        meta = meta[meta["accepted"].fillna(False).astype(bool).to_numpy()]
    frame = pd.DataFrame({c: meta[c] for c in META})
    frame["sample_id"] = frame["sample_id"].astype(str)
    frame["targets"] = (
        meta["targets"].map(lambda t: [] if t is None else [str(v) for v in t])
        if "targets" in meta
        else [[] for _ in range(len(meta))]
    )
    frame["domain"] = meta["domain"].astype(str) if "domain" in meta else "synthetic"
    frame["origin"] = str(path)
    frame["row"] = meta["row"].to_numpy()
    return frame.reset_index(drop=True)


def load_pool(profile: Path, candidates: list[str], n_keys: int, seq_len: int) -> Pool:
    """Seed rows of the profile, then accepted candidate rows; duplicate texts keep their first row.

    Two passes so the count matrix is built once, at its final size: the metadata decides which
    rows stay, then each file's keys/counts are read in Parquet batches straight into X.
    """
    files = [(profile / "samples.parquet", False), *[(_candidate_file(Path(c)), True) for c in candidates]]
    frames = [_read_meta(path, accepted) for path, accepted in files]
    inputs = {str(path): sha256_file(path) for path, _ in files}
    frame = pd.concat(frames, ignore_index=True)
    file_of = np.repeat(np.arange(len(files)), [len(f) for f in frames])  # [N] which file each row is from
    keep = ~frame["text"].duplicated().to_numpy() & frame["text"].map(lambda t: isinstance(t, str) and bool(t))
    keep = np.asarray(keep, dtype=bool)
    frame, file_of = frame[keep].reset_index(drop=True), file_of[keep]
    n_tok = frame["n_tokens"].to_numpy()
    X = np.zeros((len(frame), n_keys), dtype=counts_dtype(n_tok, seq_len), order="F")  # [N, K]
    scale = row_scale(n_tok, seq_len)
    at = 0
    for fi, (path, _) in enumerate(files):
        mine = np.flatnonzero(file_of == fi)  # ascending: rows keep their file order
        read_counts(path, frame["row"].to_numpy()[mine], X, at, scale[mine])
        at += len(mine)
    return Pool(frame.drop(columns="row"), X, inputs)


def _candidate_file(d: Path) -> Path:
    if d.is_file() and d.suffix == ".parquet":
        return d
    for name in ("synthetic.parquet", "samples.parquet"):
        if (d / name).exists():
            return d / name
    raise PascalError(f"candidate directory {d} has neither synthetic.parquet nor samples.parquet")


def _load_profile(d: Path) -> tuple[dict, pd.DataFrame]:
    for name in ("profile.json", "experts.parquet", "samples.parquet"):
        if not (d / name).exists():
            raise PascalError(f"{d} is not a profile directory ({name} missing): run `pascal profile --out {d}` first")
    meta = read_json(d / "profile.json")
    for k in ("n_layers", "n_experts", "top_k"):
        if not isinstance(meta.get(k), int) or meta[k] <= 0:
            raise PascalError(f"{d}/profile.json has no valid {k!r}: re-run `pascal profile`")
    return meta, pd.read_parquet(d / "experts.parquet")


def _check(cfg: BalanceConfig) -> None:
    if cfg.tokens <= 0 or cfg.seq_len <= 0 or cfg.batch_size <= 0:
        raise PascalError("--tokens, --seq-len and --batch-size must be positive")
    for name in ("max_synthetic_share", "natural_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise PascalError(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if cfg.min_tokens_per_expert < 0 or cfg.demand_share < 0:
        raise PascalError("--min-tokens-per-expert and --demand-share must be >= 0")


def _tokenizer_fingerprint(name: str, tok) -> str:
    f = Path(name) / "tokenizer.json"
    return sha256_file(f) if f.exists() else fingerprint_obj(sorted(tok.get_vocab().items()))


def check_truncation(ids: list[list[int]], counted: np.ndarray, profile_seq_len: int | None, seq_len: int) -> None:
    """One line when a selected document holds more tokens at --seq-len than its profile counted.

    Its counts then describe only a prefix of what the windows will hold, so the selection and the
    coverage prediction would silently mix two lengths.
    """
    longer = int(np.sum(np.array([len(x) for x in ids]) > np.asarray(counted)))
    if longer:
        at = f" at seq_len {profile_seq_len}" if profile_seq_len else ""
        raise PascalError(
            f"{longer} selected document(s) were truncated by the profile{at} but --seq-len is "
            f"{seq_len}: re-run the profile with --seq-len {seq_len} (or use `pascal build-calib`, "
            "which profiles at the calibration length)"
        )


def load_router_model(model_name: str, device: str, dtype: str, revision: str | None = None):
    """The fp model that measures the windows (the profile's, on its device, dtype and commit)."""
    from pascal_moe.models.loading import load_model

    try:
        return load_model(model_name, device, dtype, revision=revision)
    except PascalError as e:
        raise PascalError(f"{e} (balance routes the packed windows through the profile's model: pass --model)") from e


def measure(model, windows: list[list[int]], batch_size: int, pad_id: int, n_keys: int) -> tuple[list, np.ndarray]:
    """Route the windows through the model: per-window RoutedCounts and the set's tokens per key [K]."""
    from pascal_moe.profile.capture import route_token_ids

    routed = route_token_ids(model, windows, batch_size, pad_id)
    cov = np.zeros(n_keys)
    for r in routed:
        if len(r.keys) and r.keys.max() >= n_keys:
            raise PascalError("the measuring model has more experts than profile.json: pass the profile's --model")
        cov[r.keys] += r.counts
    return routed, cov


def _window_source(sources: list[str]) -> str:
    return sources[0] if len(set(sources)) == 1 else "mixed"


def calib_table(pool: Pool, docs: np.ndarray, packed: Packed, routed: list, tok) -> pa.Table:
    """calib.parquet: one row per packed window (CONTRACTS columns); `docs` [D] are pool rows in stream order."""
    ids = pool.frame["sample_id"].to_numpy()[docs]
    src = pool.frame["source"].astype(str).to_numpy()[docs]
    sources = [[str(src[m]) for m in mem] for mem in packed.members]
    return pa.table(
        {
            "input_ids": pa.array(packed.windows, pa.list_(pa.int32())),
            "n_tokens": pa.array([len(w) for w in packed.windows], pa.int32()),
            "text": pa.array(tok.batch_decode(packed.windows, skip_special_tokens=False), pa.string()),
            "sample_ids": pa.array([[str(ids[m]) for m in mem] for mem in packed.members], pa.list_(pa.string())),
            "sources": pa.array(sources, pa.list_(pa.string())),
            "source": pa.array([_window_source(s) if s else "seed" for s in sources], pa.string()),
            "keys": pa.array([r.keys.astype(np.int32) for r in routed], pa.list_(pa.int32())),
            "counts": pa.array([r.counts.astype(np.int32) for r in routed], pa.list_(pa.int32())),
        }
    )


def documents_table(pool: Pool, sel: Selection, docs: np.ndarray, ids: list[list[int]], packed: Packed) -> pd.DataFrame:
    """documents.parquet: what was picked and why, and which windows hold each document."""
    where: dict[int, list[int]] = {}
    for w, mem in enumerate(packed.members):
        for m in mem:
            where.setdefault(int(docs[m]), []).append(w)
    pick = {int(i): (r, why) for r, (i, why) in enumerate(zip(sel.index, sel.reason))}
    rows = pool.frame.iloc[docs]
    return pd.DataFrame(
        {
            "sample_id": rows["sample_id"].tolist(),
            "text": rows["text"].tolist(),
            "source": rows["source"].astype(str).tolist(),
            "n_tokens": [len(x) for x in ids],
            "domain": rows["domain"].tolist(),
            "targets": rows["targets"].tolist(),
            "selected_by": [pick[int(i)][1] for i in docs],
            "pick": [pick[int(i)][0] for i in docs],
            "windows": [where.get(int(i), []) for i in docs],
        }
    )


def _pack(pool: Pool, rows: np.ndarray, tok, seq_len: int, seed: int) -> tuple[np.ndarray, list[list[int]], Packed]:
    """Rows shuffled (seeded: windows mix the selection's parts), tokenized, truncated, packed."""
    from pascal_moe.io.batches import tokenize

    docs = np.random.default_rng(seed).permutation(np.asarray(rows, dtype=np.int64))
    ids = tokenize(pool.frame["text"].iloc[docs].tolist(), tok, seq_len) if len(docs) else []
    return docs, ids, pack_windows(ids, seq_len, tok.eos_token_id)


def run(cfg: BalanceConfig) -> Path:
    """Select under the token budget, pack, measure, write OUT/{calib,documents,coverage}.parquet, manifest, card."""
    from pascal_moe.models.hub import hub_id
    from pascal_moe.models.loading import load_tokenizer

    t0 = time.perf_counter()
    _check(cfg)
    prof_dir, out = Path(cfg.profile), Path(cfg.out)
    meta, experts = _load_profile(prof_dir)
    L, E, k = meta["n_layers"], meta["n_experts"], meta["top_k"]
    tok_name = cfg.tokenizer or meta.get("tokenizer") or meta.get("model")
    model_name = cfg.model or meta.get("model")
    if not tok_name or not model_name:
        raise PascalError(f"{prof_dir}/profile.json names no model/tokenizer: pass --model and --tokenizer")
    # the profile's hub model is read at the commit the profile saw (None: a directory, or another model)
    prof_model, commit = hub_id(str(meta.get("model"))), meta.get("model_commit")
    pinned = commit if hub_id(str(model_name)) == prof_model else None
    tok = load_tokenizer(str(tok_name), commit if hub_id(str(tok_name)) == prof_model else None)
    with console.status("loading candidates"):
        pool = load_pool(prof_dir, list(cfg.candidates), L * E, cfg.seq_len)
    natural = pool.natural
    if natural.sum() == 0:
        raise PascalError(f"{prof_dir}/samples.parquet holds no seed samples (source == 'seed')")
    sep = int(tok.eos_token_id is not None)  # one EOS joins each document to the next
    counted = pool.frame["n_tokens"].to_numpy(np.float64)  # [N] tokens the profile routed
    cost = np.minimum(counted, cfg.seq_len) + sep  # [N] tokens a row adds to the windows
    if cost.sum() - sep < cfg.tokens:
        console.print(
            f"[yellow]warning:[/] the candidates hold only {int(cost.sum() - sep)} tokens for --tokens "
            f"{cfg.tokens}: profile more seed text (--max-seed-samples) to fill the budget"
        )
    obj = build_objective(
        experts,
        E,
        L,
        k,
        cfg.tokens,
        cfg.min_tokens_per_expert,
        cfg.demand_share,
        cfg.sensitivity_weight,
        cfg.boundary_weight,
    )
    with console.status(f"selecting {cfg.tokens} tokens of {len(pool.frame)} candidates (cost-effective greedy)"):
        sel = select(
            pool.X,
            obj,
            cost,
            cfg.tokens + sep,
            natural,
            natural_share=cfg.natural_share,
            max_synthetic_share=cfg.max_synthetic_share,
            seed=cfg.seed,
        )
    base_rows, base_pred = random_baseline_tokens(pool.X, natural, cost, sel.tokens, cfg.seed)

    with console.status("tokenizing and packing"):
        docs, ids, packed = _pack(pool, sel.index, tok, cfg.seq_len, cfg.seed)
        check_truncation(ids, counted[docs], meta.get("seq_len"), cfg.seq_len)
        _, _, base_packed = _pack(pool, base_rows, tok, cfg.seq_len, cfg.seed)
    settings = meta.get("settings") or {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with console.status(f"routing {len(packed.windows)} + {len(base_packed.windows)} windows through {model_name}"):
        model = load_router_model(
            str(model_name), settings.get("device", "auto"), settings.get("dtype", "auto"), pinned
        )
        routed, measured = measure(model, packed.windows, cfg.batch_size, pad, L * E)
        _, base_cov = measure(model, base_packed.windows, cfg.batch_size, pad, L * E)
        del model
    table = calib_table(pool, docs, packed, routed, tok)
    out.mkdir(parents=True, exist_ok=True)
    synth_tokens = float(sum(len(x) for x, d in zip(ids, docs) if not natural[d]))
    size = {"documents": len(docs), "windows": len(packed.windows), "tokens": packed.n_tokens}
    after = summarize(measured, obj.demand, obj.weight, **size, synthetic_tokens=synth_tokens)
    predicted = summarize(sel.coverage, obj.demand, obj.weight, **size, synthetic_tokens=synth_tokens)
    same_tokens = summarize(
        base_cov,
        obj.demand,
        obj.weight,
        documents=len(base_rows),
        windows=len(base_packed.windows),
        tokens=base_packed.n_tokens,
        synthetic_tokens=0.0,
    )
    same_pred = summarize(
        base_pred,
        obj.demand,
        obj.weight,
        documents=len(base_rows),
        windows=len(base_packed.windows),
        tokens=base_packed.n_tokens,
        synthetic_tokens=0.0,
    )
    reach = pool.X.sum(axis=0, dtype=np.float64)  # [K]
    cov = coverage_table(base_cov, measured, sel.coverage, obj.demand, obj.weight, E, reach)
    write_parquet(cov, out / "coverage.parquet")
    write_parquet(documents_table(pool, sel, docs, ids, packed), out / "documents.parquet")
    plot_coverage(cov, same_tokens, after, out / "coverage.png")
    with atomic_path(out / "calib.parquet") as tmp:
        pq.write_table(table, tmp)
    manifest = {
        "model": meta.get("model"),
        "measured_with": str(model_name),
        "tokenizer": str(tok_name),
        "tokenizer_fingerprint": _tokenizer_fingerprint(str(tok_name), tok),
        "model_fingerprint": meta.get("model_fingerprint"),
        "profile_seq_len": meta.get("seq_len"),
        "seed_data": meta.get("data"),
        "calib_tokens": packed.n_tokens,
        "calib_windows": len(packed.windows),
        "calib_documents": len(docs),
        "budget": {
            "tokens": cfg.tokens,
            "held": packed.n_tokens,
            "ratio": round(packed.n_tokens / cfg.tokens, 5),
            "separator": "eos" if sep else None,
        },
        "parameters": asdict(cfg),
        "objective": _objective_doc(cfg, obj, k, E),
        "inputs": {
            "profile.json": sha256_file(prof_dir / "profile.json"),
            "experts.parquet": sha256_file(prof_dir / "experts.parquet"),
            **pool.inputs,
        },
        "candidates": {
            "total": int(len(pool.frame)),
            "seed": int(natural.sum()),
            "synthetic": int((~natural).sum()),
            "tokens": int(cost.sum() - sep),
        },
        "selection": {
            "picked_by": sel.reasons_count,
            "gain_updates": sel.updates,
            "sources": pool.frame["source"].iloc[docs].astype(str).value_counts().to_dict(),
            "synthetic_token_share": round(synth_tokens / max(packed.n_tokens, 1), 4),
        },
        "coverage": {
            "after_balanced": after.as_dict(),
            "after_balanced_predicted": predicted.as_dict(),
            "random_seed_same_tokens": same_tokens.as_dict(),
            "random_seed_same_tokens_predicted": same_pred.as_dict(),
            "unreachable_experts": int(np.sum(reach <= 0)),
            "counting": "tokens_measured: every non-pad token of the windows once per top-k expert per MoE "
            "layer, fp model of profile.json",
        },
        "calib_sha256": sha256_file(out / "calib.parquet"),
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    write_json(manifest, out / "manifest.json")
    write_text(dataset_card(manifest, same_tokens, after, predicted), out / "README.md")
    console.print(
        f"balance: {packed.n_tokens} tokens in {len(packed.windows)} windows of {cfg.seq_len} (budget "
        f"{cfg.tokens}); {after.experts_below_demand} of {L * E} experts below demand, measured (random seed "
        f"text at the same token count: {same_tokens.experts_below_demand}); synthetic share "
        f"{after.synthetic_share:.0%} of tokens; wrote {out / 'calib.parquet'}"
    )
    return out


def _objective_doc(cfg: BalanceConfig, obj: Objective, k: int, E: int) -> dict:
    return {
        "formula": "max F(S) = sum_e w_e * min(c_e(S), t_e) subject to sum_{i in S} tokens_i <= budget",
        "weight": f"w_e = 1 + {cfg.sensitivity_weight} * sensitivity_e + {cfg.boundary_weight} * boundary_share_e",
        "demand": f"t_e = max({cfg.min_tokens_per_expert}, {cfg.demand_share} * {cfg.tokens} * {k} / {E}"
        " * (1 + sensitivity_e))",
        "count_scaling": "counts * min(1, seq_len / n_tokens)",
        "greedy": "cost-effective: argmax gain / tokens over rows that fit, vs the best single row",
        "demand_min": float(obj.demand.min()),
        "demand_max": float(obj.demand.max()),
        "weight_min": float(obj.weight.min()),
        "weight_max": float(obj.weight.max()),
    }
