"""`pascal quantize`: block-wise SignRound with router alignment, then export.

Flow: calibration tokens -> inputs of decoder layer 0 -> for each layer: fp outputs and fp router
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
from torch.nn.utils import parametrize

from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import fingerprint_model, versions, write_json
from pascal_moe.models import MoELayer, moe_layers
from pascal_moe.models.base import decoder_layers
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.quant import fallback as fb
from pascal_moe.quant import losses as L
from pascal_moe.quant.blocks import (BlockBatch, TensorCache, block_forward, capture_block_inputs,
                                     expert_token_counts, load_calib, logits_until_router, make_batches,
                                     router_tap)
from pascal_moe.quant.config import QuantizeConfig
from pascal_moe.quant.export import export
from pascal_moe.quant.schemes import Scheme, parse_scheme
from pascal_moe.quant.signround import QuantParams, QuantTarget, StepLoss, freeze, quantized, sign_round

METHODS = {"rtn": "none", "autoround": "none", "topk": "topk", "vsraq": "vsraq"}
console = Console(stderr=True)


def loss_weights(cfg: QuantizeConfig) -> tuple[float, L.RouterLossWeights]:
    """(lambda, router-loss weights) of a method: autoround is exactly lambda = 0."""
    if cfg.method not in METHODS:
        raise PascalError(f"unknown --method {cfg.method!r}: use {', '.join(METHODS)}")
    terms = METHODS[cfg.method]
    lam = 0.0 if terms == "none" else cfg.lambda_router
    return lam, L.RouterLossWeights(alpha_v=cfg.alpha, gamma=cfg.gamma, beta_rank=cfg.beta_rank,
                                    beta_margin=cfg.beta_margin, boundary=cfg.boundary, terms=terms)


def layer_targets(model: torch.nn.Module, index: int, moe: MoELayer | None, counts: torch.Tensor | None,
                  min_tokens: int) -> tuple[list[QuantTarget], list[int]]:
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
    for x in (moe.experts if moe is not None else []):
        if x.expert_dim is None:
            continue
        w = x.tensor  # [E, O, I] (in_dim 2) or transposed [E, I, O] (in_dim 1)
        rows_per_expert = w.numel() // (w.shape[0] * w.shape[x.in_dim])
        rows = None if ok is None else ok.repeat_interleave(rows_per_expert)  # [E * O]
        mod_name = next(n for n, m in model.named_modules() if m is x.module)
        out.append(QuantTarget(f"{mod_name}.{x.param}", x.module, x.param, x.in_dim, rows))
    return out, fallback


@torch.no_grad()
def fp_targets(layer, moe, next_layer, next_moe, xs: TensorCache, batches: list[BlockBatch], ys: TensorCache,
               downstream: bool) -> tuple[list, list, list, list]:
    """fp block outputs (into `ys`), fp router logits [N, E] and orders pi, and the next router's, per batch."""
    zs, pis, zn, pin = [], [], [], []
    for i, b in enumerate(batches):
        with router_tap(moe.router if moe else None) as logs:
            y = block_forward(layer, xs[i], b)
        ys.append(y)
        if moe is not None:
            zs.append(logs[-1].float())
            pis.append(L.fp_order(moe.choice_scores(zs[-1])))
        if downstream and next_moe is not None:
            zn.append(logits_until_router(next_layer, next_moe.router, y, b).float())
            pin.append(L.fp_order(next_moe.choice_scores(zn[-1])))
    return zs, pis, zn, pin


def make_objective(layer, moe, next_layer, next_moe, xq: TensorCache, ys: TensorCache, batches, zs, pis, zn, pin,
                   lam: float, w: L.RouterLossWeights, selective_thr: float | None):
    """Closure batch index -> StepLoss for SignRound (quantization already applied to the layer)."""

    def objective(i: int) -> StepLoss:
        b = batches[i]
        with router_tap(moe.router if moe else None) as logs, parametrize.cached():
            y = block_forward(layer, xq[i], b)  # [B, T, D]
        yfp = ys[i]
        recon = L.masked_mean(L.recon_loss(y, yfp), b.mask)
        terms, sel = [], b.mask
        if selective_thr is not None:
            sel = b.mask & (L.relative_error(y.detach(), yfp) > selective_thr)
        if lam > 0 and moe is not None:
            terms.append(L.masked_mean(L.router_loss(logs[-1], zs[i], pis[i], moe.spec.top_k, w), sel))
        if lam > 0 and zn:
            zq_next = logits_until_router(next_layer, next_moe.router, y, b)
            terms.append(L.masked_mean(L.router_loss(zq_next, zn[i], pin[i], next_moe.spec.top_k, w), sel))
        total = L.block_objective(recon, terms, lam)
        share = float(sel.sum() / b.mask.sum().clamp(min=1))
        return StepLoss(total, float(recon.detach()), float(sum(t.detach() for t in terms)) if terms else 0.0, share)

    return objective


def quantize_model(model, batches_in: list[tuple[torch.Tensor, torch.Tensor]], scheme: Scheme, cfg: QuantizeConfig
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize `model` in place block by block; returns (per-block report, int scales by parameter name)."""
    lam, w = loss_weights(cfg)
    limit = int(cfg.cache_limit_gb * (1 << 30))
    xfp, xq = TensorCache(limit // 2), TensorCache(limit // 2)
    layers = decoder_layers(model)
    moes = {m.layer_index: m for m in moe_layers(model)}
    for p in model.parameters():
        p.requires_grad_(False)
    report: dict = {"blocks": [], "fallback_experts": {}}
    scales: dict[str, torch.Tensor] = {}
    try:
        batches = capture_block_inputs(model, batches_in, xfp)
        for i in range(len(xfp)):
            xq.append(xfp[i].clone())
        for li, layer in enumerate(layers):
            t0 = time.perf_counter()
            moe, nxt = moes.get(li), moes.get(li + 1)
            next_layer = layers[li + 1] if nxt is not None else None
            ys = TensorCache(limit // 2)
            zs, pis, zn, pin = fp_targets(layer, moe, next_layer, nxt, xfp, batches, ys,
                                          cfg.downstream_router and cfg.method != "rtn")
            counts = expert_token_counts(zs, [b.mask for b in batches], moe.select) if moe else None
            floor = fb.min_tokens(counts, cfg.min_expert_tokens, cfg.fallback_threshold, moe.spec.top_k if moe else 1)
            targets, fallback = layer_targets(model, li, moe, counts, floor)
            params = [QuantParams.init(getattr(t.module, t.param), scheme, t.in_dim, t.trainable_rows)
                      for t in targets]
            entry = {"layer": li, "moe": moe is not None, "n_targets": len(targets), "fallback_experts": fallback,
                     "fallback_floor": floor if moe is not None else None,
                     "expert_tokens": counts.tolist() if counts is not None else None}
            if cfg.method != "rtn" and cfg.iters > 0:
                with quantized(targets, params, scheme):
                    thr = _selective_threshold(layer, xq, ys, batches, cfg) if cfg.selective_tokens else None
                    obj = make_objective(layer, moe, next_layer, nxt, xq, ys, batches, zs, pis, zn, pin, lam, w, thr)
                    lr = None if str(cfg.lr) == "auto" else float(cfg.lr)
                    res = sign_round(params, obj, len(batches), cfg.iters, lr, cfg.seed + li)
                entry.update({"recon_first": res.first.recon, "recon_best": res.best.recon,
                              "router_first": res.first.router, "router_best": res.best.router,
                              "loss_first": float(res.first.total), "loss_best": float(res.best.total),
                              "best_iter": res.best_iter, "selected_share": res.best.selected})
            scales.update(freeze(targets, params, scheme))
            with torch.no_grad():
                for i, b in enumerate(batches):
                    xq[i] = block_forward(layer, xq[i], b)
                    xfp[i] = ys[i]
            ys.close()
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            report["blocks"].append(entry)
            if moe is not None:
                report["fallback_experts"][f"layer{li}"] = len(fallback)
            console.print(f"block {li + 1}/{len(layers)}: {cfg.method} "
                          + (f"loss {entry['loss_first']:.4g} -> {entry['loss_best']:.4g} " if "loss_best" in entry
                             else "") + f"fallback experts {len(fallback)}  {entry['seconds']:.1f}s", highlight=False)
        report["spilled_batches"] = xfp.spilled + xq.spilled
    finally:
        xfp.close()
        xq.close()
    return report, scales


@torch.no_grad()
def _selective_threshold(layer, xq: TensorCache, ys: TensorCache, batches: list[BlockBatch],
                         cfg: QuantizeConfig) -> float:
    """The `selective_quantile` of per-token relative output errors at the RTN start (real tokens only)."""
    errs = [L.relative_error(block_forward(layer, xq[i], b), ys[i])[b.mask] for i, b in enumerate(batches)]
    return float(torch.quantile(torch.cat(errs).float(), cfg.selective_quantile))


def run(cfg: QuantizeConfig) -> Path:
    """Quantize `cfg.model` with `cfg.method` at `cfg.scheme`; write QDIR and its quantize.json."""
    scheme = parse_scheme(cfg.scheme)
    loss_weights(cfg)  # validates --method before any loading
    if cfg.iters < 0 or cfg.n_samples < 1 or cfg.seq_len < 2 or cfg.batch_size < 1:
        raise PascalError("--iters must be >= 0 and --n-samples, --seq-len, --batch-size positive")
    if str(cfg.lr) != "auto":
        try:
            if float(cfg.lr) <= 0:
                raise ValueError
        except ValueError:
            raise PascalError(f"--lr must be 'auto' or a positive number, got {cfg.lr!r}") from None
    if not 0.0 <= cfg.selective_quantile < 1.0:
        raise PascalError(f"--selective-quantile must be in [0, 1), got {cfg.selective_quantile}")
    fb.check_threshold(cfg.fallback_threshold)
    if cfg.export_format not in ("auto", "fake"):
        raise PascalError(f"unknown --export-format {cfg.export_format!r}: use auto or fake")
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    ids, calib_fp = load_calib(cfg.calib, tok, cfg.seq_len, cfg.n_samples)
    model = load_model(cfg.model, cfg.device, cfg.dtype)
    batches = make_batches(ids, cfg.batch_size, tok.pad_token_id)
    t0 = time.perf_counter()
    report, scales = quantize_model(model, batches, scheme, cfg)
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    fmt = export(model, tok, scheme, scales, out, cfg.export_format)
    moe_blocks = [b for b in report["blocks"] if b["moe"]]
    meta = {"scheme": scheme.name, "method": cfg.method, "hyperparameters": asdict(cfg), "calib": calib_fp,
            "model_fingerprint": fingerprint_model(cfg.model), "export": fmt, "seconds": round(seconds, 2),
            "seconds_per_block": round(seconds / max(len(report["blocks"]), 1), 3),
            "fallback_experts": report["fallback_experts"],
            "fallback_experts_total": sum(report["fallback_experts"].values()),
            "selected_share_mean": (sum(b.get("selected_share", 1.0) for b in moe_blocks) / len(moe_blocks)
                                    if moe_blocks else None),
            "blocks": report["blocks"], "spilled_batches": report.get("spilled_batches", 0), "versions": versions()}
    write_json(meta, out / "quantize.json")
    console.print(f"[green]wrote[/] {out} ({fmt['format']}); fallback experts per layer: "
                  f"{report['fallback_experts']}", highlight=False)
    return out
