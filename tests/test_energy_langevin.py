"""The Langevin parametrisation: its drift is NN1(x, t) + NN2(t) clip(grad log pi(x)), initialised as the paper's code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtbcli.energy import (
    LangevinDriftNet,
    LangevinSampler,
    LangevinScale,
    clipped_grad,
    get_target,
)
from rtbcli.sampler import DriftNet

C = 0.7  # log pi(x) = -C |x|^2 / 2: grad log pi = -C x


def log_pi(x):
    return -0.5 * C * x.pow(2).sum(-1)


def test_clipped_grad_by_hand():
    x = torch.tensor([[-500.0, 0.3], [20.0, 200.0]], dtype=torch.float64)
    expected = torch.tensor([[100.0, -0.21], [-14.0, -100.0]], dtype=torch.float64)
    assert torch.allclose(clipped_grad(log_pi, x), expected, rtol=0, atol=1e-12)
    assert clipped_grad(log_pi, x.reshape(2, 1, 2)).shape == (2, 1, 2)
    # NaN gradients become 0
    assert torch.equal(clipped_grad(lambda z: z.sqrt().sum(-1), torch.tensor([[-1.0, 4.0]])), torch.tensor([[0.0, 0.25]]))


def test_fresh_drift_is_one_hundredth_of_the_clipped_gradient():
    torch.manual_seed(0)
    net = LangevinDriftNet(2, log_pi, hidden=16, n_freq=8).double()
    x = torch.tensor([[-500.0, 0.3], [1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0, 0.99, 100, dtype=torch.float64)
    temb = net.time(t)
    f = net(x, temb[37], t[37])
    bias = float(torch.tensor(0.01, dtype=torch.float32))  # initialised in float32, then cast
    assert torch.allclose(f, bias * clipped_grad(log_pi, x), rtol=0, atol=1e-15)
    # the paper's init: NN1's last layer zero, NN2's last layer weight 0 and bias 0.01
    assert float(net.body[-1].weight.detach().abs().sum() + net.body[-1].bias.detach().abs().sum()) == 0
    last = net.scale.mlp[-1]
    assert float(last.weight.detach().abs().sum()) == 0 and torch.equal(last.bias, torch.full((1,), bias, dtype=torch.float64))
    assert sum(1 for m in net.scale.mlp if isinstance(m, nn.Linear)) == 4  # 2 n_freq -> h, 2 x (h -> h), h -> 1


def test_drift_equals_the_formula_with_trained_weights():
    torch.manual_seed(1)
    net = LangevinDriftNet(2, log_pi, hidden=16, n_freq=8, per_dimension=True).double()
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    T, B = 5, 4
    x = torch.randn(T, B, 2, dtype=torch.float64) * 3
    t = torch.arange(T, dtype=torch.float64) / T
    temb = net.time(t)[:, None, :]
    f = net(x, temb, t[:, None])
    nn1 = DriftNet.forward(net, x, temb)  # the same weights as a plain DriftNet
    plain = DriftNet(2, 16, 8).double()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("scale.")})
    assert torch.allclose(nn1, plain(x, plain.time(t)[:, None, :]), rtol=0, atol=1e-13)
    # NN2(t) by hand from its weights
    s = net.scale
    arg = t[:, None] * s.freqs + s.phase
    h = torch.cat([arg.sin(), arg.cos()], -1)
    lins = [m for m in s.mlp if isinstance(m, nn.Linear)]
    h = lins[0](h)
    for lin in lins[1:]:
        h = lin(torch.nn.functional.gelu(h))
    nn2 = h[:, None, :]  # (T, 1, d)
    expected = nn1 + nn2 * (-C * x).clamp(-100, 100)
    assert torch.allclose(f, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(nn2, torch.zeros_like(nn2))  # the test is not vacuous


def test_log_density_is_not_saved():
    net = LangevinDriftNet(32, get_target("manywell").log_density)
    assert all(not k.startswith("log_density") for k in net.state_dict())
    assert isinstance(net.scale, LangevinScale)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_langevin_sampler_scores_what_it_samples(power):
    """Sampling and scoring agree step by step, on the uniform grid and on t_i = 1 - (1 - i / T)^2 (dt_i, the noise
    sqrt(sigma2 dt_i) and the drift's time t_i all the grid's)."""
    torch.manual_seed(2)
    s = LangevinSampler(2, log_pi, steps=8, sigma2=1.0, hidden=16, time_features=8, time_power=power).double()
    for p in s.net.parameters():
        nn.init.normal_(p, std=0.2)
    t = 1 - (1 - torch.arange(9, dtype=torch.float64) / 8) ** power  # the grid, by hand
    assert torch.allclose(s.times(), t, rtol=0, atol=1e-15)  # T + 1 grid points (the bridge's), not the T step times
    traj = s.sample(6, generator=torch.Generator().manual_seed(3))
    assert traj.shape == (9, 6, 2) and torch.equal(traj[0], torch.zeros(6, 2, dtype=torch.float64))
    means = s.means(traj)
    temb = s.net.time(t[:-1])
    for i in (0, 3, 7):
        step = traj[i] + (t[i + 1] - t[i]) * s.net(traj[i], temb[i], t[i])
        assert torch.allclose(means[i], step, rtol=0, atol=1e-12)
    # the residuals are the scaled noise: step log-probs are N(residual; 0, sigma2 dt_i)
    var = (t[1:] - t[:-1])[:, None]  # sigma2 = 1
    r = traj[1:] - means
    hand = -(r.pow(2).sum(-1)) / (2 * var) - torch.log(2 * math.pi * var)
    assert torch.allclose(s.step_log_probs(traj), hand, rtol=0, atol=1e-10)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(8, 6, 2, generator=g, dtype=torch.float64) * var[..., None].sqrt()
    assert torch.allclose(r, noise, rtol=0, atol=1e-10)
