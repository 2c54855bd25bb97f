"""Every term of the block objective: reconstruction and router alignment (methods.md §2).

Shape legend: N tokens, E routed experts, k experts per token, b boundary margins, D hidden size.

Each term is a small pure function returning a *per-token* loss [N] so that the caller can
average it over any token subset (padding removed, or only the tokens whose output moved
under `--selective-tokens`).  All router terms index the quantized logits with the fp order
`pi`: `pi = fp_order(layer.choice_scores(z_fp))`.  For softmax routers the choice score is the
logit itself; for sigmoid routers (DeepSeek-V3) it is the biased, group-limited score
`sigmoid(z) + e_score_correction_bias` with masked groups at -inf - the ordering that actually
selects experts.  The *values* compared are always the raw logits z (pre-softmax / pre-sigmoid),
so for a biased router `z_pi(1) >= z_pi(2)` need not hold; L_rank then pushes the quantized
logits toward the selection order, which is what routing depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

RouterTerms = Literal["none", "topk", "vsraq"]


@dataclass(frozen=True)
class RouterLossWeights:
    """Hyperparameters of L_router; defaults are the paper's (methods.md §2 table)."""

    alpha_v: float = 0.3  # share of L_sig in L_value
    gamma: float = 1.0  # exponent of the sigmoid-aware weights
    eps_w: float = 1e-3  # floor of the sigmoid-aware weights
    m_rank: float = 0.0  # rank margin inside the softplus
    beta_rank: float = 0.01
    beta_margin: float = 0.05
    boundary: int = 1  # b: margins between the k-th expert and the b experts after it
    terms: RouterTerms = "vsraq"  # "topk": L_TopK only; "vsraq": L_value + L_struct; "none": 0


def fp_order(choice_scores_fp: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """pi [N, E]: experts sorted by the fp choice score, descending (-inf masked groups last).

    `keep`: only the first `keep` columns [N, keep] (every router term reads pi[:, :k + b]), so a
    cached order costs k + b indices per token instead of E.
    """
    pi = torch.argsort(choice_scores_fp.float(), dim=-1, descending=True, stable=True)
    return pi if keep is None or keep >= pi.shape[-1] else pi[:, :keep].clone()


def ordered(z: torch.Tensor, pi: torch.Tensor, n: int) -> torch.Tensor:
    """z_pi(1..n) [N, n]: logits gathered in the fp order."""
    return z.float().gather(-1, pi[:, :n])


def topk_mse(zq: torch.Tensor, zfp: torch.Tensor, pi: torch.Tensor, k: int) -> torch.Tensor:
    """L_TopK [N] = (1/k) sum_{i<=k} (zq_pi(i) - zfp_pi(i))^2   (EAC-MoE TopK-MSE)."""
    return (ordered(zq, pi, k) - ordered(zfp, pi, k)).pow(2).mean(-1)


def sigmoid_weights(zfp_top: torch.Tensor, gamma: float, eps_w: float) -> torch.Tensor:
    """w_pi(i) [N, k] = (p(1-p))^gamma + eps_w with p = sigmoid(zfp_pi(i)); largest where p ~ 0.5."""
    p = torch.sigmoid(zfp_top)
    return (p * (1 - p)).pow(gamma) + eps_w


def sigmoid_aware(
    zq: torch.Tensor, zfp: torch.Tensor, pi: torch.Tensor, k: int, gamma: float = 1.0, eps_w: float = 1e-3
) -> torch.Tensor:
    """L_sig [N] = (1/k) sum_{i<=k} w_pi(i) (sigmoid(zq_pi(i)) - sigmoid(zfp_pi(i)))^2."""
    zfp_top = ordered(zfp, pi, k)  # [N, k]
    w = sigmoid_weights(zfp_top, gamma, eps_w).detach()
    return (w * (torch.sigmoid(ordered(zq, pi, k)) - torch.sigmoid(zfp_top)).pow(2)).mean(-1)


def value_loss(
    zq: torch.Tensor,
    zfp: torch.Tensor,
    pi: torch.Tensor,
    k: int,
    alpha_v: float = 0.3,
    gamma: float = 1.0,
    eps_w: float = 1e-3,
) -> torch.Tensor:
    """L_value [N] = (1 - alpha_v) L_TopK + alpha_v L_sig."""
    return (1 - alpha_v) * topk_mse(zq, zfp, pi, k) + alpha_v * sigmoid_aware(zq, zfp, pi, k, gamma, eps_w)


def rank_loss(zq: torch.Tensor, pi: torch.Tensor, k: int, m_rank: float = 0.0) -> torch.Tensor:
    """L_rank [N] = (1/(k-1)) sum_{i<k} softplus(m_rank - (zq_pi(i) - zq_pi(i+1))); 0 when k = 1.

    With m_rank = 0 the floor is log 2 (softplus(0)); only the gradient matters.
    """
    top = ordered(zq, pi, k)  # [N, k]
    if k < 2:
        return top.sum(-1) * 0.0
    gaps = top[:, :-1] - top[:, 1:]  # [N, k-1]
    return F.softplus(m_rank - gaps).mean(-1)


def boundary_margins(z: torch.Tensor, pi: torch.Tensor, k: int, b: int) -> torch.Tensor:
    """Delta_j [N, b] = z_pi(k) - z_pi(k+j), j = 1..b (how far the k-th expert beats the next ones)."""
    zz = ordered(z, pi, k + b)  # [N, k+b]
    return zz[:, k - 1 : k] - zz[:, k:]


def margin_loss(zq: torch.Tensor, zfp: torch.Tensor, pi: torch.Tensor, k: int, b: int = 1) -> torch.Tensor:
    """L_margin [N] = (1/b) sum_j (Delta^q_j - Delta^fp_j)^2, both margins taken in the fp order."""
    return (boundary_margins(zq, pi, k, b) - boundary_margins(zfp, pi, k, b)).pow(2).mean(-1)


def struct_loss(
    zq: torch.Tensor,
    zfp: torch.Tensor,
    pi: torch.Tensor,
    k: int,
    beta_rank: float = 0.01,
    beta_margin: float = 0.05,
    b: int = 1,
    m_rank: float = 0.0,
) -> torch.Tensor:
    """L_struct [N] = beta_rank L_rank + beta_margin L_margin."""
    return beta_rank * rank_loss(zq, pi, k, m_rank) + beta_margin * margin_loss(zq, zfp, pi, k, b)


def router_loss(
    zq: torch.Tensor, zfp: torch.Tensor, pi: torch.Tensor, k: int, w: RouterLossWeights = RouterLossWeights()
) -> torch.Tensor:
    """L_router [N]: "vsraq" = L_value + L_struct; "topk" = L_TopK; "none" = 0 (AutoRound)."""
    if w.terms == "none":
        return zq.float().sum(-1) * 0.0
    if w.terms == "topk":
        return topk_mse(zq, zfp, pi, k)
    b = max(0, min(w.boundary, zq.shape[-1] - k))
    out = value_loss(zq, zfp, pi, k, w.alpha_v, w.gamma, w.eps_w) + w.beta_rank * rank_loss(zq, pi, k, w.m_rank)
    if b > 0:
        out = out + w.beta_margin * margin_loss(zq, zfp, pi, k, b)
    return out


def recon_loss(yq: torch.Tensor, yfp: torch.Tensor) -> torch.Tensor:
    """L_recon [N] = mean_D (yq - yfp)^2 per token (AutoRound's MSE before averaging over tokens)."""
    return (yq.float() - yfp.float()).pow(2).reshape(-1, yq.shape[-1]).mean(-1)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-token loss [N] over mask [N] (bool); the plain mean when mask is None; 0 if empty."""
    if mask is None:
        return per_token.mean()
    m = mask.reshape(-1).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def relative_error(yq: torch.Tensor, yfp: torch.Tensor) -> torch.Tensor:
    """Per-token relative output error [N] = ||yq - yfp|| / ||yfp|| (SRA-MoE token selection)."""
    d = yq.shape[-1]
    diff = (yq.float() - yfp.float()).reshape(-1, d).norm(dim=-1)
    return diff / yfp.float().reshape(-1, d).norm(dim=-1).clamp(min=1e-12)


def block_objective(recon: torch.Tensor, router_terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """L = L_recon + sum_j lambda_j L_router_j over the block's aligned routers.

    Own router: lambda = --lambda-router; next layer's router: lambda = --lambda-downstream.
    No term, or every lambda 0: L_recon exactly (AutoRound).
    """
    terms = [lam * t for lam, t in router_terms if lam != 0]
    if not terms:
        return recon
    return recon + torch.stack(terms).sum()
