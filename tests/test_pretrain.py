"""Pretraining: the pairs estimator targets the same maximum-likelihood objective as whole trajectories."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.pretrain import bridge_elbo, learning_rate, pairs_loss, trajectory_loss
from rtbcli.tasks import Task
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


def test_bridge_elbo_is_a_lower_bound(reference):
    task = Task(reference)
    s = seeded(4, steps=10)
    data = task.data_log_prob(task.prior_data.sample(20_000, torch.Generator().manual_seed(0), dtype=torch.float64)).mean()
    assert bridge_elbo(s, task, 2000, torch.Generator().manual_seed(1)) < data.item()
