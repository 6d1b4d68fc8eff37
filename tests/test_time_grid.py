"""The non-uniform time grid t_i = 1 - (1 - i / T)^p (`sampler.time_power`, issue 19: thin data).

Each identity of the uniform sampler holds on the grid too (float64): the transitions with dt_i, the bridge and its
backward kernel, forward minus backward of the drift-free sampler, the fused backward, and the pretraining estimators;
then the option where it is used: `pretrain --time-power` and what it refuses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from conftest import strip_ansi, to_toml
from rtbcli.gaussian import gaussian_log_prob
from rtbcli.pretrain import pairs_loss, trajectory_loss
from rtbcli.rollout import Workspace, autograd_backward, backward, rollout
from rtbcli.sampler import DiffusionSampler, bridge_log_prob, bridge_sample, time_grid
from rtbcli.tasks import Task
from test_pretrain import grad_of
from test_sampler import seeded


def test_the_grid_is_uniform_at_power_1_and_shrinks_its_last_steps_above():
    assert torch.equal(time_grid(7, 1.0), torch.arange(8, dtype=torch.float64) / 7)
    torch.testing.assert_close(time_grid(4, 2.0), torch.tensor([0.0, 7 / 16, 12 / 16, 15 / 16, 1.0], dtype=torch.float64))
    s = DiffusionSampler(2, 100, 5.0, time_power=2.0).double()
    assert s.step_var[-1].item() == pytest.approx(5.0 / 100**2, rel=1e-9)  # the last step's noise: sigma2 T^-p
    assert s.dt.sum().item() == pytest.approx(1.0, abs=1e-12) and not s.uniform
    u = DiffusionSampler(2, 100, 5.0)
    assert u.uniform and u.dt == 0.01 and u.step_var == 5.0 * 0.01  # floats on the uniform grid, as before


def test_transitions_use_each_steps_dt(float64):
    """sample() draws x_{i+1} = x_i + dt_i f(x_i, t_i) + sqrt(sigma2 dt_i) eps, and step_log_probs scores exactly that."""
    s = seeded(1, steps=5, time_power=2.5)
    g = torch.Generator().manual_seed(2)
    traj = s.sample(4, generator=g)
    eps = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(2))
    t = time_grid(5, 2.5)
    x = torch.zeros(4, 2)
    for i in range(5):
        dt = (t[i + 1] - t[i]).item()
        f = s.net(x, s.net.time(t[i : i + 1]))
        x = x + dt * f + math.sqrt(5.0 * dt) * eps[i]
        torch.testing.assert_close(traj[i + 1], x, rtol=1e-10, atol=1e-10)
        mean = traj[i] + dt * s.net(traj[i], s.net.time(t[i : i + 1]))
        expected = Normal(mean, math.sqrt(5.0 * dt)).log_prob(traj[i + 1]).sum(-1)
        torch.testing.assert_close(s.step_log_probs(traj)[i], expected, rtol=1e-10, atol=1e-10)


def test_bridge_log_prob_matches_the_backward_kernel_on_a_grid(float64):
    """p_B(x_i | x_{i+1}) = N(t_i / t_{i+1} x_{i+1}, sigma2 dt_i t_i / t_{i+1} I), summed over i = 1..T-1."""
    steps, sigma2, t = 6, 3.0, time_grid(6, 3.0)
    traj = bridge_sample(torch.randn(3, 2, generator=torch.Generator().manual_seed(4)), steps, sigma2, torch.Generator().manual_seed(5), t)
    expected = torch.zeros(3)
    for i in range(1, steps):
        r = (t[i] / t[i + 1]).item()
        expected += Normal(r * traj[i + 1], math.sqrt(sigma2 * (t[i + 1] - t[i]).item() * r)).log_prob(traj[i]).sum(-1)
    torch.testing.assert_close(bridge_log_prob(traj, sigma2, t), expected, rtol=1e-12, atol=1e-10)


def test_bridge_marginals_on_a_grid(float64):
    steps, sigma2, n = 10, 5.0, 40_000
    t = time_grid(steps, 2.0)
    x_end = torch.tensor([[4.0, -2.0]]).expand(n, 2)
    traj = bridge_sample(x_end, steps, sigma2, torch.Generator().manual_seed(3), t)
    assert torch.equal(traj[0], torch.zeros(n, 2)) and torch.equal(traj[-1], x_end)
    for i in (2, 6, 9):
        ti = t[i].item()
        mean, var = ti * x_end[0], sigma2 * ti * (1 - ti)
        assert (traj[i].mean(0) - mean).abs().max() < 5 * math.sqrt(var / n)
        assert (traj[i].var(0) - var).abs().max() < 5 * var * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("power", [1.0, 2.0, 3.5])
def test_drift_free_forward_over_backward_is_the_terminal_gaussian(float64, power):
    """With f = 0, log p_F(tau) - log p_B(tau | x_T) = log N(x_T; 0, sigma2 I) for every trajectory, on any grid."""
    s = DiffusionSampler(2, 12, 2.0, 16, 8, 1, time_power=power)
    for traj in (
        s.sample(5, generator=torch.Generator().manual_seed(0)),
        s.backward_sample(3 * torch.randn(5, 2), torch.Generator().manual_seed(1)),
    ):
        torch.testing.assert_close(
            s.log_prob(traj) - s.backward_log_prob(traj), gaussian_log_prob(traj[-1], 0.0, 2.0), rtol=1e-12, atol=1e-11
        )


def test_fused_backward_matches_autograd_on_a_grid(float64):
    s = seeded(2, steps=7, time_power=2.0)
    for p in s.net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ro = rollout(s, Workspace(s, 9), extra_var=0.1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ro.residual, ro.traj[1:] - s.means(ro.traj), rtol=1e-12, atol=1e-12)
    g = torch.randn(7, 9, generator=torch.Generator().manual_seed(4))
    backward(ro, g)
    fused = [p.grad.clone() for p in s.parameters()]
    s.zero_grad(set_to_none=True)
    autograd_backward(ro, g)
    for a, p in zip(fused, s.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-11)


def test_pairs_estimator_is_the_trajectory_nll_on_a_grid(float64, reference):
    """E[trajectory NLL] - E[pairs loss] is the network-free constant sum_i (d/2)(1 - dt_i / (1 - t_i) + log 2 pi sigma2 dt_i),
    and the two estimators' gradients agree: the pairs loss weighs step i by dt_i at the grid's times."""
    task = Task(reference)
    T, sigma2 = 5, 5.0
    t = time_grid(T, 2.0)
    dt = t.diff()
    const = sum((1 - dt[i] / (1 - t[i])).item() + math.log(2 * math.pi * sigma2 * dt[i].item()) for i in range(T))  # d = 2
    diffs = []
    for seed in (1, 2):
        s = seeded(seed, std=0.5, steps=T, time_power=2.0)
        with torch.no_grad():
            traj = sum(trajectory_loss(s, task, 50_000, torch.Generator().manual_seed(r)) for r in range(4)) / 4
            pairs = sum(pairs_loss(s, task, 250_000, torch.Generator().manual_seed(10 + r)) for r in range(4)) / 4
        diffs.append((traj - pairs).item())
    assert diffs[0] == pytest.approx(const, abs=0.05) and diffs[1] == pytest.approx(const, abs=0.05)
    s = seeded(3, std=0.5, steps=T, time_power=2.0)
    g_traj = grad_of(trajectory_loss, s, task, 20_000, 0, 10)
    g_pairs = grad_of(pairs_loss, s, task, 20_000 * T, 1000, 10)
    assert (torch.dot(g_traj, g_pairs) / (g_traj.norm() * g_pairs.norm())).item() > 0.999
    assert (g_pairs.norm() / g_traj.norm()).item() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize(("steps", "power"), [(100, 4.0), (100, 3.0), (200, 3.0)])
def test_a_steep_grid_keeps_its_last_steps_in_float32(steps, power, reference):
    """At T = 100 and power 4, t_99 = 1 - 1e-8 is 1.0 in float32: step lengths, variances, the bridge and 1 - t_i come
    from the float64 grid, so a float32 sampler's log-probabilities and the pretraining losses stay finite and its dt_i
    are the grid's to float32 rounding (they were 0, or 1.3% off at power 3)."""
    s = seeded(0, steps=steps, time_power=power).float()
    exact = time_grid(steps, power).diff()
    assert s.dt.dtype == torch.float32
    torch.testing.assert_close(s.dt.flatten().double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(s.step_var.flatten().double(), s.sigma2 * exact, rtol=1e-6, atol=0)
    traj = s.sample(16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp, lb = s.log_prob(traj), s.backward_log_prob(traj)
    s64 = seeded(0, steps=steps, time_power=power).double()
    with torch.no_grad():  # the same trajectories scored in float64: float32's rounding of x at the last tiny steps only
        torch.testing.assert_close(lp.double(), s64.log_prob(traj.double()), rtol=0, atol=0.05 * steps)
        torch.testing.assert_close(lb.double(), s64.backward_log_prob(traj.double()), rtol=0, atol=0.05 * steps)
    bridges = s.backward_sample(traj[-1], torch.Generator().manual_seed(2))
    assert (bridges[-1] != bridges[-2]).all()  # the last bridge step moves (its variance was 0)
    task, g = Task(reference), torch.Generator().manual_seed(3)
    losses = [pairs_loss(s, task, 2000, g), trajectory_loss(s, task, 16, g)]
    assert all(torch.isfinite(v) for v in losses), losses


# ------------------------------------------------------------------ where it is used: pretrain --time-power
def test_pretrain_time_power_reaches_the_checkpoint_and_its_samplers(tmp_path, tiny_preset_file, capsys):
    """`pretrain --time-power 2`: the checkpoint's sampler (prior and the fine-tuned policy made from it) walks the grid."""
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.cli import run

    out = tmp_path / "p.safetensors"
    assert run(["pretrain", "--preset", str(tiny_preset_file), "--time-power", "2", "--steps", "3", "--out", str(out), "--quiet"]) == 0
    ck = load_checkpoint(out)
    assert ck.preset.sampler.time_power == 2.0
    prior = ck.sampler("policy", "cpu", torch.float64)  # a pretraining checkpoint holds the sampler it trained
    torch.testing.assert_close(prior.times(), time_grid(prior.steps, 2.0))
    ft = tmp_path / "f.safetensors"
    assert run(["finetune", "--prior", str(out), "--steps", "2", "--batch-size", "8", "--out", str(ft), "--quiet"]) == 0
    policy = load_checkpoint(ft).sampler("policy", "cpu", torch.float64)
    assert policy.time_power == 2.0 and not policy.uniform
    capsys.readouterr()


def test_pretrain_and_finetune_run_on_the_steepest_grid(tmp_path, tiny_preset, capsys):
    """`--time-power 4` at T = 100, the config's upper bound: pretraining used to stop at its first check ("diverged
    ... lower --lr") on NaN log-probabilities, as the last step's float32 dt was 0."""
    from rtbcli.cli import run

    preset = tmp_path / "steep.toml"
    preset.write_text(to_toml(tiny_preset.updated("sampler", steps=100).model_dump()))
    out, ft = tmp_path / "p.safetensors", tmp_path / "f.safetensors"
    rc = run(["pretrain", "--preset", str(preset), "--time-power", "4", "--steps", "3", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rc = run(["finetune", "--prior", str(out), "--steps", "2", "--batch-size", "8", "--out", str(ft), "--json", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--time-power", "0.5"], "--time-power"),  # below 1 the last steps would grow
        (["--time-power", "9"], "--time-power"),
    ],
)
def test_pretrain_refuses_a_bad_time_power(tmp_path, tiny_preset_file, capsys, extra, names):
    from rtbcli.cli import run

    out = tmp_path / "p.safetensors"
    assert run(["pretrain", "--preset", str(tiny_preset_file), *extra, "--steps", "2", "--out", str(out), "--quiet"]) == 2
    err = strip_ansi(capsys.readouterr().err).strip().splitlines()
    assert len(err) == 1 and names in err[0] and not out.exists()


def test_langevin_and_replay_run_on_a_pretrained_priors_grid(tmp_path, tiny_preset_file, capsys):
    """Fine-tuning mode: a Langevin policy built from a prior pretrained on a grid takes that grid (as its checkpoint
    records), and replay's bridge trajectories follow it (tests/test_offpolicy_loop.py)."""
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.cli import run

    out = tmp_path / "p.safetensors"
    assert run(["pretrain", "--preset", str(tiny_preset_file), "--time-power", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    for option in ("--langevin", "--replay"):
        ft = tmp_path / f"f{option}.safetensors"
        rc = run(["finetune", "--prior", str(out), option, "--steps", "2", "--batch-size", "8", "--out", str(ft), "--quiet"])
        assert rc == 0 and load_checkpoint(ft).preset.sampler.time_power == 2.0, capsys.readouterr().err
