"""Every identity of the seed paper as a test (float64), and every objective's value by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.objectives import legacy_rl_loss, outcome_rewards, reinforce_kl_loss, rtb_loss, snis_weights, trust_pcl_loss
from rtbcli.presets_loader import load_preset
from rtbcli.tasks import Task
from test_sampler import seeded


# ------------------------------------------------------------------ hand-computed values
def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_rtb_value_by_hand():
    # delta = 0.5 + 1 - 0.5 - 2*1 = -1 ; 0.5 + 2 - 1 - 2*(-1) = 3.5 ; loss = (1 + 12.25) / 4
    assert rtb_loss(t(0.5), t(1, 2), t(0.5, 1), t(1, -1), beta=2.0).item() == pytest.approx(3.3125, abs=1e-15)


def test_trust_pcl_value_by_hand():
    step_lpf = t(0.4, 1.5, 0.6, 0.5).reshape(2, 2)  # sums 1, 2
    step_lpp = t(0.2, 0.5, 0.3, 0.5).reshape(2, 2)  # sums 0.5, 1
    rewards = outcome_rewards(t(1, -1), 2)
    assert torch.equal(rewards, t(0, 0, 1, -1).reshape(2, 2))
    # delta' = -1 + 1 + 0.5 * (0.5 - 1) = -0.25 ; -1 - 1 + 0.5 * (1 - 2) = -2.5
    assert trust_pcl_loss(t(1.0), step_lpf, step_lpp, rewards, alpha=0.5).item() == pytest.approx((0.0625 + 6.25) / 4, abs=1e-15)


def test_reinforce_kl_value_by_hand():
    # R = 1 - 0.5*(1 - 0.5) = 0.75 ; -1 - 0.5*(2 - 1) = -1.5 ; A = +-1.125
    loss = reinforce_kl_loss(t(1, 2), t(0.5, 1), t(1, -1), alpha=0.5, weights=t(0.25, 0.75))
    assert loss.item() == pytest.approx(-(0.25 * 1.125 * 1 + 0.75 * -1.125 * 2), abs=1e-15)


def test_reinforce_kl_gradient_is_weighted_advantage():
    lpf = t(1, 2).requires_grad_()
    reinforce_kl_loss(lpf, t(0.5, 1), t(1, -1), alpha=0.5, weights=t(0.25, 0.75)).backward()
    torch.testing.assert_close(lpf.grad, t(-0.25 * 1.125, 0.75 * 1.125), rtol=0, atol=1e-15)


def test_legacy_value_and_gradient_by_hand():
    lpf = t(1, 2).requires_grad_()
    # r = 1, 3 ; A = -1, 1 ; terms: 1 + 0.5*0.25 = 1.125 ; -2 + 0.5*1 = -1.5
    loss = legacy_rl_loss(lpf, t(0.5, 1), t(0.0, math.log(3.0)), lam=0.5)
    assert loss.item() == pytest.approx(-0.1875, abs=1e-15)
    loss.backward()
    # d/dlpf_i = (-A_i + 2 lam (lpf_i - lpp_i)) / B: the penalty's gradient is 2 lam times the KL's
    torch.testing.assert_close(lpf.grad, t((1 + 0.5) / 2, (-1 + 1.0) / 2), rtol=0, atol=1e-15)


def test_snis_weights():
    lpf, lb = t(1, 2), t(0, 0)
    torch.testing.assert_close(snis_weights(lpf, lb, 1.0), torch.softmax(t(1, 2), 0), rtol=0, atol=1e-15)
    torch.testing.assert_close(snis_weights(lpf, lb, 2.0), torch.softmax(t(0.5, 1), 0), rtol=0, atol=1e-15)
    torch.testing.assert_close(snis_weights(lpf, None), t(0.5, 0.5), rtol=0, atol=0)
    w = snis_weights(torch.randn(100, dtype=torch.float64) * 50, torch.randn(100, dtype=torch.float64), 100.0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-14) and (w > 0).all() and not w.requires_grad


# ------------------------------------------------------------------ identities on real trajectories
@pytest.fixture
def batch(float64, reference):
    """Trajectories of a tiny sampler with exploration, with the policy's and a prior's log-probs."""
    policy = seeded(1, std=0.5, steps=8)
    prior = seeded(2, std=0.5, steps=8).requires_grad_(False)
    traj = policy.sample(64, extra_var=0.2, generator=torch.Generator().manual_seed(3)) * 3.0
    log_r = Task(reference).log_reward(traj[-1])
    return policy, prior, traj, log_r


def losses(policy, prior, traj, log_r, log_z, alpha):
    """(RTB loss with log Z, Trust-PCL loss with V = alpha log Z) on the same batch."""
    step_lpf, step_lpp = policy.step_log_probs(traj), prior.step_log_probs(traj)
    rtb = rtb_loss(log_z, step_lpf.sum(0), step_lpp.sum(0), log_r, 1 / alpha)
    v = alpha * log_z
    tpcl = trust_pcl_loss(v, step_lpf, step_lpp, outcome_rewards(log_r, policy.steps), alpha)
    return rtb, tpcl


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_trust_pcl_loss_is_alpha_squared_rtb(batch, alpha):
    rtb, tpcl = losses(*batch, torch.tensor(0.3), alpha)
    assert rtb.item() > 1e-3
    assert abs(tpcl.item() / (alpha**2 * rtb.item()) - 1) < 1e-9


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_gradients_match_block_by_block(batch, alpha):
    """Policy gradient of Trust-PCL = alpha^2 x RTB's; V's gradient = alpha x log Z's."""
    policy, prior, traj, log_r = batch
    log_z = torch.tensor(0.3, requires_grad=True)
    rtb = losses(policy, prior, traj, log_r, log_z, alpha)[0]
    g_rtb = torch.autograd.grad(rtb, [*policy.parameters(), log_z])
    v = torch.tensor(alpha * 0.3, requires_grad=True)
    step_lpf, step_lpp = policy.step_log_probs(traj), prior.step_log_probs(traj)
    tpcl = trust_pcl_loss(v, step_lpf, step_lpp, outcome_rewards(log_r, policy.steps), alpha)
    g_tpcl = torch.autograd.grad(tpcl, [*policy.parameters(), v])
    flat_r = torch.cat([g.reshape(-1) for g in g_rtb[:-1]])
    flat_t = torch.cat([g.reshape(-1) for g in g_tpcl[:-1]])
    assert flat_r.norm() > 1e-3
    torch.testing.assert_close(flat_t, alpha**2 * flat_r, rtol=1e-10, atol=1e-12)
    cos = torch.dot(flat_r, flat_t) / (flat_r.norm() * flat_t.norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(g_tpcl[-1], alpha * g_rtb[-1], rtol=1e-10, atol=1e-14)


def _train_sgd(policy, prior, task, alpha, objective, lr_policy, lr_scalar, steps=5):
    """Plain SGD on fresh trajectories each step; the same seeds give the same batches."""
    scalar = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([{"params": list(policy.parameters()), "lr": lr_policy}, {"params": [scalar], "lr": lr_scalar}])
    for k in range(steps):
        traj = policy.sample(32, extra_var=0.1, generator=torch.Generator().manual_seed(100 + k)) * 3.0
        log_r = task.log_reward(traj[-1])
        step_lpf, step_lpp = policy.step_log_probs(traj), prior.step_log_probs(traj)
        if objective == "rtb":
            loss = rtb_loss(scalar, step_lpf.sum(0), step_lpp.sum(0), log_r, 1 / alpha)
        else:
            loss = trust_pcl_loss(scalar, step_lpf, step_lpp, outcome_rewards(log_r, policy.steps), alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy, scalar.detach()


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_sgd_with_policy_lr_over_alpha_squared_takes_identical_steps(float64, reference, alpha):
    task = Task(reference)

    def make():
        return seeded(4)

    prior = seeded(5).requires_grad_(False)
    p_rtb, log_z = _train_sgd(make(), prior, task, alpha, "rtb", 1e-3, 1e-2)
    p_tpcl, v = _train_sgd(make(), prior, task, alpha, "trust-pcl", 1e-3 / alpha**2, 1e-2)
    start = make()
    moved = max((a - b).abs().max().item() for a, b in zip(p_rtb.parameters(), start.parameters()))
    assert moved > 1e-4  # the runs did train
    for a, b in zip(p_rtb.parameters(), p_tpcl.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    assert abs(log_z.item()) > 1e-4
    assert v.item() == pytest.approx(alpha * log_z.item(), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_adam_with_same_policy_lr_and_lr_v_alpha_takes_identical_steps(float64, reference, alpha):
    """Adam ignores the loss scale: same policy lr, lr_V = alpha lr_logZ (eps = 0: exact)."""
    task = Task(reference)

    def make():
        return seeded(6)

    prior = seeded(7).requires_grad_(False)
    results = {}
    for objective, lr_scalar in (("rtb", 0.1), ("trust-pcl", alpha * 0.1)):
        policy, scalar = make(), torch.tensor(0.0, requires_grad=True)
        opt = torch.optim.Adam([{"params": list(policy.parameters()), "lr": 1e-3}, {"params": [scalar], "lr": lr_scalar}], eps=0.0)
        for k in range(5):
            traj = policy.sample(32, extra_var=0.1, generator=torch.Generator().manual_seed(200 + k)) * 3.0
            log_r = task.log_reward(traj[-1])
            step_lpf, step_lpp = policy.step_log_probs(traj), prior.step_log_probs(traj)
            loss = (
                rtb_loss(scalar, step_lpf.sum(0), step_lpp.sum(0), log_r, 1 / alpha)
                if objective == "rtb"
                else trust_pcl_loss(scalar, step_lpf, step_lpp, outcome_rewards(log_r, policy.steps), alpha)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[objective] = (policy, scalar.detach())
    (p_r, log_z), (p_t, v) = results["rtb"], results["trust-pcl"]
    for a, b in zip(p_r.parameters(), p_t.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert v.item() == pytest.approx(alpha * log_z.item(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_on_policy_rtb_gradient_is_beta_times_reinforce_kl(batch, beta):
    """Seed paper, Appendix C: on-policy, grad RTB = beta * grad REINFORCE-KL with baseline alpha log Z."""
    policy, prior, traj, log_r = batch
    traj = policy.sample(64, generator=torch.Generator().manual_seed(11))  # on-policy draws
    log_r = Task(load_preset("reference")[0]).log_reward(traj[-1])
    alpha, log_z = 1 / beta, torch.tensor(0.7)
    lpf, lpp = policy.log_prob(traj), prior.log_prob(traj)
    g_rtb = torch.autograd.grad(rtb_loss(log_z, lpf, lpp, log_r, beta), list(policy.parameters()), retain_graph=True)
    rf = reinforce_kl_loss(lpf, lpp, log_r, alpha, snis_weights(lpf, None), baseline=alpha * log_z)
    g_rf = torch.autograd.grad(rf, list(policy.parameters()))
    flat_r = torch.cat([g.reshape(-1) for g in g_rtb])
    flat_f = torch.cat([g.reshape(-1) for g in g_rf])
    assert flat_r.norm() > 1e-3
    torch.testing.assert_close(flat_r, beta * flat_f, rtol=1e-10, atol=1e-12)


def test_reinforce_kl_batch_mean_baseline_differs_only_by_control_variate(batch):
    """With the batch-mean baseline the gradient changes, but its expectation does not: the
    difference is (b - alpha log Z) * mean(grad lpf), a zero-mean control variate on-policy."""
    policy, prior, traj, log_r = batch
    lpf, lpp = policy.log_prob(traj), prior.log_prob(traj)
    w = snis_weights(lpf, None)
    ret = (log_r - (lpf - lpp)).detach()
    g_mean = torch.autograd.grad(reinforce_kl_loss(lpf, lpp, log_r, 1.0, w), list(policy.parameters()), retain_graph=True)
    g_b = torch.autograd.grad(reinforce_kl_loss(lpf, lpp, log_r, 1.0, w, baseline=0.0), list(policy.parameters()), retain_graph=True)
    g_lpf = torch.autograd.grad(lpf.mean(), list(policy.parameters()))
    for a, b, c in zip(g_mean, g_b, g_lpf):
        torch.testing.assert_close(a - b, ret.mean() * c, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ the legacy baseline's fixed point
def expected_legacy_gradient(probs_counts: list[int], prior: torch.Tensor, reward: torch.Tensor, lam: float) -> torch.Tensor:
    """The exact expected gradient of `legacy_rl_loss` with respect to the logits of a categorical
    policy p = counts / sum(counts): a batch holding state k exactly counts[k] times makes the loss's
    batch means (and its baseline, mean r) the expectations under p."""
    counts = torch.tensor(probs_counts, dtype=torch.float64)
    logits = (counts / counts.sum()).log().requires_grad_()
    states = torch.repeat_interleave(torch.arange(len(probs_counts)), torch.tensor(probs_counts))
    lpf = torch.log_softmax(logits, 0)[states]
    loss = legacy_rl_loss(lpf, prior.log()[states], reward.log()[states], lam)
    return torch.autograd.grad(loss, logits)[0]


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_legacy_fixed_point_is_prior_times_exp_r_over_2_lambda(lam):
    """Three states, a uniform prior, rewards r = 2 lam log 2 (1, 2, 3) (the reward itself, not log r):
    p_theta exp(r / (2 lam)) = (2, 4, 8) / 14 = (1, 2, 4) / 7, where the expected gradient vanishes;
    the target p_theta r = (1, 2, 3) / 6 and p_theta exp(r / lam) = (1, 4, 16) / 21 are not fixed points."""
    prior = torch.full((3,), 1 / 3, dtype=torch.float64)
    reward = 2 * lam * math.log(2) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    at_fixed_point = expected_legacy_gradient([1, 2, 4], prior, reward, lam)
    torch.testing.assert_close(at_fixed_point, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)
    for counts in ([1, 2, 3], [1, 4, 16], [1, 1, 1]):  # the target, the fixed point without the 2, the prior
        assert expected_legacy_gradient(counts, prior, reward, lam).abs().max() > 1e-2, counts
