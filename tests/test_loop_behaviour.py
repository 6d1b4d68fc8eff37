"""What a fine-tuning step (`rtbcli.finetune.train_step`) does, observed from outside.

Issue 13: exploration switched off in the loop, uniform SNIS weights and no tempering, all at
once, left the suite green; the pieces were tested, not that the loop uses them. Here each test
builds a run with `setup` and calls `train_step` itself, step by step, recording what every step
used (its s_e, its trajectories, the policy's weights before it, and the arguments and value of
the loss functions the registry looks up in `rtbcli.objectives` at call time), and recomputes it
by hand from the recorded trajectories and weights (float64).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rtbcli import finetune as finetune_module
from rtbcli import objectives
from rtbcli.checkpoint import load_checkpoint
from rtbcli.config import Preset
from rtbcli.distributed import Dist
from rtbcli.evaluate import evaluate
from rtbcli.finetune import finetune
from rtbcli.pretrain import pretrain
from rtbcli.sampler import DiffusionSampler
from rtbcli.tasks import Task
from rtbcli.trainer import exploration_std

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """Runs a fine-tuning run step by step (`setup`, then `train_step`), recording every step's s_e^2,
    trajectories and the policy's weights before it; and records the arguments and value of every
    call to the wrapped loss functions."""

    def __init__(self, monkeypatch):
        self.rollouts: list[dict] = []
        self.calls: dict[str, list[dict]] = {}
        self.monkeypatch = monkeypatch

    def train(self, prior_path, preset, algo, tmp_path, **kw) -> None:
        run = finetune_module.setup(load_checkpoint(prior_path), preset, "tiny", algo, tmp_path / f"{algo}.safetensors", dtype=F64, **kw)
        for _ in range(preset.finetune.steps):
            state = {k: v.detach().clone() for k, v in run.policy.state_dict().items()}
            st = finetune_module.train_step(run, Dist())
            self.rollouts.append({"extra_var": st.exploration * st.exploration, "traj": st.traj.detach().clone(), "state": state})
        assert run.step == preset.finetune.steps

    def wrap(self, name: str, *arg_names: str) -> None:
        real = getattr(objectives, name)
        calls = self.calls.setdefault(name, [])

        def wrapped(*args, **kw):
            out = real(*args, **kw)
            named = dict(zip(arg_names, args), **kw)
            rec = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in named.items()}
            rec["value"] = out.detach().clone()
            calls.append(rec)
            return out

        self.monkeypatch.setattr(objectives, name, wrapped)


def policy_at(preset: Preset, state: dict) -> DiffusionSampler:
    """The policy as it was when a rollout was drawn."""
    s = DiffusionSampler.from_spec(preset.dim, preset.sampler).to(F64)
    s.load_state_dict(state)
    return s.requires_grad_(False)


def run(prior_path, preset, algo, tmp_path, **kw):
    return finetune(load_checkpoint(prior_path), preset, "tiny", algo, tmp_path / f"{algo}.safetensors", progress=False, dtype=F64, **kw)


# ----------------------------------------------------------------------------- exploration
def authors_schedule(it: int, n: int, s0: float, hold: float, end: float) -> float:
    """s_e written out independently: s0 until hold*N, then s0 (1 - it / (end*N)) down to 0; none at the last step."""
    if it == n - 1:
        return 0.0
    if it < hold * n:
        return s0
    return max(0.0, s0 * (1.0 - it / (end * n)))


@pytest.mark.parametrize("algo,s0,hold,end", [("rtb", 0.5, 0.1, 0.9), ("reinforce-kl", 0.8, 0.25, 0.5)])
def test_behaviour_variance_follows_the_schedule_at_every_step(tmp_path, tiny_prior, tiny_preset, monkeypatch, algo, s0, hold, end):
    n = 20
    preset = tiny_preset.updated("finetune", steps=n, batch_size=16, exploration=s0, exploration_hold=hold, exploration_end=end)
    rec = Recorder(monkeypatch)
    rec.train(tiny_prior, preset, algo, tmp_path)
    used = [r["extra_var"] for r in rec.rollouts]
    assert len(used) == n
    expected = [authors_schedule(it, n, s0, hold, end) ** 2 for it in range(n)]
    assert used == pytest.approx(expected, rel=1e-12, abs=0)
    assert used == pytest.approx([exploration_std(it, n, s0, hold, end) ** 2 for it in range(n)], rel=1e-12, abs=0)
    held = [it for it in range(n) if it < hold * n]
    assert held and all(used[it] == pytest.approx(s0 * s0) for it in held)  # the hold
    assert used[held[-1] + 1] < s0 * s0 and used[held[-1] + 1] > 0  # the step down, then the decay
    assert used[-1] == 0.0  # the last step never explores


def test_trajectories_come_from_the_inflated_behaviour_policy(tmp_path, tiny_prior, tiny_preset, monkeypatch):
    """At step 0 (s_e = s0) the recorded transitions have variance sigma2 dt + s0^2 around the policy's means."""
    s0 = 0.7
    preset = tiny_preset.updated("finetune", steps=2, batch_size=64, exploration=s0)
    rec = Recorder(monkeypatch)
    rec.train(tiny_prior, preset, "rtb", tmp_path)
    first = rec.rollouts[0]
    policy = policy_at(preset, first["state"])
    traj = first["traj"]
    resid = traj[1:] - policy.means(traj)
    z2 = resid.pow(2) / (policy.step_var + s0 * s0)
    n = z2.numel()
    assert float(z2.mean()) == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))  # a chi^2_1 mean
    assert float((resid.pow(2) / policy.step_var).mean()) > 1.5  # not the un-inflated policy's variance


@pytest.mark.parametrize("algo,on_policy", [("rtb", True), ("trust-pcl", True), ("reinforce-kl", True), ("legacy-rl", False)])
def test_no_exploration_on_policy_or_for_legacy(tmp_path, tiny_prior, tiny_preset, monkeypatch, algo, on_policy):
    preset = tiny_preset.updated("finetune", steps=5, batch_size=16, exploration=0.5)
    rec = Recorder(monkeypatch)
    rec.train(tiny_prior, preset, algo, tmp_path, on_policy=on_policy)
    assert [r["extra_var"] for r in rec.rollouts] == [0.0] * 5


# ----------------------------------------------------------------------------- reinforce-kl's weights
def recompute(preset, prior, rec_rollout):
    """lpf, lb (behaviour), lpp and log r of a recorded batch, from the policy as it was then."""
    policy = policy_at(preset, rec_rollout["state"])
    traj = rec_rollout["traj"]
    with torch.no_grad():
        lpf = policy.log_prob(traj)
        lb = policy.log_prob(traj, extra_var=rec_rollout["extra_var"])
        lpp = prior.log_prob(traj)
    log_r = Task(preset).log_reward(traj[-1]).to(F64)
    return lpf, lb, lpp, log_r


@pytest.fixture
def frozen_prior(tiny_prior):
    return load_checkpoint(tiny_prior).sampler("policy", dtype=F64).requires_grad_(False)


@pytest.mark.parametrize("snis", ["tempered", "exact"])
def test_reinforce_kl_weights_are_the_snis_softmax_of_the_loop_batch(tmp_path, tiny_prior, tiny_preset, frozen_prior, monkeypatch, snis):
    """w = softmax((lpf - lb) / T) (tempered) or softmax(lpf - lb) (exact), with lpf and lb recomputed
    from the recorded trajectories; and the loss is -sum w A lpf with R = log r - alpha (lpf - lpp)."""
    preset = tiny_preset.updated("", beta=0.5).updated("finetune", steps=3, batch_size=32, exploration=0.5, snis=snis, lr=1e-2)
    rec = Recorder(monkeypatch)
    rec.wrap("reinforce_kl_loss", "lpf", "lpp", "log_r", "alpha", "weights")
    rec.train(tiny_prior, preset, "reinforce-kl", tmp_path)
    calls = rec.calls["reinforce_kl_loss"]
    assert len(calls) == len(rec.rollouts) == 3
    temper = preset.sampler.steps if snis == "tempered" else 1.0
    explored = 0
    for r, c in zip(rec.rollouts, calls):
        lpf, lb, lpp, log_r = recompute(preset, frozen_prior, r)
        w = torch.softmax((lpf - lb) / temper, dim=0)
        torch.testing.assert_close(c["weights"], w, rtol=1e-9, atol=1e-12)
        if r["extra_var"] > 0:
            explored += 1
            # what the weights are not: uniform, or tempered the other way
            other = torch.softmax((lpf - lb) / (1.0 if snis == "tempered" else preset.sampler.steps), dim=0)
            assert (w * w.numel() - 1).abs().max() > 0.1 and (w / other - 1).abs().max() > 0.1
        assert c["alpha"] == pytest.approx(1 / preset.beta, rel=1e-15)
        ret = log_r - 2.0 * (lpf - lpp)
        expected = -(w * (ret - ret.mean()) * lpf).sum()
        torch.testing.assert_close(c["value"], expected, rtol=1e-9, atol=1e-9)
    assert explored == 2  # the schedule of a 3-step run: s0, decayed, none


def test_reinforce_kl_weights_are_uniform_on_policy(tmp_path, tiny_prior, tiny_preset, monkeypatch):
    preset = tiny_preset.updated("finetune", steps=3, batch_size=32, exploration=0.5, snis="exact")
    rec = Recorder(monkeypatch)
    rec.wrap("reinforce_kl_loss", "lpf", "lpp", "log_r", "alpha", "weights")
    rec.train(tiny_prior, preset, "reinforce-kl", tmp_path, on_policy=True)
    for c in rec.calls["reinforce_kl_loss"]:
        torch.testing.assert_close(c["weights"], torch.full((32,), 1 / 32, dtype=F64), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- beta and lambda reach the losses
@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("algo", ["rtb", "trust-pcl"])
def test_beta_reaches_the_residual(tmp_path, tiny_prior, tiny_preset, frozen_prior, monkeypatch, algo, beta):
    """The loss the loop computed is 1/2 mean(delta^2) with delta = log Z + lpf - lpp - beta log r
    (rtb), or delta' = -V + log r + alpha (lpp - lpf) (trust-pcl), from the recorded batch."""
    preset = tiny_preset.updated("", beta=beta).updated("finetune", steps=3, batch_size=32, lr=1e-2)
    rec = Recorder(monkeypatch)
    if algo == "rtb":
        rec.wrap("rtb_loss", "log_z", "lpf", "lpp", "log_r", "beta")
    else:
        rec.wrap("trust_pcl_loss", "v_s0", "step_lpf", "step_lpp", "rewards", "alpha")
    rec.train(tiny_prior, preset, algo, tmp_path)
    calls = rec.calls["rtb_loss" if algo == "rtb" else "trust_pcl_loss"]
    assert len(calls) == 3
    moved = 0.0
    for step, (r, c) in enumerate(zip(rec.rollouts, calls)):
        lpf, _, lpp, log_r = recompute(preset, frozen_prior, r)
        moved = max(moved, float((lpf - lpp).abs().max()))
        if algo == "rtb":
            assert c["beta"] == beta
            delta = c["log_z"] + lpf - lpp - beta * log_r
            wrong = c["log_z"] + lpf - lpp - log_r  # beta ignored
        else:
            assert c["alpha"] == pytest.approx(1 / beta, rel=1e-15)
            delta = -c["v_s0"] + log_r + (lpp - lpf) / beta
            wrong = -c["v_s0"] + log_r + (lpp - lpf)
        expected = 0.5 * delta.pow(2).mean()
        torch.testing.assert_close(c["value"], expected, rtol=1e-9, atol=1e-9)
        if algo == "rtb" or step > 0:  # the check can tell (trust-pcl: once the policy differs from the prior)
            assert abs(float(0.5 * wrong.pow(2).mean() - expected)) > 1e-6 * float(expected)  # 1000x the tolerance
    assert moved > 1e-3  # later steps score a policy that differs from the prior
    scalars = [float(c["log_z" if algo == "rtb" else "v_s0"]) for c in calls]
    assert scalars[0] == 0.0 and scalars[-1] != 0.0  # and a learned log Z or V that moved


def test_legacy_lambda_reaches_the_legacy_loss(tmp_path, tiny_prior, tiny_preset, frozen_prior, monkeypatch):
    lam = 0.3
    preset = tiny_preset.updated("finetune", steps=3, batch_size=32, lr=3e-2, legacy_lambda=lam)
    rec = Recorder(monkeypatch)
    rec.wrap("legacy_rl_loss", "lpf", "lpp", "log_r", "lam")
    rec.train(tiny_prior, preset, "legacy-rl", tmp_path)
    calls = rec.calls["legacy_rl_loss"]
    assert len(calls) == 3
    for r, c in zip(rec.rollouts, calls):
        assert c["lam"] == lam and r["extra_var"] == 0.0
        lpf, _, lpp, log_r = recompute(preset, frozen_prior, r)
        reward = log_r.exp()
        adv = reward - reward.mean()
        expected = (-adv * lpf + lam * (lpf - lpp).pow(2)).mean()
        torch.testing.assert_close(c["value"], expected, rtol=1e-9, atol=1e-9)
    penalty = float((lpf - lpp).pow(2).mean())
    assert penalty > 1e-6  # the last step's policy has moved: lambda matters in the value checked


# ----------------------------------------------------------------------------- training learns
LEARN = {
    "name": "learn-1d",
    "beta": 1.0,
    "prior_data": {"means": [[-5.0], [0.0], [5.0]], "variance": 1.0},
    "reward": {"type": "mixture_ratio", "mixture": {"means": [[-5.0], [5.0]], "variance": 1.0, "weights": [1, 3]}},
    "sampler": {"steps": 10, "hidden": 16, "time_features": 8, "layers": 2},
    "pretrain": {"steps": 300, "batch_size": 32, "lr": 1e-2},
    "finetune": {"steps": 100, "batch_size": 32, "lr": 1e-2},
}


@pytest.fixture(scope="module")
def learn_task(tmp_path_factory, one_thread):
    """A 3-mode 1-D prior (pretrained for 300 tiny steps) and a reward keeping 2 modes, weights 1:3."""
    preset = Preset.model_validate(LEARN)
    out = tmp_path_factory.mktemp("learn") / "prior.safetensors"
    pretrain(preset, "learn-1d", out, seed=0, progress=False)
    prior = load_checkpoint(out)
    prior_kl = evaluate(prior, n=2000, seed=0, beta=1.0).metrics["kl_mode"]
    return preset, prior, prior_kl


@pytest.mark.parametrize("algo", ["rtb", "trust-pcl", "reinforce-kl"])
def test_training_learns_the_mode_weights(tmp_path, learn_task, algo):
    preset, prior, prior_kl = learn_task
    assert prior_kl > 0.4  # the prior's 1:1:1 against the target's 1:0:3
    out = tmp_path / f"{algo}.safetensors"
    finetune(prior, preset, "learn-1d", algo, out, seed=0, progress=False)
    m = evaluate(load_checkpoint(out), n=2000, seed=0).metrics
    assert m["n_target_modes"] == 2 and m["mode_coverage"] == 2
    assert m["kl_mode"] < 0.25 * prior_kl and m["kl_mode"] < 0.15, (m["kl_mode"], prior_kl)


# ----------------------------------------------------------------------------- the learning-rate schedule
def steps_of(prior_path, preset, algo, tmp_path):
    """A fresh fine-tuning run (`setup`) in float64, to step with `train_step`."""
    return finetune_module.setup(load_checkpoint(prior_path), preset, "tiny", algo, tmp_path / "x.safetensors", dtype=F64)


@pytest.mark.parametrize("algo", ["rtb", "trust-pcl"])
def test_every_adam_step_uses_the_scheduled_learning_rates(tmp_path, tiny_prior, tiny_preset, monkeypatch, algo):
    """wsd over 10 steps, decaying over the last half to lr_final: the policy's lr and log Z's (trust-pcl:
    V's, alpha lr_logz) both follow lr(step) / lr, step by step (as Adam reads them when it steps), and
    the log records the policy's."""
    n, lr, lr_logz, final = 10, 4e-3, 0.2, 1e-3
    preset = tiny_preset.updated("", beta=0.5).updated(
        "finetune", steps=n, batch_size=16, lr=lr, lr_logz=lr_logz, lr_schedule="wsd", decay_fraction=0.5, lr_final=final
    )
    seen: list[list[float]] = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run = steps_of(tiny_prior, preset, algo, tmp_path)
    stats = [finetune_module.train_step(run, Dist()) for _ in range(n)]
    by_hand = [lr if it < 5 else lr + (final - lr) * (it - 5) / 5 for it in range(n)]  # written out, not trainer.learning_rate
    v_scale = 2.0 if algo == "trust-pcl" else 1.0  # alpha = 1 / beta
    assert [s[0] for s in seen] == pytest.approx(by_hand, rel=1e-12)
    assert [s[1] for s in seen] == pytest.approx([v_scale * lr_logz * f / lr for f in by_hand], rel=1e-12)
    assert [st.lr for st in stats] == [s[0] for s in seen]  # what a step reports is what Adam used
    monkeypatch.undo()
    finetune(
        load_checkpoint(tiny_prior),
        preset,
        "tiny",
        algo,
        tmp_path / "log.safetensors",
        progress=False,
        log_path=tmp_path / "log.jsonl",
        dtype=F64,
    )
    logged = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert logged and logged[-1] == pytest.approx(by_hand[-1], rel=1e-12)


@pytest.mark.parametrize("algo", ["rtb", "trust-pcl"])
def test_every_adam_step_gets_the_clipped_policy_gradient(tmp_path, tiny_prior, tiny_preset, algo):
    """With grad_clip c the policy gradient Adam steps with (left in .grad by the step) has norm min(norm, c)
    in RTB's units (trust-pcl's gradient, alpha^2 RTB's, is clipped at alpha^2 c); the step reports the
    norm before clipping, in RTB's units."""
    clip, alpha = 0.05, 2.0
    preset = tiny_preset.updated("", beta=1 / alpha).updated("finetune", steps=4, batch_size=16, grad_clip=clip)
    unit = alpha * alpha if algo == "trust-pcl" else 1.0
    run, norms = steps_of(tiny_prior, preset, algo, tmp_path), []
    for _ in range(4):
        st = finetune_module.train_step(run, Dist())
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in run.policy.parameters()])))
        assert float(st.grad_norm) > 2 * clip  # the clip binds: this norm was cut to it
        assert norm / unit == pytest.approx(clip, rel=1e-5)
        norms.append(float(st.grad_norm))
    finetune(
        load_checkpoint(tiny_prior),
        preset,
        "tiny",
        algo,
        tmp_path / "log.safetensors",
        progress=False,
        log_path=tmp_path / "log.jsonl",
        log_every=1,
        dtype=F64,
    )
    logged = [r["grad_norm"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())]
    assert logged == pytest.approx(norms, rel=1e-9)  # the log records the norm before clipping, in RTB's units
