"""The off-policy tools inside the training loop (`rtbcli.finetune.setup` / `train_step`), each
caught when switched off or broken: replayed steps train on backward trajectories of buffer states,
local search moves the replayed states toward pi, the Langevin policy samples with its own drift and
learns NN2, the paper's exploration schedule reaches the steps; the buffer resumes exactly; bad
options are one-line errors through the command line; a run without the tools calls none of them.

Energy mode (`run.log_density`) is set by hand here on a fine-tuning run (test `energy_run`).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from rtbcli import finetune as finetune_module
from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run as cli
from rtbcli.distributed import Dist
from rtbcli.energy import LangevinSampler
from rtbcli.energy.buffer import backward_trajectories
from rtbcli.errors import Interrupted
from rtbcli.finetune import attach_offpolicy, finetune, setup, train_step
from rtbcli.offpolicy import OffPolicy, load_langevin_policy
from rtbcli.sampler import DiffusionSampler, bridge_sample, time_grid
from rtbcli.tasks import Task
from test_host_syncs import host_reads

F64 = torch.float64
B = 32  # the tiny preset's batch
MU = torch.tensor([5.0, 0.0], dtype=F64)

pytestmark = pytest.mark.usefixtures("one_thread")


def log_pi(x: torch.Tensor) -> torch.Tensor:
    """The emulated energy mode's target: N(MU, 0.3 I), unnormalised."""
    return -(x - MU.to(x)).pow(2).sum(-1) / 0.6


def new_run(prior, preset, tmp_path, algo="rtb"):
    return setup(load_checkpoint(prior), preset, "tiny", algo, tmp_path / "x.safetensors", dtype=F64)


def energy_run(prior, preset, tmp_path):
    """A run with `run.log_density` set, as energy mode's setup sets it, and its tools attached again."""
    plain = preset.updated("finetune", local_search=False)
    run = new_run(prior, plain, tmp_path)
    run.log_density = log_pi
    run.info.preset = preset
    attach_offpolicy(run, Dist())
    return run


def step(run) -> dict:
    """One train_step, with what it used: the policy before it, the replay generator's state before it."""
    before = {k: v.detach().clone() for k, v in run.policy.state_dict().items()}
    gen = None if run.offpolicy is None else run.offpolicy.gen.get_state()
    log_z = None if run.scalar is None else run.scalar.detach().clone()
    st = train_step(run, Dist())
    return {"st": st, "traj": st.traj.detach().clone(), "before": before, "gen": gen, "log_z": log_z}


def ends_among(ends: torch.Tensor, states: torch.Tensor) -> bool:
    return bool((ends[:, None, :] == states[None]).all(-1).any(1).all())


# ----------------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def power_prior(tmp_path_factory, tiny_preset):
    """The tiny prior on the power-2 time grid t_i = 1 - (1 - i / T)^2 (the manywell32 preset's)."""
    from rtbcli.pretrain import pretrain

    out = tmp_path_factory.mktemp("power") / "prior.safetensors"
    preset = tiny_preset.updated("sampler", time_power=2.0)
    pretrain(preset, "tiny", out, seed=0, progress=False)
    return out, preset


def bridge_on_grid(x, preset, g):
    """The pinned bridge on the sampler's own grid, by the specification: uniform, or t_i = 1 - (1 - i / T)^p."""
    s = preset.sampler
    if s.time_power == 1.0:
        return backward_trajectories(x, s.steps, s.sigma2, g)
    return bridge_sample(x, s.steps, s.sigma2, g, time_grid(s.steps, s.time_power, F64))


@pytest.mark.parametrize("grid", ["uniform", "power 2"])
def test_replay_trains_every_other_step_on_backward_trajectories_of_buffer_states(grid, tmp_path, tiny_prior, power_prior, tiny_preset):
    prior, preset = (tiny_prior, tiny_preset) if grid == "uniform" else power_prior
    preset = preset.updated("finetune", replay=True, steps=6)
    run = new_run(prior, preset, tmp_path)
    task, prior = Task(preset), run.prior
    recs = []
    for _ in range(6):
        held, held_lr, _ = run.offpolicy.buffer.states()
        recs.append({**step(run), "held": held.clone(), "held_lr": held_lr.clone()})
    assert [r["st"].replayed for r in recs] == [False, True] * 3
    assert len(run.offpolicy.buffer) == 3 * B  # every forward batch's terminal states, and nothing else
    forward_ends = torch.cat([r["traj"][-1] for r in recs if not r["st"].replayed])
    assert torch.equal(run.offpolicy.buffer.states()[0], forward_ends)
    for r in recs[1::2]:
        traj, st = r["traj"], r["st"]
        assert ends_among(traj[-1], r["held"])  # buffer states ...
        x = by_rank(r["held"], r["held_lr"], g := torch.Generator().set_state(r["gen"]))  # ... drawn by rank ...
        torch.testing.assert_close(traj, bridge_on_grid(x, preset, g), rtol=0, atol=1e-12)  # ... and the bridge on the run's grid
        assert torch.allclose(st.batch.log_r, task.log_reward(traj[-1]))
        policy = policy_at(preset, r["before"])
        with torch.no_grad():
            lpf, lpp = policy.log_prob(traj), prior.log_prob(traj)
        expected = 0.5 * (r["log_z"] + lpf - lpp - st.batch.log_r).pow(2).mean()
        torch.testing.assert_close(st.loss, expected, rtol=1e-10, atol=1e-12)
        assert st.exploration == 0.0 and st.batch.lb is None


def by_rank(held: torch.Tensor, log_r: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """B states drawn from `held` (oldest first, never wrapped) by rank of log r, by hand: P(rank i) ~ 1 / (0.01 n + i)."""
    n = len(held)
    cdf = torch.cumsum(1.0 / (0.01 * n + torch.arange(n, dtype=F64)), 0)
    pos = torch.searchsorted(cdf, torch.rand(B, generator=g, dtype=F64) * cdf[-1], right=True).clamp(max=n - 1)
    return held[torch.sort(log_r, descending=True, stable=True).indices[pos]]


def policy_at(preset, state: dict) -> DiffusionSampler:
    s = DiffusionSampler.from_spec(preset.dim, preset.sampler).to(F64)
    s.load_state_dict(state)
    return s.requires_grad_(False)


@pytest.mark.parametrize("algo", ["trust-pcl", "vargrad"])
def test_replay_serves_every_trajectory_balance_objective(algo, tmp_path, tiny_prior, tiny_preset):
    run = new_run(tiny_prior, tiny_preset.updated("finetune", replay=True), tmp_path, algo)
    recs = [step(run) for _ in range(2)]
    assert recs[1]["st"].replayed and torch.isfinite(recs[1]["st"].loss)
    assert any(not torch.equal(v, run.policy.state_dict()[k]) for k, v in recs[1]["before"].items())


# ----------------------------------------------------------------------------- the prior's batches
def test_prior_batches_train_on_the_frozen_prior_s_trajectories(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated("finetune", prior_every=3)
    run = new_run(tiny_prior, preset, tmp_path, "vargrad")
    task, prior = Task(preset), run.prior
    recs = []
    for _ in range(6):
        gen = run.gen.get_state()
        recs.append({**step(run), "run_gen": gen})
    assert [r["st"].from_prior for r in recs] == [False, False, True] * 2
    for r in recs[2::3]:
        traj, st = r["traj"], r["st"]
        assert torch.equal(traj, prior.sample(B, 0.0, torch.Generator().set_state(r["run_gen"])))  # the prior's own draws
        torch.testing.assert_close(st.batch.log_r, task.log_reward(traj[-1]))
        policy = policy_at(preset, r["before"])
        with torch.no_grad():
            d = policy.log_prob(traj) - prior.log_prob(traj) - st.batch.log_r
        torch.testing.assert_close(st.loss, 0.5 * d.var(unbiased=False), rtol=1e-10, atol=1e-12)  # VarGrad on them
        assert st.exploration == 0.0 and st.batch.lb is None
        assert any(not torch.equal(v, run.policy.state_dict()[k]) for k, v in r["before"].items())
    for r in recs[:2]:  # the other steps are the policy's own
        with torch.no_grad():
            means = policy_at(preset, r["before"]).means(r["traj"])
        assert not torch.allclose(r["traj"], prior.sample(B, 0.0, torch.Generator().set_state(r["run_gen"])))
        assert means.shape == r["traj"][1:].shape


def test_resampled_prior_batches_keep_b_of_m_b_prior_trajectories_by_their_weights(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated("finetune", prior_every=2, prior_resample=4)
    run = new_run(tiny_prior, preset, tmp_path, "vargrad")
    task, prior = Task(preset), run.prior
    step(run)
    g = torch.Generator().set_state(run.gen.get_state())
    r = step(run)
    big = prior.sample(4 * B, 0.0, g)
    log_r = task.log_reward(big[-1])
    keep = torch.multinomial(torch.softmax(preset.beta * log_r, 0), B, replacement=True, generator=g)
    assert r["st"].from_prior and torch.equal(r["traj"], big[:, keep])
    torch.testing.assert_close(r["st"].batch.log_r, log_r[keep])
    assert log_r[keep].mean() > log_r.mean()  # toward the reward


def test_prior_batches_are_logged_and_set_from_the_command_line(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated("finetune", prior_every=2, steps=4)
    out = tmp_path / "f.safetensors"
    log = out.with_suffix(".jsonl")
    finetune(
        load_checkpoint(tiny_prior), preset, "tiny", "vargrad", out, dtype=F64, progress=False, save_every=0, log_every=1, log_path=log
    )
    recs = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["prior_batch"] for r in recs if "loss" in r] == [False, True, False, True]
    out = tmp_path / "x.safetensors"
    assert (
        cli(["finetune", "--prior", str(tiny_prior), "--algo", "trust-pcl", "--prior-every", "2", "--steps", "2", "--out", str(out), "-q"])
        == 0
    )
    assert load_checkpoint(out).preset.finetune.prior_every == 2
    assert [json.loads(line).get("prior_batch") for line in out.with_suffix(".jsonl").read_text().splitlines()][-1] is True


def test_a_run_without_the_tools_calls_none_of_them(tmp_path, tiny_prior, tiny_preset, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an off-policy tool ran in a run that does not use it")

    for name in ("replays", "add", "replay", "local_search"):
        monkeypatch.setattr(OffPolicy, name, boom)
    monkeypatch.setattr(finetune_module, "replay_step", boom)
    monkeypatch.setattr(finetune_module, "prior_step", boom)
    monkeypatch.setattr(LangevinSampler, "sample", boom)
    run = new_run(tiny_prior, tiny_preset, tmp_path)
    assert run.offpolicy is None and type(run.policy) is DiffusionSampler
    for _ in range(3):
        assert not step(run)["st"].replayed


def test_replay_steps_read_nothing_back(tmp_path, tiny_prior, tiny_preset):
    ls = tiny_preset.updated("finetune", replay=True, local_search=True, ls_every=2, ls_steps=6, ls_burn_in=3, buffer_size=500)
    for run in (new_run(tiny_prior, tiny_preset.updated("finetune", replay=True), tmp_path), energy_run(tiny_prior, ls, tmp_path)):
        with host_reads() as reads:
            for _ in range(6):
                train_step(run, Dist())
        assert sum(reads.values()) == 0, reads


def test_local_search_s_logged_statistics_resume(tmp_path, tiny_prior, tiny_preset):
    """The last search's step size and acceptance are in the run's state: a resumed run logs them as the run left
    alone does until its next search (they were 0)."""
    preset = tiny_preset.updated("finetune", replay=True, local_search=True, ls_every=100, ls_steps=6, ls_burn_in=3, buffer_size=500)
    run = energy_run(tiny_prior, preset, tmp_path)
    for _ in range(4):
        step(run)
    saved = run.offpolicy.state_dict()
    fresh = energy_run(tiny_prior, preset, tmp_path)
    fresh.offpolicy.load_state_dict(saved)
    left, resumed = run.offpolicy.log_record(False), fresh.offpolicy.log_record(False)
    assert left["ls_acceptance"] > 0 and left == resumed, (left, resumed)


# ----------------------------------------------------------------------------- local search
def test_local_search_moves_the_replayed_states_toward_pi(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated(
        "finetune", replay=True, local_search=True, ls_every=4, ls_steps=30, ls_burn_in=15, buffer_size=10_000, steps=8
    )
    run = energy_run(tiny_prior, preset, tmp_path)
    sizes, recs = [], []
    for _ in range(6):
        recs.append(step(run))
        sizes.append(len(run.offpolicy.ls_buffer))
    assert sizes == [0, 15 * B, 15 * B, 15 * B, 15 * B, 30 * B]  # searches at steps 1 and 5 (step % 4 < 2, replay steps)
    found, _, found_lp = run.offpolicy.ls_buffer.states()
    forward = run.offpolicy.buffer.states()[0]
    assert float(found_lp.mean()) > float(log_pi(forward).mean()) + 5  # much closer to pi than the forward states
    assert torch.allclose(found.mean(0), MU, atol=0.3)
    for r in recs[1::2]:
        assert r["st"].replayed and ends_among(r["traj"][-1], found)  # replayed states come from the search
    assert torch.allclose(found_lp, log_pi(found))
    assert torch.allclose(run.offpolicy.ls_buffer.states()[1], Task(preset).log_reward(found))


def test_local_search_needs_a_differentiable_target(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated("finetune", replay=True, local_search=True)
    run = new_run(tiny_prior, tiny_preset.updated("finetune", replay=True), tmp_path)
    run.log_density, run.info.preset = (lambda x: torch.as_tensor(x.detach().numpy().sum(-1))), preset
    with pytest.raises(Exception, match="--no-local-search"):
        attach_offpolicy(run, Dist())


# ----------------------------------------------------------------------------- Langevin parametrisation
def test_the_langevin_policy_samples_with_its_drift_and_learns_nn2(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated("finetune", langevin=True, steps=3)
    run = new_run(tiny_prior, preset, tmp_path)
    assert isinstance(run.policy, LangevinSampler)
    nn1 = {k: v for k, v in run.policy.state_dict().items() if not k.startswith("net.scale.")}
    assert all(torch.equal(v, run.prior.state_dict()[k]) for k, v in nn1.items())  # NN1 starts as the prior
    gen = run.gen.get_state()
    lp = LangevinSampler(
        preset.dim,
        run.policy.net.log_density,
        preset.sampler.steps,
        preset.sampler.sigma2,
        preset.sampler.hidden,
        preset.sampler.time_features,
        preset.sampler.layers,
    ).to(F64)
    lp.load_state_dict(run.policy.state_dict())
    r = step(run)
    s_e2 = r["st"].exploration ** 2
    assert torch.equal(r["traj"], lp.sample(B, s_e2, torch.Generator().set_state(gen)))  # the policy's own loop
    plain = run.prior.sample(B, s_e2, torch.Generator().set_state(gen))  # NN1 alone, the same noise
    assert not torch.allclose(r["traj"], plain, atol=1e-6)  # the Langevin term is in the drift
    scale = [k for k in r["before"] if k.startswith("net.scale.")]
    assert any(not torch.equal(r["before"][k], run.policy.state_dict()[k]) for k in scale)  # NN2 learns


def test_a_langevin_target_without_gradient_is_refused(tmp_path, tiny_prior, tiny_preset, capsys):
    reward = tmp_path / "nograd.py"
    reward.write_text("import torch\n\ndef fn(x):\n    return torch.as_tensor(-(x.detach().numpy() ** 2).sum(-1))\n")
    out = tmp_path / "lp.safetensors"
    code = cli(["finetune", "--prior", str(tiny_prior), "--reward", f"{reward}:fn", "--langevin", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--no-langevin" in err[0], err
    assert not out.exists() and not out.with_suffix(".jsonl").exists()


# ----------------------------------------------------------------------------- the paper's exploration schedule
def test_the_paper_s_exploration_schedule_reaches_the_steps(tmp_path, tiny_prior, tiny_preset):
    run = new_run(tiny_prior, tiny_preset.updated("finetune", exploration=0.2, exploration_end_step=4, steps=8), tmp_path)
    got = [step(run)["st"].exploration for _ in range(8)]
    assert got == pytest.approx([0.2, 0.15, 0.1, 0.05, 0, 0, 0, 0])
    run = new_run(tiny_prior, tiny_preset.updated("finetune", exploration=0.2, exploration_end_step=4, steps=8, replay=True), tmp_path)
    got = [step(run)["st"].exploration for _ in range(8)]
    assert got == pytest.approx([0.2, 0, 0.1, 0, 0, 0, 0, 0])  # forward steps explore, replayed ones have no behaviour


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("tools", [{"replay": True}, {"replay": True, "langevin": True}, {"prior_every": 2}])
def test_a_run_with_the_tools_stopped_and_resumed_is_the_same_run(tools, tmp_path, tiny_prior, tiny_preset, monkeypatch):
    preset = tiny_preset.updated("finetune", steps=6, **tools)
    prior = load_checkpoint(tiny_prior)

    def go(out, **kw):
        return finetune(prior, preset, "tiny", "rtb", out, dtype=F64, progress=False, save_every=0, **kw)

    go(tmp_path / "alone.safetensors")
    real = finetune_module.train_step

    def signalling(run, dist):
        st = real(run, dist)
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return st

    monkeypatch.setattr(finetune_module, "train_step", signalling)
    with pytest.raises(Interrupted):
        go(tmp_path / "x.safetensors")
    monkeypatch.setattr(finetune_module, "train_step", real)
    part = tmp_path / "x.partial.safetensors"
    saved = load_file(str(tmp_path / "x.partial.state.safetensors"))
    if tools.get("replay"):
        assert saved["offpolicy.buffer.meta"].tolist() == [preset.finetune.buffer_size, 2 * B, 2 * B]  # steps 0 and 2 added
    finetune(load_checkpoint(part), preset, "tiny", "rtb", tmp_path / "x.safetensors", dtype=F64, progress=False, save_every=0, resume=True)
    for name in ("x.safetensors", "x.state.safetensors"):
        a, b = load_file(str(tmp_path / name)), load_file(str(tmp_path / name.replace("x.", "alone.")))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    if tools.get("langevin"):
        ck = load_file(str(tmp_path / "x.safetensors"))
        assert any(k.startswith("policy.net.scale.") for k in ck)  # the checkpoint stores NN2 ...
        task = Task(preset)
        lp = load_langevin_policy(load_checkpoint(tmp_path / "x.safetensors"), task.log_reward, dtype=F64)  # ... loaded with the target
        assert all(torch.equal(v.float(), ck[f"policy.{k}"]) for k, v in lp.state_dict().items())
        assert torch.isfinite(lp.sample(8)).all()


# ----------------------------------------------------------------------------- bad options through the command line
def test_bad_off_policy_options_are_one_line_errors_that_write_nothing(tmp_path, tiny_prior, capsys):
    out = tmp_path / "x.safetensors"
    base = ["finetune", "--prior", str(tiny_prior), "--out", str(out), "--quiet"]
    cases = [
        (["--algo", "reinforce-kl", "--replay"], "no behaviour log-probability"),
        (["--algo", "legacy-rl", "--replay"], "--no-replay"),
        (["--replay", "--local-search"], "energy mode"),
        (["--local-search"], "--no-local-search"),
        (["--replay", "--buffer-size", "0"], "--buffer-size should be greater than 0"),
        (["--replay", "--buffer-size", "-3"], "--buffer-size should be greater than 0"),
        (["--ls-step-size", "0"], "--ls-step-size should be greater than 0"),
        (["--ls-step-size", "-0.1"], "--ls-step-size should be greater than 0"),
        (["--ls-every", "0"], "--ls-every should be greater than 0"),
        (["--exploration-end-step", "0"], "--exploration-end-step should be greater than 0"),
        (["--algo", "reinforce-kl", "--prior-every", "2"], "--prior-every 0"),
        (["--replay", "--prior-every", "2"], "use one"),
        (["--prior-every", "-1"], "--prior-every should be greater than or equal to 0"),
        (["--prior-every", "2", "--prior-resample", "0"], "--prior-resample should be greater than 0"),
        (["--prior-resample", "4"], "give --prior-every K too"),
    ]
    for extra, match in cases:
        code = cli(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("rtbcli: error: ") and match in err[0], (extra, err)
        assert sorted(os.listdir(tmp_path)) == [], (extra, os.listdir(tmp_path))
