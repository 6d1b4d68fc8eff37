"""The DDPM discretisation (rtbcli.ddpm): exact transition log-probabilities in float64, agreement with
diffusers' DDPMScheduler step by step, positive variances, the noising process, and the policy gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rtbcli.ddpm import DDPMSampler, Schedule, schedule_from_config
from rtbcli.errors import InputError
from rtbcli.rollout import Workspace, policy_grad, rollout


class Eps(nn.Module):
    """A small epsilon network over integer timesteps."""

    def __init__(self, dim=3, n=20):
        super().__init__()
        self.n = n
        self.body = nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim))

    def forward(self, x, t):
        return self.body(torch.cat([x, t.to(x.dtype)[:, None] / self.n], -1))


def sampler(**kw) -> DDPMSampler:
    torch.manual_seed(0)
    sched = Schedule(**{"train_steps": 20, "beta_end": 0.2, **kw})
    return DDPMSampler(3, sched, Eps(3, 20)).double()


@pytest.mark.parametrize(
    "kw", [{}, {"sampling_steps": 5, "clip_sample": True}, {"variance_type": "fixed_large", "beta_schedule": "squaredcos_cap_v2"}]
)
def test_transition_log_prob_is_the_direct_gaussian(kw, float64):
    s = sampler(**kw)
    traj = s.sample(6, 0.1, torch.Generator().manual_seed(1))
    sched, tab = s.schedule, s.schedule.tables()
    abar = torch.cumprod(1 - sched.betas(), 0)
    want = -0.5 * traj[0].pow(2).sum(-1) - 1.5 * math.log(2 * math.pi)  # the start, N(0, I)
    ratio = sched.train_steps // sched.steps
    for k in range(s.steps):
        t = (s.steps - 1 - k) * ratio
        ab, ab_prev = abar[t], (abar[t - ratio] if t - ratio >= 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - ab / ab_prev
        x = traj[k]
        eps = s.net(x, torch.full((6,), t))
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if sched.clip_sample:
            x0 = x0.clamp(-1, 1)
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
        var = float(tab["var"][k])
        r = traj[k + 1] - mean
        want += -0.5 * r.pow(2).sum(-1) / var - 1.5 * math.log(2 * math.pi * var)
    torch.testing.assert_close(s.log_prob(traj), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("clip", [False, True])
def test_means_and_variances_are_diffusers_ddpm_scheduler_s(variance_type, k, clip, float64):
    from diffusers import DDPMScheduler

    s = sampler(variance_type=variance_type, sampling_steps=k, clip_sample=clip)
    ds = DDPMScheduler(num_train_timesteps=20, beta_end=0.2, variance_type=variance_type, clip_sample=clip)
    ds.set_timesteps(s.steps)
    assert ds.timesteps.tolist() == s.schedule.tables()["timesteps"].tolist()
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    var = s.schedule.tables()["var"]
    for i, t in enumerate(ds.timesteps):
        kk = torch.full((4,), i)
        eps = s.eps(x, kk)
        noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        out = ds.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        dvar = ds._get_variance(t) if t > 0 else torch.tensor(0.0)
        mean = out - dvar**0.5 * noise if t > 0 else out
        torch.testing.assert_close(s.mean_at(x, kk), mean, rtol=2e-6, atol=2e-6)  # diffusers' betas are float32
        if t > 0:
            torch.testing.assert_close(var[i], dvar.double(), rtol=1e-3, atol=0)  # float32: 1 - abar cancels at small t
        x = out
    assert bool((var > 0).all())
    if variance_type == "fixed_small":
        assert var[-1] == var[-2]  # the last step's posterior variance (0) replaced by the step before's


@pytest.mark.parametrize(
    "kw", [{}, {"sampling_steps": 5, "clip_sample": True}, {"beta_schedule": "squaredcos_cap_v2", "sampling_steps": 4}]
)
def test_ddim_with_eta_1_is_the_ddpm_step(kw, float64):
    ddpm, ddim = Schedule(train_steps=20, beta_end=0.2, **kw).tables(), Schedule(train_steps=20, beta_end=0.2, eta=1.0, **kw).tables()
    for key in ("c0", "ct", "var"):
        torch.testing.assert_close(ddim[key], ddpm[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 0.7])
@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_means_and_variances_are_diffusers_ddim_scheduler_s(eta, k, clip, float64):
    from diffusers import DDIMScheduler

    s = sampler(sampling_steps=k, clip_sample=clip, eta=eta)
    ds = DDIMScheduler(num_train_timesteps=20, beta_end=0.2, clip_sample=clip)
    ds.set_timesteps(s.steps)
    assert ds.timesteps.tolist() == s.schedule.tables()["timesteps"].tolist()
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    var, ratio = s.schedule.tables()["var"], 20 // s.steps
    for i, t in enumerate(ds.timesteps):
        kk = torch.full((4,), i)
        eps = s.eps(x, kk)
        zero = torch.zeros_like(x)
        mean = ds.step(eps, t, x, eta=eta, use_clipped_model_output=True, variance_noise=zero).prev_sample
        torch.testing.assert_close(s.mean_at(x, kk), mean, rtol=2e-6, atol=2e-6)  # diffusers' betas are float32
        if i < s.steps - 1:
            dvar = eta**2 * ds._get_variance(t, t - ratio).double()
            torch.testing.assert_close(var[i], dvar, rtol=1e-3, atol=0)
        x = mean + var[i].sqrt() * torch.randn(4, 3, dtype=torch.float64)
    assert bool((var > 0).all()) and var[-1] == var[-2]  # the last step's 0 replaced by the step before's


@pytest.mark.parametrize("eta", [0.0, -0.5, 1.5])
def test_eta_outside_0_1_is_refused(eta):
    with pytest.raises(InputError, match=r"eta .* must be in \(0, 1\]"):
        Schedule(eta=eta)


def test_the_prior_tail_steps_are_the_prior_s_own_transitions(float64):
    prior = sampler(sampling_steps=6, clip_sample=True)
    policy = copy.deepcopy(prior)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.keep_prior_tail(2, copy.deepcopy(prior.net))
    traj = policy.sample(5, 0.0, torch.Generator().manual_seed(3))
    diff = (policy.step_log_probs(traj) - prior.step_log_probs(traj)).detach()  # (K, B)
    assert float(diff[:4].abs().min(1).values.max()) > 1e-3 and float(diff[4:].abs().max()) < 1e-9
    # sampling: the last two steps follow the prior's means from the policy's states
    g = torch.Generator().manual_seed(4)
    traj = policy.sample(5, 0.0, g)
    k = torch.full((5,), 5)
    torch.testing.assert_close(policy.mean_at(traj[5], k, prior=True), prior.mean_at(traj[5], k))
    # training: no gradient reaches the policy through the tail steps
    policy.zero_grad()
    policy.step_log_probs(traj)[4:].sum().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in policy.net.parameters())
    assert not any(p.requires_grad for p in policy.tail.parameters())
    assert not any(k.startswith("tail.") for k in policy.saved_state())
    with pytest.raises(InputError, match="prior_tail_steps 6 must be between 0"):
        policy.keep_prior_tail(6, copy.deepcopy(prior.net))
    with pytest.raises(InputError, match="needs the prior's network"):
        copy.deepcopy(prior).keep_prior_tail(1)


def test_prior_and_policy_at_step_0_give_a_residual_of_log_z(float64):
    policy = sampler(sampling_steps=10)
    prior = copy.deepcopy(policy).requires_grad_(False)
    ro = rollout(policy, Workspace(policy, 8), 0.3, torch.Generator().manual_seed(2))
    step_lpf = policy.step_log_probs(ro.traj)
    log_z = torch.tensor(1.7, dtype=torch.float64)
    residual = log_z + step_lpf.sum(0) - prior.step_log_probs(ro.traj).sum(0)
    torch.testing.assert_close(residual, log_z.expand(8), rtol=0, atol=1e-10)
    torch.testing.assert_close(ro.residual, ro.traj[1:] - prior.means(ro.traj), rtol=0, atol=1e-12)


def test_policy_grad_is_the_gradient_of_the_weighted_step_log_probs(float64):
    s = sampler(sampling_steps=7, clip_sample=True)
    ro = rollout(s, Workspace(s, 5), 0.2, torch.Generator().manual_seed(4))
    g = torch.randn(s.steps, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    policy_grad(ro, g)
    got = [p.grad.clone() for p in s.parameters()]
    s.zero_grad(set_to_none=True)
    (s.step_log_probs(ro.traj) * g).sum().backward()
    for a, p in zip(got, s.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_noising_process_log_prob_and_marginals(float64):
    s = sampler(sampling_steps=4)
    x0 = torch.full((40_000, 3), 0.7, dtype=torch.float64)
    traj = s.noise_trajectories(x0, torch.Generator().manual_seed(6))
    abar = torch.cumprod(1 - s.schedule.betas(), 0)
    for k, t in enumerate(s.schedule.tables()["timesteps"].tolist()):
        m, v = traj[k].mean(), traj[k].var()
        assert abs(float(m) - 0.7 * float(abar[t].sqrt())) < 0.02
        assert abs(float(v) - float(1 - abar[t])) < 0.02
    tab = s.schedule.tables()
    small = traj[:, :3]
    want = sum(
        -0.5 * (small[k] - tab["q_scale"][k] * small[k + 1]).pow(2).sum(-1) / tab["q_var"][k]
        - 1.5 * torch.log(2 * math.pi * tab["q_var"][k])
        for k in range(4)
    )
    torch.testing.assert_close(s.backward_log_prob(small), want, rtol=0, atol=1e-10)
    assert s.elbo(x0[:5]).shape == (5,)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"_class_name": "DDIMScheduler"}, "is a DDIMScheduler: rtbcli supports DDPMScheduler"),
        ({"prediction_type": "v_prediction"}, "prediction_type = 'v_prediction': rtbcli supports prediction_type = 'epsilon'"),
        ({"variance_type": "learned_range"}, "variance_type 'learned_range' is not supported"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not supported"),
        ({"timestep_spacing": "trailing"}, "timestep_spacing = 'trailing'"),
        ({"thresholding": True}, "thresholding = True"),
    ],
)
def test_unsupported_scheduler_configs_are_named(config, match):
    with pytest.raises(InputError, match=match.replace("(", "\\(")):
        schedule_from_config(config)


def test_default_scheduler_config_is_honoured():
    s = schedule_from_config({"num_train_timesteps": 50}, sampling_steps=10)
    assert s.clip_sample is True and s.steps == 10 and s.tables()["timesteps"].tolist() == list(range(45, -1, -5))


def test_scoring_without_gradient_passes_at_most_no_grad_rows_states(monkeypatch, float64):
    """evaluate's scoring (`log_prob` under no_grad) runs the network on slices of NO_GRAD_ROWS states (the
    allocator reuses their activations), with the same values as training's one batched pass."""
    import rtbcli.ddpm as ddpm

    s = sampler(sampling_steps=5)
    traj = s.sample(9, 0.0, torch.Generator().manual_seed(2))  # 5 * 9 = 45 states
    whole = s.log_prob(traj)  # with gradient enabled: one pass
    monkeypatch.setattr(ddpm, "NO_GRAD_ROWS", 8)
    rows: list[int] = []
    forward = s.net.forward
    monkeypatch.setattr(s.net, "forward", lambda x, t: rows.append(len(x)) or forward(x, t))
    with torch.no_grad():
        sliced = s.log_prob(traj)
    assert rows == [8] * 5 + [5]
    torch.testing.assert_close(sliced, whole.detach(), rtol=0, atol=1e-12)
    rows.clear()
    s.log_prob(traj).sum().backward()  # training keeps one pass (its graph)
    assert rows == [45]
