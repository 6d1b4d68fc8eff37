"""Pretraining: the pairs estimator targets the same maximum-likelihood objective as whole trajectories."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from rtbcli.checkpoint import load_checkpoint
from rtbcli.config import Preset
from rtbcli.distributed import Dist
from rtbcli.pretrain import (
    bridge_elbo,
    new_sampler,
    pairs_backward,
    pairs_loss,
    pretrain,
    setup,
    train_step,
    trajectory_backward,
    trajectory_loss,
)
from rtbcli.rollout import rows_backward
from rtbcli.sampler import DiffusionSampler, bridge_sample
from rtbcli.tasks import Task
from rtbcli.trainer import learning_rate
from test_sampler import seeded


def grad_of(loss_fn, sampler, task, n, seed, reps):
    total = None
    for r in range(reps):
        sampler.zero_grad()
        loss_fn(sampler, task, n, torch.Generator().manual_seed(seed + r)).backward()
        g = torch.cat([p.grad.reshape(-1) for p in sampler.parameters()])
        total = g if total is None else total + g
    return total / reps


def test_pairs_and_trajectory_estimators_have_the_same_expected_gradient(float64, reference):
    """Rao-Blackwell + bridge marginals: an unbiased estimator of the trajectory NLL's gradient."""
    task = Task(reference)
    s = seeded(3, std=0.5, steps=5)
    g_traj = grad_of(trajectory_loss, s, task, 20_000, 0, 10)
    g_pairs = grad_of(pairs_loss, s, task, 20_000 * 5, 1000, 10)
    cos = torch.dot(g_traj, g_pairs) / (g_traj.norm() * g_pairs.norm())
    assert cos.item() > 0.999
    assert (g_pairs.norm() / g_traj.norm()).item() == pytest.approx(1.0, abs=0.02)


def test_loss_difference_is_a_constant(float64, reference):
    """E[trajectory NLL] - E[pairs loss] does not depend on the network (the dropped noise term)."""
    task = Task(reference)
    diffs = []
    for seed in (1, 2):
        s = seeded(seed, std=0.5, steps=5)
        with torch.no_grad():
            traj = sum(trajectory_loss(s, task, 50_000, torch.Generator().manual_seed(r)) for r in range(4)) / 4
            pairs = sum(pairs_loss(s, task, 250_000, torch.Generator().manual_seed(10 + r)) for r in range(4)) / 4
        diffs.append((traj - pairs).item())
    # the constant: E sum_i |x_{i+1} - E[x_{i+1} | x_i, x_T]|^2 / (2 sigma2 dt) + the Gaussian normaliser
    T, sigma2 = 5, 5.0
    dt = 1 / T
    noise = sum(2 * (1 - dt / (1 - i * dt)) / 2 for i in range(T))  # d = 2 coordinates, conditional variances
    const = noise + T * math.log(2 * math.pi * sigma2 * dt)
    assert diffs[0] == pytest.approx(diffs[1], abs=0.05)
    assert diffs[0] == pytest.approx(const, abs=0.05)


def test_schedules(reference):
    cfg = reference.pretrain.model_copy(update={"steps": 100, "lr": 1.0, "lr_final": 0.0, "decay_fraction": 0.2})
    assert learning_rate(0, cfg.model_copy(update={"lr_schedule": "constant"})) == 1.0
    wsd = cfg.model_copy(update={"lr_schedule": "wsd"})
    assert [learning_rate(s, wsd) for s in (0, 79, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    cos = cfg.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate(0, cos) == 1.0 and learning_rate(50, cos) == pytest.approx(0.5) and learning_rate(100, cos) == pytest.approx(0)


def gaussian_task(preset: Preset, sigma2: float) -> Task:
    """Data N(0, sigma2 I): the marginal at T of a drift-free sampler."""
    data = preset.model_dump()
    data.update(reward=None, prior_data={"means": [[0.0, 0.0]], "variance": sigma2})
    return Task(Preset.model_validate(data))


def test_bridge_elbo_is_a_lower_bound(reference):
    task = Task(reference)
    s = seeded(4, steps=10)
    data = task.data_log_prob(task.prior_data.sample(20_000, torch.Generator().manual_seed(0), dtype=torch.float64)).mean()
    assert bridge_elbo(s, task, 2000, torch.Generator().manual_seed(1)) < data.item()


def test_bridge_elbo_is_exact_for_brownian_motion(float64, reference):
    """f = 0 and data N(0, sigma2 I): log p_F(tau) - log p_B(tau | x) = log N(x; 0, sigma2 I) for every
    trajectory, so the ELBO is the mean data log-density of the very points it drew."""
    s = DiffusionSampler(2, steps=10, hidden=16, time_features=8)
    task = gaussian_task(reference, s.sigma2)
    x = task.data.sample(500, torch.Generator().manual_seed(1), dtype=torch.float64)  # the ELBO's own first draw
    expected = float(MultivariateNormal(torch.zeros(2), s.sigma2 * torch.eye(2)).log_prob(x).mean())
    assert bridge_elbo(s, task, 500, torch.Generator().manual_seed(1)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert bridge_elbo(seeded(4, steps=10), task, 500, torch.Generator().manual_seed(1)) < expected - 1e-3


def test_trajectory_loss_is_the_bridge_trajectory_nll(float64, reference):
    """`trajectory_loss` draws x from the data and a bridge from x to 0, and returns -mean log p_F(tau),
    written out here step by step with torch.distributions."""
    task, s = Task(reference), seeded(5, steps=5)
    n = 6
    loss = trajectory_loss(s, task, n, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)  # the same draws, in the same order
    traj = bridge_sample(task.data.sample(n, g, dtype=torch.float64), 5, s.sigma2, g)
    nll = torch.zeros(n)
    with torch.no_grad():
        for i in range(5):
            x = traj[i]
            mean = x + s.net(x, s.net.time(torch.full((1,), i / 5.0))) / 5.0
            nll -= MultivariateNormal(mean, s.sigma2 / 5.0 * torch.eye(2)).log_prob(traj[i + 1])
    torch.testing.assert_close(loss.detach(), nll.mean(), rtol=1e-12, atol=1e-12)
    assert traj[-1].abs().max() > 3  # data points, not the bridge's start


@pytest.mark.usefixtures("one_thread")
def test_ema_saves_the_averaged_weights(tmp_path, tiny_preset):
    """pretrain.ema = 0.9 saves e_k = 0.9 e_{k-1} + 0.1 theta_k (e_0 = the initial weights), not theta_k;
    the trained weights theta_k are those of a run without EMA stopped at step k (constant lr)."""
    base = tiny_preset.updated("pretrain", lr_schedule="constant", lr=1e-2, batch_size=16)
    trained = []
    for k in (1, 2, 3):
        out = tmp_path / f"plain{k}.safetensors"
        pretrain(base.updated("pretrain", steps=k), "tiny", out, seed=3, progress=False)
        trained.append(load_checkpoint(out).section("policy"))
    out = tmp_path / "ema.safetensors"
    pretrain(base.updated("pretrain", steps=3, ema=0.9), "tiny", out, seed=3, progress=False)
    saved = load_checkpoint(out).section("policy")
    init = new_sampler(base, 3, "cpu").state_dict()
    for name, e in init.items():
        e = e.clone()
        for theta in trained:
            e = e + 0.1 * (theta[name] - e)
        torch.testing.assert_close(saved[name], e, rtol=1e-5, atol=1e-7, msg=name)
    gap = max((saved[k] - trained[-1][k]).abs().max().item() for k in saved)
    assert gap > 1e-3  # the averaged weights are not the trained ones


def grads(s) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in s.named_parameters()}


@pytest.mark.parametrize("estimator", ["pairs", "trajectory"])
@pytest.mark.parametrize(("layers", "power"), [(1, 1.0), (2, 1.5), (3, 1.0)])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_the_hand_written_gradient_is_autograd_s(float64, reference, estimator, layers, power, shard):
    """`pairs_backward` / `trajectory_backward`: the same draws, loss and gradient as autograd through
    `pairs_loss` / `trajectory_loss`, on uniform and non-uniform grids, one rank's share or all."""
    task = Task(reference)
    s = seeded(11, std=0.5, steps=7, layers=layers, time_power=power)
    loss_fn, by_hand = (pairs_loss, pairs_backward) if estimator == "pairs" else (trajectory_loss, trajectory_backward)
    s.zero_grad(set_to_none=True)
    expected = loss_fn(s, task, 40, torch.Generator().manual_seed(3), shard)
    expected.backward()
    want = grads(s)
    s.zero_grad(set_to_none=True)
    loss = by_hand(s, task, 40, torch.Generator().manual_seed(3), shard)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-13, atol=1e-13)
    for name, g in grads(s).items():
        torch.testing.assert_close(g, want[name], rtol=1e-12, atol=1e-14, msg=name)
        assert not g.requires_grad, name


@pytest.mark.parametrize("estimator", ["pairs", "trajectory"])
@pytest.mark.parametrize("box_weight", [0.0, 0.5])
def test_a_pretraining_step_takes_the_hand_written_gradient(float64, tiny_preset, tmp_path, monkeypatch, estimator, box_weight):
    """train_step of a DriftNet goes through `rows_backward` once, with the gradient autograd gives
    (the box term's part by autograd on top); with the fused path switched off it is autograd's alone."""
    preset = tiny_preset.updated("pretrain", batch_size=16, estimator=estimator, box_weight=box_weight)
    calls = []

    def counted(*args):
        calls.append(1)
        return rows_backward(*args)

    monkeypatch.setattr("rtbcli.pretrain.rows_backward", counted)
    out = {}
    for fused in (True, False):
        monkeypatch.setattr("rtbcli.pretrain.fused_layout", lambda net, fused=fused: fused)
        run = setup(preset, "tiny", tmp_path / "prior.safetensors", seed=4)
        same_draws = torch.Generator().set_state(run.gen.get_state())
        n = 16 * run.sampler.steps if estimator == "pairs" else 16  # pairs: batch_size * T triples; paths: batch_size
        with torch.no_grad():
            nll = (pairs_loss if estimator == "pairs" else trajectory_loss)(run.sampler, run.task, n, same_draws)
        loss = train_step(run, Dist())
        if box_weight == 0:
            torch.testing.assert_close(loss, nll, rtol=1e-12, atol=1e-12)  # the step's own draws and batch size
        out[fused] = (loss, grads(run.sampler))
    assert calls == [1]  # the fused run only
    torch.testing.assert_close(out[True][0], out[False][0].detach(), rtol=1e-12, atol=1e-12)
    for name, g in out[True][1].items():
        torch.testing.assert_close(g, out[False][1][name], rtol=1e-10, atol=1e-13, msg=name)
