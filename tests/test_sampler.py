"""The sampler: transitions, trajectories, log-probabilities and the bridge (docs/maths.md#the-sampler)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from rtbcli.sampler import DiffusionSampler, DriftNet, bridge_log_prob, bridge_sample


def perturbed(sampler: DiffusionSampler, std: float = 0.3, seed: int = 0) -> DiffusionSampler:
    """Give the zero-initialised output layer random weights, so that the drift is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sampler.net.body[-1].parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sampler


def seeded(seed: int, std: float = 0.3, **kw) -> DiffusionSampler:
    """A tiny sampler, fully determined by `seed` (every layer), with a non-zero drift."""
    torch.manual_seed(seed)
    kw = {"steps": 6, "hidden": 16, "time_features": 8, **kw}
    return perturbed(DiffusionSampler(2, **kw).to(torch.get_default_dtype()), std=std, seed=seed)


def test_reference_network_has_21k_parameters():
    net = DriftNet(2)
    assert sum(p.numel() for p in net.parameters()) == 21_122


def test_fresh_network_is_brownian_motion(float64):
    s = DiffusionSampler(2, steps=10, hidden=16, time_features=8)
    traj = s.sample(50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.means(traj), traj[:-1], rtol=0, atol=0)


def test_transition_log_probs_match_torch_distributions(float64):
    s = perturbed(DiffusionSampler(2, steps=7, hidden=16, time_features=8))
    traj = s.sample(5, extra_var=0.3, generator=torch.Generator().manual_seed(1))
    for extra in (0.0, 0.3):
        var = s.sigma2 / s.steps + extra
        expected = torch.zeros(7, 5)
        for i in range(7):
            x = traj[i]
            mean = x + s.net(x, s.net.time(torch.full((1,), i / 7.0))) / 7.0
            expected[i] = MultivariateNormal(mean, var * torch.eye(2)).log_prob(traj[i + 1])
        torch.testing.assert_close(s.step_log_probs(traj, extra), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.log_prob(traj, extra), expected.sum(0), rtol=1e-12, atol=1e-10)


def test_sample_follows_its_transitions(float64):
    """Each sampled step is mean + sqrt(var) * noise with standard-normal noise (same generator)."""
    s = perturbed(DiffusionSampler(2, steps=6, hidden=16, time_features=8))
    extra = 0.25
    traj = s.sample(4000, extra_var=extra, generator=torch.Generator().manual_seed(2))
    assert torch.equal(traj[0], torch.zeros(4000, 2))
    z = (traj[1:] - s.means(traj)) / math.sqrt(s.step_var + extra)
    noise = torch.randn(6, 4000, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, noise, rtol=1e-9, atol=1e-9)


def test_time_features_computed_once_per_step():
    """One scoring pass evaluates the time encoding on T rows, never on T * B."""
    s = DiffusionSampler(2, steps=12, hidden=16, time_features=8)
    rows = []
    s.net.time.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
    traj = s.sample(300)
    s.log_prob(traj)
    assert rows == [12, 12]


def test_bridge_endpoints_and_marginals(float64):
    steps, sigma2, n = 100, 5.0, 40_000
    x_end = torch.tensor([[4.0, -2.0]]).expand(n, 2)
    traj = bridge_sample(x_end, steps, sigma2, torch.Generator().manual_seed(3))
    assert torch.equal(traj[0], torch.zeros(n, 2)) and torch.equal(traj[-1], x_end)
    for i in (25, 50, 90):
        t = i / steps
        mean, var = t * x_end[0], sigma2 * t * (1 - t)
        xi = traj[i]
        se_mean = math.sqrt(var / n)
        assert (xi.mean(0) - mean).abs().max() < 5 * se_mean
        se_var = var * math.sqrt(2 / (n - 1))
        assert (xi.var(0) - var).abs().max() < 5 * se_var


def test_bridge_log_prob_matches_backward_kernel(float64):
    steps, sigma2 = 8, 5.0
    traj = bridge_sample(torch.randn(3, 2, generator=torch.Generator().manual_seed(4)), steps, sigma2, torch.Generator().manual_seed(5))
    dt = 1 / steps
    expected = torch.zeros(3)
    for i in range(1, steps):
        r = i / (i + 1)
        expected += Normal(r * traj[i + 1], math.sqrt(sigma2 * dt * r)).log_prob(traj[i]).sum(-1)
    torch.testing.assert_close(bridge_log_prob(traj, sigma2), expected, rtol=1e-12, atol=1e-10)


def test_bridge_is_the_backward_chain(float64):
    """Drawing x_i ~ p_B(. | x_{i+1}) step by step gives the same law as the vectorised bridge."""
    steps, sigma2, n = 20, 5.0, 40_000
    g = torch.Generator().manual_seed(6)
    x_end = torch.full((n, 2), 3.0)
    chain = [x_end]
    for i in range(steps - 1, 0, -1):
        r = i / (i + 1)
        chain.append(r * chain[-1] + math.sqrt(sigma2 / steps * r) * torch.randn(n, 2, generator=g))
    x5_chain = chain[steps - 5]
    x5_vec = bridge_sample(x_end, steps, sigma2, g)[5]
    assert (x5_chain.mean(0) - x5_vec.mean(0)).abs().max() < 0.03
    assert (x5_chain.var(0) / x5_vec.var(0) - 1).abs().max() < 0.04


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_is_reproducible(dtype):
    s = DiffusionSampler(2, steps=5, hidden=8, time_features=4).to(dtype)
    a = s.sample(10, generator=torch.Generator().manual_seed(9))
    b = s.sample(10, generator=torch.Generator().manual_seed(9))
    assert a.dtype == dtype and torch.equal(a, b)
