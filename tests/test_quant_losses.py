"""Router-alignment loss terms against values computed by hand, for softmax and sigmoid routers."""

from __future__ import annotations

import math

import pytest
import torch

from pascal_moe.models.base import RouterSpec, choice_scores, select
from pascal_moe.quant import losses as L
from pascal_moe.quant.schemes import fake_quantize, parse_scheme


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# softmax router: the order is the logit order
ZFP = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
ZQ = torch.tensor([[1.5, 1.5, 1.0, -1.0]])
SOFTMAX = RouterSpec("softmax", 4, 2)


def pi_of(z: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    return L.fp_order(choice_scores(z, spec))


def test_topk_mse_by_hand() -> None:
    pi = pi_of(ZFP, SOFTMAX)
    assert pi.tolist() == [[0, 1, 2, 3]]
    # ((1.5-2)^2 + (1.5-1)^2) / 2
    assert L.topk_mse(ZQ, ZFP, pi, 2).item() == pytest.approx(0.25)
    assert L.topk_mse(ZFP, ZFP, pi, 2).item() == 0.0


def test_sigmoid_aware_by_hand() -> None:
    pi = pi_of(ZFP, SOFTMAX)
    w = [sig(2.0) * (1 - sig(2.0)) + 1e-3, sig(1.0) * (1 - sig(1.0)) + 1e-3]
    want = (w[0] * (sig(1.5) - sig(2.0)) ** 2 + w[1] * (sig(1.5) - sig(1.0)) ** 2) / 2
    assert L.sigmoid_aware(ZQ, ZFP, pi, 2, gamma=1.0, eps_w=1e-3).item() == pytest.approx(want, rel=1e-5)
    # gamma = 2 squares p(1-p)
    w2 = [(sig(2.0) * (1 - sig(2.0))) ** 2 + 1e-3, (sig(1.0) * (1 - sig(1.0))) ** 2 + 1e-3]
    want2 = (w2[0] * (sig(1.5) - sig(2.0)) ** 2 + w2[1] * (sig(1.5) - sig(1.0)) ** 2) / 2
    assert L.sigmoid_aware(ZQ, ZFP, pi, 2, gamma=2.0).item() == pytest.approx(want2, rel=1e-5)


def test_value_loss_mixes_terms() -> None:
    pi = pi_of(ZFP, SOFTMAX)
    t, s = L.topk_mse(ZQ, ZFP, pi, 2).item(), L.sigmoid_aware(ZQ, ZFP, pi, 2).item()
    assert L.value_loss(ZQ, ZFP, pi, 2, alpha_v=0.3).item() == pytest.approx(0.7 * t + 0.3 * s)


def test_rank_loss_by_hand() -> None:
    pi = pi_of(ZFP, SOFTMAX)
    assert L.rank_loss(ZQ, pi, 2).item() == pytest.approx(math.log(2.0))  # tied top-2: softplus(0)
    # k = 3: gaps 0 and 0.5 -> (softplus(0) + softplus(-0.5)) / 2; margin m_rank = 1 shifts both
    assert L.rank_loss(ZQ, pi, 3).item() == pytest.approx((math.log(2) + math.log1p(math.exp(-0.5))) / 2)
    assert L.rank_loss(ZQ, pi, 3, m_rank=1.0).item() == pytest.approx(
        (math.log1p(math.e) + math.log1p(math.exp(0.5))) / 2
    )
    assert L.rank_loss(ZQ, pi, 1).item() == 0.0


def test_boundary_margins_and_margin_loss_by_hand() -> None:
    pi = pi_of(ZFP, SOFTMAX)
    assert L.boundary_margins(ZFP, pi, 2, 2).tolist() == [[1.0, 2.0]]  # z(2)-z(3), z(2)-z(4)
    assert L.boundary_margins(ZQ, pi, 2, 2).tolist() == [[0.5, 2.5]]
    assert L.margin_loss(ZQ, ZFP, pi, 2, 1).item() == pytest.approx(0.25)
    assert L.margin_loss(ZQ, ZFP, pi, 2, 2).item() == pytest.approx((0.25 + 0.25) / 2)


def test_struct_and_router_loss_compose() -> None:
    pi = pi_of(ZFP, SOFTMAX)
    w = L.RouterLossWeights()
    struct = L.struct_loss(ZQ, ZFP, pi, 2, w.beta_rank, w.beta_margin, 1)
    assert struct.item() == pytest.approx(0.01 * math.log(2) + 0.05 * 0.25)
    full = L.router_loss(ZQ, ZFP, pi, 2, w)
    assert full.item() == pytest.approx(L.value_loss(ZQ, ZFP, pi, 2).item() + struct.item())
    topk = L.router_loss(ZQ, ZFP, pi, 2, L.RouterLossWeights(terms="topk"))
    assert topk.item() == pytest.approx(0.25)
    assert L.router_loss(ZQ, ZFP, pi, 2, L.RouterLossWeights(terms="none")).item() == 0.0


def test_sigmoid_router_order_follows_biased_choice_score() -> None:
    """pi ranks experts by sigmoid(z) + bias: expert 0 leads on its bias although its logit is the lowest."""
    spec = RouterSpec("sigmoid", 4, 2, bias=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    zfp = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    zq = torch.tensor([[0.5, 1.0, 2.0, 2.0]])
    pi = pi_of(zfp, spec)
    assert pi[0, :2].tolist() == [0, 3]
    assert set(pi[0, :2].tolist()) == set(select(zfp, spec)[1][0].tolist())
    assert L.topk_mse(zq, zfp, pi, 2).item() == pytest.approx((0.25 + 1.0) / 2)
    # rank loss on the *logits* in the biased order: gap zq_0 - zq_3 = 0.5 - 2 = -1.5
    assert L.rank_loss(zq, pi, 2).item() == pytest.approx(math.log1p(math.exp(1.5)))
    # boundary: third in order is expert 2 -> delta = z_3 - z_2
    assert L.margin_loss(zq, zfp, pi, 2, 1).item() == pytest.approx(((2.0 - 2.0) - (3.0 - 2.0)) ** 2)
    w = [sig(0.0) * (1 - sig(0.0)) + 1e-3, sig(3.0) * (1 - sig(3.0)) + 1e-3]
    want = (w[0] * (sig(0.5) - sig(0.0)) ** 2 + w[1] * (sig(2.0) - sig(3.0)) ** 2) / 2
    assert L.sigmoid_aware(zq, zfp, pi, 2).item() == pytest.approx(want, rel=1e-5)


def test_group_limited_order_puts_masked_groups_last() -> None:
    spec = RouterSpec("sigmoid", 4, 2, n_group=2, topk_group=1, bias=torch.zeros(4))
    zfp = torch.tensor([[3.0, -2.0, 1.0, 1.0]])  # group scores: sig(3)+sig(-2) < sig(1)+sig(1)
    pi = pi_of(zfp, spec)
    assert set(pi[0, :2].tolist()) == {2, 3}
    assert set(pi[0, 2:].tolist()) == {0, 1}


def test_masked_mean_and_objective() -> None:
    per_tok = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert L.masked_mean(per_tok, torch.tensor([True, True, True, False])).item() == pytest.approx(2.0)
    assert L.masked_mean(per_tok, None).item() == pytest.approx(4.0)
    recon = torch.tensor(0.5)
    assert L.block_objective(recon, [(0.0, torch.tensor(2.0))]) is recon  # lambda = 0: AutoRound exactly
    assert L.block_objective(recon, []) is recon
    # own router at lambda 0.1, downstream router at its own lambda 0.5
    assert L.block_objective(recon, [(0.1, torch.tensor(2.0)), (0.5, torch.tensor(1.0))]).item() == pytest.approx(1.2)
    y = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert L.relative_error(y + torch.tensor([[0.0, 5.0], [0.0, 0.0]]), y).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("scheme", ["int4-g128", "nvfp4"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_gradients_reach_rounding_and_clipping(scheme: str, kind: str) -> None:
    """d L_router / d (V, alpha, beta) is non-zero through fake_quantize of a router-input projection."""
    torch.manual_seed(0)
    s = parse_scheme(scheme)
    w = torch.randn(16, 128)  # [H, H]: a projection feeding the router
    gate = torch.randn(8, 16)  # router weight [E, H]
    x = torch.randn(32, 128)  # [N, H]
    v = torch.zeros(16, 128 // s.group_size, s.group_size, requires_grad=True)
    a = torch.ones(16, 128 // s.group_size, 1, requires_grad=True)
    b = torch.ones(16, 128 // s.group_size, 1, requires_grad=True)
    spec = RouterSpec(kind, 8, 2, bias=torch.randn(8) * 0.1 if kind == "sigmoid" else None)
    zfp = x @ w.T @ gate.T  # [N, E]
    zq = x @ fake_quantize(w, s, 1, v, a, b).T @ gate.T
    loss = L.router_loss(zq, zfp, pi_of(zfp, spec), 2).mean()
    loss.backward()
    for t in (v, a, b):
        assert t.grad is not None and t.grad.abs().sum() > 0
