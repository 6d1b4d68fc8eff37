"""The Brownian prior: its terminal law is N(0, sigma2 I) exactly, and with the derived reward p_prior r = pi."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.energy import BrownianPrior, EnergyReward, energy_log_reward, get_target
from rtbcli.errors import InputError
from rtbcli.gaussian import centred_log_prob, gaussian_log_prob
from rtbcli.sampler import bridge_log_prob, bridge_sample, time_grid


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_interface_like_a_diffusion_sampler():
    p = BrownianPrior(3, steps=20, sigma2=5.0).double()
    assert (p.dim, p.steps, p.sigma2, p.dt) == (3, 20, 5.0, 0.05)
    assert p.step_var == pytest.approx(0.25, abs=1e-15)
    assert p.state_dict() == {} and list(p.parameters()) == []
    traj = p.sample(4, generator=gen(0))
    assert traj.shape == (21, 4, 3) and traj.dtype == torch.float64
    assert torch.equal(traj[0], torch.zeros(4, 3))
    assert p.step_log_probs(traj).shape == (20, 4) and p.log_prob(traj).shape == (4,)
    with pytest.raises(InputError):
        BrownianPrior(2, 10, 0.0)


def test_step_log_probs_by_hand():
    p = BrownianPrior(2, steps=4, sigma2=2.0).double()
    traj = torch.tensor([[[0.0, 0.0]], [[0.5, -1.0]], [[0.5, 0.0]], [[1.0, 2.0]], [[-1.0, 2.0]]], dtype=torch.float64)
    var = 0.5  # sigma2 dt
    steps = [(0.5, -1.0), (0.0, 1.0), (0.5, 2.0), (-2.0, 0.0)]
    hand = [-(a * a + b * b) / (2 * var) - math.log(2 * math.pi * var) for a, b in steps]
    assert torch.allclose(p.step_log_probs(traj)[:, 0], torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-14)
    # the exploratory behaviour: same means, variance sigma2 dt + extra_var
    hand_e = [-(a * a + b * b) / (2 * 0.75) - math.log(2 * math.pi * 0.75) for a, b in steps]
    assert torch.allclose(p.step_log_probs(traj, 0.25)[:, 0], torch.tensor(hand_e, dtype=torch.float64), rtol=0, atol=1e-14)


def test_terminal_marginal_samples():
    sigma2, n = 5.0, 20_000
    p = BrownianPrior(2, steps=100, sigma2=sigma2).double()
    x = p.sample(n, generator=gen(1))[-1]
    assert float(x.mean(0).abs().max()) < 5 * math.sqrt(sigma2 / n)
    cov = torch.cov(x.T)
    assert float((cov.diagonal() - sigma2).abs().max()) < 5 * sigma2 * math.sqrt(2 / n)
    assert abs(float(cov[0, 1])) < 5 * sigma2 / math.sqrt(n)
    # with exploration the terminal variance is T (sigma2 dt + s_e^2)
    xe = p.sample(n, extra_var=0.01, generator=gen(2))[-1]
    assert abs(float(xe.var(0).mean()) - 6.0) < 5 * 6.0 * math.sqrt(1 / n)


@pytest.mark.parametrize("sigma2, power", [(1.0, 1.0), (5.0, 1.0), (1.0, 2.0), (5.0, 3.0)])
def test_terminal_log_prob_is_the_path_integral(sigma2, power):
    # p_F(tau) = N(x_T; 0, sigma2 I) prod_{i=1}^{T-1} p_B(x_i | x_{i+1}) for every path from x_0 = 0, on any time grid
    p = BrownianPrior(3, steps=50, sigma2=sigma2, time_power=power).double()
    times = None if power == 1.0 else time_grid(50, power)
    x_end = torch.randn(4, 3, generator=gen(4), dtype=torch.float64) * 4
    traj = torch.cat([p.sample(5, generator=gen(3)), bridge_sample(x_end, 50, sigma2, gen(5), times)], dim=1)
    assert torch.equal(p.backward_log_prob(traj), bridge_log_prob(traj, sigma2, times))
    lhs = p.log_prob(traj) - p.backward_log_prob(traj)
    rhs = p.terminal_log_prob(traj[-1])
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-10)
    hand = -(traj[-1] ** 2).sum(-1) / (2 * sigma2) - 1.5 * math.log(2 * math.pi * sigma2)
    assert torch.allclose(rhs, hand, rtol=0, atol=1e-12)


@pytest.mark.parametrize("power", [1.0, 2.5])
def test_a_fresh_policy_is_the_same_law(power):
    p = BrownianPrior(2, steps=10, sigma2=5.0, time_power=power).double()
    pol = p.fresh_policy(hidden=16, time_features=8)
    assert (pol.dim, pol.steps, pol.sigma2, pol.time_power) == (2, 10, 5.0, power) and pol.net.state.weight.dtype == torch.float64
    a, b = p.sample(6, 0.1, gen(9)), pol.sample(6, 0.1, gen(9))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(p.step_log_probs(a), pol.step_log_probs(a), rtol=0, atol=1e-12)


def test_prior_times_derived_reward_is_pi_pointwise():
    t = get_target("gmm25")
    p = BrownianPrior(2, steps=100, sigma2=t.sigma2).double()
    r = energy_log_reward(t.log_density, p)
    x = torch.randn(50, 2, generator=gen(6), dtype=torch.float64) * 8
    assert torch.allclose(p.terminal_log_prob(x) + r(x), t.log_density(x), rtol=0, atol=1e-12)
    # log r = log pi - log N(x; 0, 5 I), by hand at one point
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    hand = float(t.log_density(x0)) + 5.0 / 10 + math.log(2 * math.pi * 5)
    assert abs(float(r(x0)) - hand) < 1e-12


def test_prior_samples_weighted_by_the_reward_are_pi():
    # pi(x) = 2 N(x; 1, 1) in d = 1 (log Z = log 2): E_prior[r] = Z and E_prior[r x] / Z = 1, from the
    # prior's own samples (not its formula)
    def log_pi(x):
        return math.log(2.0) + gaussian_log_prob(x, 1.0, 1.0)

    p = BrownianPrior(1, steps=20, sigma2=2.0).double()
    x = p.sample(200_000, generator=gen(7))[-1]
    w = EnergyReward(log_pi, p.sigma2)(x).exp()
    # Var_prior(r) = Z^2 (integral N(x;1,1)^2 / N(x;0,2) dx - 1) = Z^2 (2 e^(1/3) / sqrt(3) - 1)
    se = 2 * math.sqrt((2 * math.exp(1 / 3) / math.sqrt(3) - 1) / len(x))
    assert abs(float(w.mean()) - 2.0) < 5 * se
    assert abs(float((w * x[:, 0]).mean() / w.mean()) - 1.0) < 0.02


def test_derived_reward_refuses_bad_sigma2():
    with pytest.raises(InputError):
        EnergyReward(lambda x: centred_log_prob(x, 1.0), 0.0)


def test_rtb_with_the_brownian_prior_is_trajectory_balance():
    # RTB's residual log Z + lpf - lpp - log r equals TB's log Z + lpf - log p_B(tau | x_T) - log pi(x_T)
    from rtbcli.objectives import rtb_loss

    t = get_target("funnel")
    p = BrownianPrior(10, steps=25, sigma2=t.sigma2).double()
    pol = p.fresh_policy(hidden=16, time_features=8)
    for prm in pol.net.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    traj = pol.sample(16, 0.0, gen(8))
    lpf = pol.log_prob(traj)
    log_r = energy_log_reward(t.log_density, p)(traj[-1])
    tb = 0.5 * (0.3 + lpf - bridge_log_prob(traj, p.sigma2) - t.log_density(traj[-1])).pow(2).mean()
    rtb = rtb_loss(torch.tensor(0.3, dtype=torch.float64), lpf, p.log_prob(traj), log_r, 1.0)
    assert abs(float(rtb.detach()) - float(tb.detach())) < 1e-9 * max(1.0, float(tb.detach()))
