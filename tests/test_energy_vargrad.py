"""VarGrad: its value by hand, its gradient equal to RTB's at log Z = log Zhat, its registry entry."""

from __future__ import annotations

import pytest
import torch

from rtbcli.objectives import OBJECTIVES, Batch, HyperParams, rtb_loss, vargrad_loss


def test_value_by_hand():
    lpf = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    lpp = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    log_r = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    # d = lpf - lpp - 0.5 log r = [0.5, 2, 2], mean 1.5, deviations [-1, .5, .5]: 1/2 mean of squares = 1/2 * 0.5
    assert float(vargrad_loss(lpf, lpp, log_r, 0.5)) == pytest.approx(0.25, abs=1e-15)
    # half the biased batch variance of d
    d = lpf - lpp - 0.5 * log_r
    assert float(vargrad_loss(lpf, lpp, log_r, 0.5)) == pytest.approx(0.5 * float(d.var(unbiased=False)), abs=1e-15)
    # a single trajectory carries no signal
    assert float(vargrad_loss(lpf[:1], lpp[:1], log_r[:1], 1.0)) == 0.0


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(8, 4, generator=g, dtype=torch.float64)
    lpp = torch.randn(8, generator=g, dtype=torch.float64)
    log_r = torch.randn(8, generator=g, dtype=torch.float64)
    return theta, feats, lpp, log_r


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_gradient_is_rtbs_at_log_z_hat(beta):
    theta, feats, lpp, log_r = _setup(0)
    (g_vg,) = torch.autograd.grad(vargrad_loss(feats @ theta, lpp, log_r, beta), theta)
    lpf = feats @ theta
    log_z_hat = (lpp + beta * log_r - lpf).mean().detach()
    rtb = rtb_loss(log_z_hat, lpf, lpp, log_r, beta)
    (g_rtb,) = torch.autograd.grad(rtb, theta)
    assert torch.allclose(g_vg, g_rtb, rtol=0, atol=1e-13)
    assert float(vargrad_loss(feats @ theta, lpp, log_r, beta).detach()) == pytest.approx(float(rtb.detach()), abs=1e-13)
    # RTB's log Z gradient vanishes there: log Zhat is the optimal log Z for this batch
    lz = log_z_hat.clone().requires_grad_(True)
    (g_lz,) = torch.autograd.grad(rtb_loss(lz, lpf.detach(), lpp, log_r, beta), lz)
    assert abs(float(g_lz)) < 1e-13
    # the gradient with log Zhat not detached is the same (its extra term sums to zero)
    lpf = feats @ theta
    d = lpf - lpp - beta * log_r
    (g_nd,) = torch.autograd.grad(0.5 * (d - d.mean()).pow(2).mean(), theta)
    assert torch.allclose(g_vg, g_nd, rtol=0, atol=1e-13)
    # and it is not RTB's gradient at another log Z (the test can tell them apart)
    (g_other,) = torch.autograd.grad(rtb_loss(log_z_hat + 1.0, feats @ theta, lpp, log_r, beta), theta)
    assert not torch.allclose(g_vg, g_other, atol=1e-6)


def test_registry_entry():
    assert list(OBJECTIVES)[-1] == "vargrad"
    obj = OBJECTIVES["vargrad"]
    assert obj.scalar is None and obj.explores and obj.uses_beta and not obj.weighs_behaviour
    theta, feats, lpp, log_r = _setup(1)
    step_lpf = (feats @ theta).reshape(2, 4)  # (T, B) per-step: sums to lpf per column
    step_lpp = lpp.reshape(2, 4)
    b = Batch(step_lpf, step_lpp, log_r[:4], None)
    hp = HyperParams(beta=2.0, temper=1.0, legacy_lambda=0.0)
    assert float(obj.loss(b, None, hp).detach()) == pytest.approx(float(vargrad_loss(b.lpf, b.lpp, b.log_r, 2.0).detach()), abs=1e-15)
