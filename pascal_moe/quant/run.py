"""`pascal quantize`: block-wise SignRound with router alignment, then export.

Flow: preflight (options, export writable) -> the whole calibration set as windows (quant/calib.py)
-> inputs of decoder layer 0 and every layer's own kwargs -> for each layer: fp outputs and fp router
logits (targets) -> learn V/alpha/beta on L_recon + lambda L_router (or plain RTN) -> freeze ->
the quantized layer's outputs on the quantized chain become the next layer's inputs (AutoRound's
`enable_quanted_input`: targets come from the fp chain, training inputs from the quantized one).

Shape legend: B batch rows, T tokens, D hidden, N = B*T tokens, E experts, k top-k.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import fingerprint_model, versions, write_json, write_text
from pascal_moe.models import MoELayer, moe_layers
from pascal_moe.models.base import decoder_layers
from pascal_moe.models.placement import parse_max_memory
from pascal_moe.models.loading import load_tokenizer
from pascal_moe.quant import fallback as fb
from pascal_moe.quant import losses as L
from pascal_moe.quant.blocks import TensorCache, block_forward, capture_block_inputs, expert_token_counts, make_batches
from pascal_moe.quant.calib import calib_windows, read_calib, window_length
from pascal_moe.quant.card import model_card
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.export import check_export, export
from pascal_moe.quant.onload import Blocks, layers_skipped, load_for_quantize
from pascal_moe.quant.objective import BlockSetup, evaluate, fixed_selection, fp_targets, make_objective, rtn_errors
from pascal_moe.quant.report import calib_fingerprint, coverage_match
from pascal_moe.quant.schemes import Scheme, parse_scheme
from pascal_moe.quant.signround import QuantParams, QuantTarget, freeze, quantized, sign_round
from pascal_moe.quant.stream import StreamExport

METHODS = {"rtn": "none", "autoround": "none", "topk": "topk", "vsraq": "vsraq"}
console = Console(stderr=True)


def loss_weights(cfg: QuantizeConfig) -> tuple[float, float, L.RouterLossWeights]:
    """(lambda own router, lambda downstream, router-loss weights) of a method: autoround is exactly lambda = 0."""
    if cfg.method not in METHODS:
        raise PascalError(f"unknown --method {cfg.method!r}: use {', '.join(METHODS)}")
    terms = METHODS[cfg.method]
    lam = 0.0 if terms == "none" else cfg.lambda_router
    down = cfg.lambda_router if cfg.lambda_downstream is None else cfg.lambda_downstream
    lam_down = 0.0 if terms == "none" or not cfg.downstream_router else down
    return (
        lam,
        lam_down,
        L.RouterLossWeights(
            alpha_v=cfg.alpha,
            gamma=cfg.gamma,
            beta_rank=cfg.beta_rank,
            beta_margin=cfg.beta_margin,
            boundary=cfg.boundary,
            terms=terms,
        ),
    )


def layer_targets(
    model: torch.nn.Module, index: int, moe: MoELayer | None, counts: torch.Tensor | None, min_tokens: int
) -> tuple[list[QuantTarget], list[int]]:
    """Every weight of decoder layer `index` to quantize, and the experts that fall back to RTN.

    All nn.Linear except the router, plus fused expert tensors [E, O, I] (grouped along in_dim).
    Routers, norms, embeddings and lm_head stay full precision.
    """
    layer = decoder_layers(model)[index]
    prefix = next(n for n, m in model.named_modules() if m is layer)
    fallback = [] if counts is None else [e for e, c in enumerate(counts.tolist()) if c < min_tokens]
    ok = None if counts is None else counts >= min_tokens  # [E] bool
    router_mods = set() if moe is None else {id(m) for m in moe.router.modules()}
    per_expert = {} if moe is None else {id(x.module): x.expert for x in moe.experts if x.expert_dim is None}
    out = []
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod) not in router_mods:
            rows = None
            if id(mod) in per_expert and ok is not None:
                rows = ok[per_expert[id(mod)]].expand(mod.weight.shape[0]).clone()
            out.append(QuantTarget(f"{prefix}.{name}.weight", mod, "weight", 1, rows))
    for x in moe.experts if moe is not None else []:
        if x.expert_dim is None:
            continue
        w = x.tensor  # [E, O, I] (in_dim 2) or transposed [E, I, O] (in_dim 1)
        rows_per_expert = w.numel() // (w.shape[0] * w.shape[x.in_dim])
        rows = None if ok is None else ok.repeat_interleave(rows_per_expert)  # [E * O]
        mod_name = next(n for n, m in model.named_modules() if m is x.module)
        out.append(QuantTarget(f"{mod_name}.{x.param}", x.module, x.param, x.in_dim, rows))
    return out, fallback


def quantize_model(
    model,
    batches_in: list[tuple[torch.Tensor, torch.Tensor]],
    scheme: Scheme,
    cfg: QuantizeConfig,
    blocks: Blocks | None = None,
    sink: StreamExport | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize `model` in place block by block; returns (per-block report, int scales by parameter name).

    `blocks` onloads one block at a time (offloaded models; default: all already on the device);
    `sink` writes each block's shard as soon as it is frozen, then the block is released.
    """
    lam, lam_down, w = loss_weights(cfg)
    limit = int(cfg.cache_limit_gb * (1 << 30))
    blocks = blocks or Blocks(model, next(model.parameters()).device, False)
    host = blocks.offloaded
    root = cfg.cache_dir or (cfg.out if blocks.offloaded else None)
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    xfp, xq = TensorCache(limit // 2, root, host), TensorCache(limit // 2, root, host)
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    moes = {m.layer_index: m for m in moe_layers(model)}
    for p in model.parameters():
        p.requires_grad_(False)
    report: dict = {"blocks": [], "fallback_experts": {}, "expert_token_counts": {}}
    scales: dict[str, torch.Tensor] = {}
    try:
        with layers_skipped(model):  # only layer 0's input and the kwargs: no block weights read
            batches = capture_block_inputs(model, batches_in, xfp)
        for i in range(len(xfp)):
            xq.append(xfp[i].clone())
        for li in range(len(layers)):
            t0 = time.perf_counter()
            moe, nxt = moes.get(li), moes.get(li + 1)
            layer = blocks.load(li)
            nxt_layer = None
            if nxt is not None:  # the next block is read only by the downstream-router term
                nxt_layer = blocks.load(li + 1) if lam_down > 0 else layers[li + 1]
            setup = BlockSetup(li, layer, moe, nxt_layer, nxt, batches)
            ys = TensorCache(limit // 2, root, host)
            tg = fp_targets(setup, xfp, ys, lam_down > 0, cfg.boundary)
            counts = expert_token_counts(tg.zs, [b.mask for b in batches], moe.select) if moe else None
            floor = fb.min_tokens(counts, cfg.min_expert_tokens, cfg.fallback_threshold, moe.spec.top_k if moe else 1)
            targets, fallback = layer_targets(model, li, moe, counts, floor)
            learn = cfg.method != "rtn" and cfg.iters > 0
            params = [
                QuantParams.init(getattr(t.module, t.param), scheme, t.in_dim, t.trainable_rows, learn) for t in targets
            ]
            entry = {
                "layer": li,
                "moe": moe is not None,
                "n_targets": len(targets),
                "fallback_experts": fallback,
                "fallback_floor": floor if moe is not None else None,
                "expert_tokens": counts.tolist() if counts is not None else None,
            }
            if learn:
                entry.update(_optimise(setup, targets, params, scheme, xq, ys, tg, lam, lam_down, w, cfg))
            block_scales = freeze(targets, params, scheme)
            with torch.no_grad():
                for i, b in enumerate(batches):
                    xq[i] = block_forward(layer, xq[i], b.kwargs[li])
                    xfp[i] = ys[i]
            ys.close()
            del tg, params, targets
            if sink is not None:
                sink.block(li, names[id(layer)], layer, block_scales)
            else:
                scales.update(block_scales)
            blocks.release(li)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            report["blocks"].append(entry)
            if moe is not None:
                report["fallback_experts"][f"layer{li}"] = len(fallback)
                report["expert_token_counts"][f"layer{li}"] = counts.tolist()
            console.print(
                f"block {li + 1}/{len(layers)}: {cfg.method} "
                + (
                    f"recon {entry['loss_rtn']:.4g} (rtn) -> {entry['loss_final']:.4g} "
                    if "loss_final" in entry
                    else ""
                )
                + f"fallback experts {len(fallback)}  {entry['seconds']:.1f}s",
                highlight=False,
            )
        report["spilled_batches"] = xfp.spilled + xq.spilled
    finally:
        xfp.close()
        xq.close()
    return report, scales


def _optimise(
    setup: BlockSetup,
    targets,
    params,
    scheme: Scheme,
    xq: TensorCache,
    ys: TensorCache,
    tg,
    lam: float,
    lam_down: float,
    w: L.RouterLossWeights,
    cfg: QuantizeConfig,
) -> dict:
    """SignRound on one block; the report entry: losses over all batches at the RTN start and at the end.

    loss_rtn / loss_final: token-weighted reconstruction MSE over every batch (V = 0, alpha = beta = 1 vs
    the learnt iterate); router_* / downstream_*: the unweighted router terms, same batches.
    """
    with quantized(targets, params, scheme):
        sel = None
        if cfg.selective_tokens:
            sel = fixed_selection(rtn_errors(setup, xq, ys), [b.mask for b in setup.batches], cfg.selective_quantile)
        obj = make_objective(setup, xq, ys, tg, lam, lam_down, w, sel)
        start = evaluate(obj, setup.batches)
        lr = None if str(cfg.lr) == "auto" else float(cfg.lr)
        res = sign_round(params, obj, len(setup.batches), cfg.iters, lr, cfg.seed + setup.li)
        end = evaluate(obj, setup.batches)
    n_real = sum(float(b.mask.sum()) for b in setup.batches)
    share = 1.0 if sel is None else sum(float(s.sum()) for s in sel) / max(n_real, 1.0)
    return {
        "loss_rtn": start["recon"],
        "loss_final": end["recon"],
        "router_rtn": start["router"],
        "router_final": end["router"],
        "downstream_rtn": start["downstream"],
        "downstream_final": end["downstream"],
        "objective_rtn": start["total"],
        "objective_final": end["total"],
        "recon_first": res.first.recon,
        "recon_best": res.best.recon,
        "router_first": res.first.router,
        "router_best": res.best.router,
        "downstream_first": res.first.downstream,
        "loss_first": float(res.first.total),
        "loss_best": float(res.best.total),
        "best_iter": res.best_iter,
        "selected_share": share,
    }


def model_config(model: str, revision: str | None = None):
    """The model's transformers config (sizes and positions, before any weight is loaded)."""
    from transformers import AutoConfig

    from pascal_moe.models.hub import resolve

    ref = resolve(model, revision)
    try:
        return AutoConfig.from_pretrained(ref.source, revision=ref.load_revision)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one actionable line
        raise PascalError(f"cannot read the config of {model}: {str(e).splitlines()[0]}") from e


def cache_reserve(conf, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: QuantizeConfig) -> int:
    """Host bytes the block caches and router targets take: three [N, D] fp32 caches (capped by
    --cache-limit-gb, the rest goes to --cache-dir) plus fp32 router logits [N, E] per layer."""
    text = getattr(conf, "text_config", None) or conf
    n_tokens = sum(ids.numel() for ids, _ in batches)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    experts = max(int(getattr(text, k, 0) or 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    caches = min(3 * n_tokens * hidden * 4, int(cfg.cache_limit_gb * (1 << 30)) * 3 // 2)
    return caches + 2 * n_tokens * experts * 4


def _check(cfg: QuantizeConfig) -> Scheme:
    """One-line errors on every option, before anything is loaded."""
    scheme = parse_scheme(cfg.scheme)
    loss_weights(cfg)  # validates --method
    if cfg.iters < 0 or cfg.batch_size < 1:
        raise PascalError("--iters must be >= 0 and --batch-size positive")
    for name in ("tokens", "seq_len"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 2:
            raise PascalError(f"--{name.replace('_', '-')} must be at least 2 (or left unset)")
    if str(cfg.lr) != "auto":
        try:
            if float(cfg.lr) <= 0:
                raise ValueError
        except ValueError:
            raise PascalError(f"--lr must be 'auto' or a positive number, got {cfg.lr!r}") from None
    if not 0.0 <= cfg.selective_quantile < 1.0:
        raise PascalError(f"--selective-quantile must be in [0, 1), got {cfg.selective_quantile}")
    if cfg.lambda_downstream is not None and cfg.lambda_downstream < 0:
        raise PascalError(f"--lambda-downstream must be >= 0, got {cfg.lambda_downstream}")
    fb.check_threshold(cfg.fallback_threshold)
    parse_max_memory(cfg.max_memory)
    if cfg.export_format not in ("auto", "fake"):
        raise PascalError(f"unknown --export-format {cfg.export_format!r}: use auto or fake")
    return scheme


def run(cfg: QuantizeConfig) -> Path:
    """Quantize `cfg.model` with `cfg.method` at `cfg.scheme`; write QDIR and its quantize.json."""
    scheme = _check(cfg)
    out = Path(cfg.out)
    check_export(out, scheme, cfg.export_format)  # before any block work: nothing half-written
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model, cfg.revision)
    rows = read_calib(cfg.calib, tok)
    conf = model_config(cfg.model, cfg.revision)
    win = calib_windows(
        rows, window_length(rows, cfg.seq_len, getattr(conf, "max_position_embeddings", None)), cfg.tokens, cfg.seed
    )
    batches = make_batches(win.ids, cfg.batch_size, tok.pad_token_id)
    model, blocks, _place = load_for_quantize(
        cfg.model,
        cfg.device,
        cfg.dtype,
        cfg.max_memory,
        cfg.offload_dir,
        cache_reserve(conf, batches, cfg),
        cfg.revision,
    )
    sink = StreamExport(model, scheme, out, len(decoder_layers(model)), cfg.export_format) if blocks.offloaded else None
    t0 = time.perf_counter()
    report, scales = quantize_model(model, batches, scheme, cfg, blocks, sink)
    seconds = time.perf_counter() - t0
    if sink is not None:
        prefixes = [n for n, m in model.named_modules() if any(m is lay for lay in decoder_layers(model))]
        fmt = sink.finish(prefixes, tok)
    else:
        fmt = export(model, tok, scheme, scales, out, cfg.export_format)
    tuned = [b for b in report["blocks"] if "selected_share" in b]
    meta = {
        "scheme": scheme.name,
        "grid": scheme.grid if scheme.fmt == "int" else None,  # ct: compressed-tensors' amax/((2^b-1)/2); full
        "method": cfg.method,
        "hyperparameters": asdict(cfg),
        "calib": calib_fingerprint(rows, win, cfg.tokens),
        "calib_rows_used": win.rows_used,
        "calib_tokens_used": win.tokens_used,
        "expert_token_counts": report["expert_token_counts"],
        "coverage_match": coverage_match(rows.path, report["expert_token_counts"]),
        "model_fingerprint": fingerprint_model(cfg.model, cfg.revision),
        "export": fmt,
        "placement": {
            "offloaded": blocks.offloaded,
            "blocks_from": None if not blocks.offloaded else "checkpoint" if blocks.lazy else "accelerate",
        },
        "seconds": round(seconds, 2),
        "seconds_per_block": round(seconds / max(len(report["blocks"]), 1), 3),
        "fallback_experts": report["fallback_experts"],
        "fallback_experts_total": sum(report["fallback_experts"].values()),
        "selected_share_mean": (sum(b["selected_share"] for b in tuned) / len(tuned) if tuned else None),
        "blocks": report["blocks"],
        "spilled_batches": report.get("spilled_batches", 0),
        "versions": versions(),
    }
    write_json(meta, out / "quantize.json")
    write_text(model_card(meta, cfg.model), out / "README.md")
    console.print(
        f"[green]wrote[/] {out} ({fmt['format']}); {win.rows_used} rows, {win.tokens_used} tokens; "
        f"fallback experts per layer: {report['fallback_experts']}",
        highlight=False,
    )
    return out
