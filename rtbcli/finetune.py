"""Fine-tuning a prior toward p_prior(x) r(x)^beta with rtb, trust-pcl, reinforce-kl or legacy-rl.

One step (docs/maths.md#fine-tuning), the same for every objective:

1. draw B trajectories without gradient from the behaviour policy: the learned policy's mean
   with per-step variance sigma2 * dt + s_e^2 (s_e = 0 on-policy), keeping the policy
   network's activations (`rtbcli.rollout`);
2. the learned policy's log-probabilities (un-inflated variance) and the behaviour's come from
   the residuals of that rollout; the frozen prior scores the trajectories in one batched pass;
3. autograd differentiates the objective (`rtbcli.objectives.OBJECTIVES`) with respect to the
   per-step log-probabilities and log Z / V(s0); one batched backward pass over all T*B
   transitions (`rollout.backward`) turns that into the policy's gradient; one Adam step.

With several processes (`rtbcli.distributed`), each rank draws its share of the global batch,
the per-trajectory scalars are gathered so that step 3 sees the global batch, and the policy's
partial gradients are summed over ranks: the same run as one process.

Exploration schedule for a run planned for N steps (the authors' schedule at N = 5,000):
s_e(it) = s_0 for it < hold*N, else s_0 * max(0, 1 - it / (end*N)), with hold = 0.1, end = 0.9,
and s_e = 0 at the last step of every run, however short. N is the run's original planned
length, kept in its state: a resumed run continues the schedule exactly, and a run extended past
N (`--resume X --steps M`, M > N) continues at its final values, no exploration and the lr at
lr_final (`rtbcli.trainer`). A warm start (`--warm-start`) is a new run with schedules of its own.

The reward is called under torch's global generator seeded from (run seed, step, process rank)
at every step (`reward_rng`), and restored afterwards: a reward that draws from it (torch.rand,
dropout, ...) gives the same numbers in a run stopped and resumed as in the run left alone, and
leaves the caller's generator as it was.

The log's `weights_ess` (reinforce-kl off-policy) is a count: the effective sample size of the
importance weights, 1 / sum_i w_i^2, between 1 and the batch size B; `ESS_WARN` is a count too.
(`rtbcli evaluate`'s ESS is a fraction of its samples.)

Learning rates: the policy's is `lr`; log Z's (rtb) is `lr_logz`; trust-pcl's V(s0) gets
alpha * lr_logz, and Adam's eps is scaled with trust-pcl's gradients (alpha^2 for the policy,
alpha for V). Adam otherwise ignores the loss scale alpha^2, so trust-pcl then takes the same
steps as rtb from the same seed and trains the same sampler (the tests check this end to end).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import statistics
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, sampler_tensors, save_checkpoint
from .checkpointer import RunInfo, save_run, schedule_steps
from .config import Preset, PythonRewardSpec
from .distributed import Dist
from .energy.langevin import LangevinDriftNet
from .energy.loading import check_target_output
from .energy.metrics import require_pot, table_metrics
from .energy.options import BROWNIAN  # `--prior brownian`: energy mode's drift-free prior, recorded as its prior_path
from .energy.prior import BrownianPrior
from .errors import InputError, RtbcliWarning, RunError
from .metrics import sample_metrics
from .networks import recorded
from .objectives import OBJECTIVES, Batch, HyperParams, Objective, snis_weights
from .offpolicy import OffPolicy, check_gradient, check_options, langevin_policy, uses_offpolicy
from .rewards import PythonReward, check_reward_output
from .rollout import Rollout, Workspace, policy_grad, rollout, step_log_probs
from .runtime import JsonlLog, make_generator
from .sampler import DiffusionSampler, matmul_context
from .state import RunState, restore_optimizer
from .tasks import Task
from .trainer import Recipe, Schedule, run_loop  # exploration_std: re-exported
from .trainer_checks import check_compatible, check_finetune_resumable  # check_compatible: re-exported
from .training import RunPaths, earlier_log, new_run_id

ADAM_EPS = 1e-8  # torch's default; scaled for trust-pcl (see `setup`)
PROBE_N = 256  # prior samples the reward is checked on before a run
ESS_WARN = 5.0  # --snis exact warns once when its weights' effective sample size (a count of trajectories) falls below this


@dataclass
class FinetuneResult:
    out: Path
    log: Path | None
    algo: str
    steps: int  # the run's planned (and reached) length
    first_step: int  # where this session started (0, or the step a resumed run continued from)
    seconds: float
    steps_per_s: float
    loss: float
    log_z: float | None  # learned log Z (rtb) or V(s0) / alpha (trust-pcl)
    mean_log_r: float
    step_seconds: list[float]  # wall time of every step of this session (host clock, with its logging), for benchmarks;
    # on CUDA a step's kernels may still run after it unless it logged (a host sync): log every step to time CUDA steps
    trainable_parameters: int | None = None  # the policy's trained parameters (LoRA: the adapters')
    peak_memory_mb: float | None = None  # CUDA: the device's peak allocated memory; CPU: the process's peak resident size

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_seconds)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the device's peak allocated memory; CPU: the process's peak resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def objective(algo: str) -> Objective:
    if algo not in OBJECTIVES:
        raise InputError(f"unknown objective '{algo}': choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[algo]


def finetuned_tensors(policy: DiffusionSampler, prior: DiffusionSampler | BrownianPrior, algo: str, scalar: torch.Tensor | None) -> dict:
    """A finetuned checkpoint's tensors: policy.*, prior.* (none for the Brownian prior), and the objective's learned scalar."""
    tensors = {**sampler_tensors(policy, "policy"), **sampler_tensors(prior, "prior")}
    name = OBJECTIVES[algo].scalar
    if name is not None:
        if scalar is None:
            raise ValueError(f"{algo} learns {name}, but no value was given to save")
        tensors[name] = scalar.detach().to("cpu", torch.float32).reshape(())
    return tensors


def brownian_start(preset: Preset, seed: int, device, dtype, langevin: bool = False) -> tuple[BrownianPrior, DiffusionSampler]:
    """Energy mode's start: the Brownian prior of the preset's sampler settings, and a policy with
    zero drift (its output layer is zero-initialised: the same law), its other weights drawn from `seed`
    (`langevin`: a fresh Langevin policy, `rtbcli.offpolicy.langevin_policy`, whose drift starts at 0.01 grad log pi)."""
    s = preset.sampler
    prior = BrownianPrior(preset.dim, s.steps, s.sigma2, s.time_power).to(device=device, dtype=dtype)
    if langevin:
        return prior, langevin_policy(s, preset.dim, seed).to(device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # torch's global generator is left as it was
        torch.manual_seed(seed)
        policy = prior.fresh_policy(s.hidden, s.time_features, s.layers)
    return prior, policy


def starting_point(
    start: Checkpoint | None, algo: str, beta: float, device, dtype, *, langevin: bool = False, seed: int = 0, preset: Preset | None = None
):
    """(prior, policy, initial scalar, prior sha256, prior path, step offset) from a checkpoint.

    A prior checkpoint starts a run: the policy is a copy of the prior, log Z = V(s0) = 0. A
    finetuned checkpoint warm-starts one: its policy, its frozen prior, and its log Z (or
    V(s0)/alpha) converted to what `algo` learns at this beta (log Z, or V(s0) = log Z / beta).
    `langevin`: the policy has the Langevin parametrisation (`start_policy`). No checkpoint (energy
    mode, `--prior brownian`): the preset's Brownian prior and a zero-drift policy (`brownian_start`), log Z = 0.
    """
    ids = starting_point_ids(start)
    if start is None:
        assert preset is not None
        return *brownian_start(preset, seed, device, dtype, langevin), 0.0, *ids
    if start.kind == "prior":  # the prior is the checkpoint's policy (a diffusers model folder's: its frozen base, "prior")
        prior = start.sampler("prior" if start.preset.sampler.model is not None else "policy", device, dtype)
        return prior, start_policy(start, langevin, seed, device, dtype), 0.0, *ids
    prior, policy = start.sampler("prior", device, dtype), start_policy(start, langevin, seed, device, dtype)
    log_z, obj = start.learned_log_z(), OBJECTIVES[algo]
    init = 0.0 if log_z is None or obj.scalar is None else obj.scalar_from_log_z(log_z, 1.0 / beta)
    return prior, policy, init, *ids


def start_policy(start: Checkpoint, langevin: bool, seed: int, device, dtype) -> DiffusionSampler:
    """The policy a run starts from: the checkpoint's sampler (a prior's, or a finetuned run's policy).
    With the Langevin parametrisation (`rtbcli.offpolicy.langevin_policy`): NN1 from that sampler
    and a fresh NN2, or a Langevin checkpoint's policy whole; the run sets its gradient target."""
    saved_lp = start.kind == "finetuned" and start.preset.finetune.langevin
    if not langevin and not saved_lp:
        return start.sampler("policy", device, dtype)
    if not langevin:
        raise InputError(f"'{start.path}' holds a policy with the Langevin parametrisation: keep it on (--langevin)")
    weights = start.section("policy")
    lp = langevin_policy(start.preset.sampler, start.preset.dim, seed, **({"weights": weights} if saved_lp else {"nn1": weights}))
    return lp.to(device=device, dtype=dtype)


def starting_point_ids(start: Checkpoint | None) -> tuple[str, str, int]:
    """(prior sha256, prior path, step offset) of a run starting from `start` (`starting_point`);
    the Brownian prior (no checkpoint) is recorded as the path "brownian"."""
    if start is None:
        return "", BROWNIAN, 0
    if start.kind == "prior":
        return start.sha256, str(start.path), 0
    return start.meta.get("prior_sha256", ""), start.meta.get("prior_path", ""), start.step


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (distinct inputs give unrelated seeds)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


@contextmanager
def reward_rng(device: torch.device, *seed: int):
    """torch's global generator(s) seeded from `seed` inside, restored to their state outside."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        s = _mix(*seed)
        torch.random.default_generator.manual_seed(s)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(s)
        yield


@dataclass
class FinetuneRun:
    """A fine-tuning run between steps: what `setup` builds and `train_step` advances."""

    policy: DiffusionSampler
    prior: DiffusionSampler | BrownianPrior  # frozen
    scalar: nn.Parameter | None  # log Z (rtb), V(s0) (trust-pcl), or none
    opt: torch.optim.Adam
    sched: torch.optim.lr_scheduler.LambdaLR | None  # set by setup once a resumed run's step is known
    schedule: Schedule
    gen: torch.Generator  # every trajectory's noise
    ws: Workspace
    task: Task
    obj: Objective
    hp: HyperParams
    explore: bool  # off-policy: the behaviour policy's variance is inflated by s_e^2
    clip: float  # the policy gradient's clipping threshold in this objective's units
    grad_scale: float  # this objective's policy gradient over RTB's (trust-pcl: alpha^2)
    info: RunInfo
    step: int  # steps done (of this run; a warm start's checkpoints add info.checkpoint offset)
    offset: int = 0  # a warm-started run's checkpoints count on from the checkpoint it started from
    seconds: float = 0.0  # training time to `step` (a resumed run's earlier sessions)
    log_lines: tuple[str, ...] = ()  # a resumed run's earlier log records
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None  # energy mode: the target's log pi (x (N, d) -> (N,))
    offpolicy: OffPolicy | None = None  # the replay buffer and local search (`rtbcli.offpolicy`); None when they are off

    def learned_log_z(self) -> float | None:
        return None if self.scalar is None else self.obj.log_z(float(self.scalar.detach()), self.hp.alpha)


@dataclass
class StepStats:
    """What a step leaves for logging and for tests: device tensors and Python numbers, no host sync."""

    loss: torch.Tensor
    batch: Batch  # the global batch the objective saw (detached)
    grad_norm: torch.Tensor  # the policy gradient's norm before clipping, in RTB's units
    exploration: float  # s_e of the behaviour policy
    lr: float  # the policy's learning rate of this step
    traj: torch.Tensor  # this process's trajectories (T + 1, n, d): a view of the run's workspace, clone to keep
    log_z: torch.Tensor | None  # the learned scalar before the step
    replayed: bool = False  # the step trained on replayed trajectories (`rtbcli.offpolicy`), not on a forward batch
    from_prior: bool = False  # the step trained on a batch of the frozen prior (`prior_step`)


def network_products(run: FinetuneRun) -> contextlib.AbstractContextManager:
    """Where the step's large matrix products run (the prior's pass, the policy gradient): `matmul_context`."""
    return matmul_context(run.info.preset.finetune.matmul_dtype, run.policy.anchor.device)


def score(run: FinetuneRun, ro: Rollout, s_e: float, dist: Dist) -> tuple[Batch, torch.Tensor]:
    """The global batch of a rollout, and this process's per-step policy log-probabilities (the leaf to differentiate)."""
    with reward_rng(run.ws.traj.device, run.info.seed, run.step, dist.rank):
        log_r = run.task.log_reward(ro.traj[-1])
    with torch.no_grad(), network_products(run):
        step_lpp = run.prior.step_log_probs(ro.traj)
    var = run.policy.step_var
    step_lpf = step_log_probs(ro.residual, var).requires_grad_()
    lb = step_log_probs(ro.residual, var + s_e * s_e).sum(0) if run.explore and run.obj.weighs_behaviour else None
    if not dist.active:
        return Batch(step_lpf, step_lpp, log_r, lb), step_lpf
    # the global batch: every rank's trajectories, gradients only through this rank's
    return Batch(dist.gather(step_lpf), dist.gather(step_lpp), dist.gather(log_r), None if lb is None else dist.gather(lb)), step_lpf


def train_step(run: FinetuneRun, dist: Dist) -> StepStats:
    """One step (module docstring): trajectories from the behaviour policy without gradient, their
    log-probabilities, the objective's gradient (autograd for log Z / V and d loss / d step lpf,
    `policy_grad` for the policy's weights), one Adam step. With replay on, every other step is a
    `replay_step` instead, and forward batches feed the buffer (`rtbcli.offpolicy`)."""
    if run.offpolicy is not None and run.offpolicy.replays(run.step):
        return replay_step(run, dist)
    k = run.info.preset.finetune.prior_every
    if k and run.step % k == k - 1:
        return prior_step(run, dist)
    s_e = run.schedule.exploration(run.step) if run.explore else 0.0
    lr, log_z = run.opt.param_groups[0]["lr"], None if run.scalar is None else run.scalar.detach().clone()
    ro = rollout(run.policy, run.ws, s_e * s_e, run.gen, (dist.rank, dist.world))
    batch, step_lpf = score(run, ro, s_e, dist)
    if run.offpolicy is not None:
        run.offpolicy.add(ro.traj[-1], batch.log_r)
    loss = run.obj.loss(batch, run.scalar, run.hp)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()  # dL/d(log Z or V) and dL/d(step lpf)
    assert step_lpf.grad is not None  # the loss depends on every trajectory's log-probabilities
    with network_products(run):
        policy_grad(ro, step_lpf.grad)  # dL/d(policy weights) through this rank's trajectories
    grad_norm = _update(run, dist)
    detached = Batch(batch.step_lpf.detach(), batch.step_lpp, batch.log_r, batch.lb)
    return StepStats(loss.detach(), detached, grad_norm, s_e, lr, ro.traj, log_z)


def _update(run: FinetuneRun, dist: Dist) -> torch.Tensor:
    """Sum the gradients over processes, clip, one Adam step and one schedule step; the policy
    gradient's norm before clipping in RTB's units (no host sync)."""
    dist.sum_grads(list(run.policy.parameters()))
    grad_norm = nn.utils.clip_grad_norm_(run.policy.parameters(), run.clip) / run.grad_scale
    run.opt.step()
    assert run.sched is not None, "setup builds the schedule"
    run.sched.step()
    run.step += 1
    return grad_norm


def replay_step(run: FinetuneRun, dist: Dist) -> StepStats:
    """A step on replayed trajectories (`rtbcli.offpolicy`; one process): states drawn from the
    buffer by rank (after local search, when due), their trajectories by the backward process, then
    `given_step` with log r from the buffer."""
    assert run.offpolicy is not None
    traj, log_r = run.offpolicy.replay(run.step, run.ws.n, lambda x: _log_reward(run, x, dist))
    return given_step(run, dist, traj, log_r, replayed=True)


def prior_step(run: FinetuneRun, dist: Dist) -> StepStats:
    """A step on a batch of the frozen prior (`[finetune] prior_every`; one process): n trajectories
    of the prior without gradient and log r of their ends, then `given_step`. With `prior_resample`
    M > 1: M n trajectories of the prior, of which n are kept, drawn with replacement in proportion
    to r^beta (importance resampling toward the target p_prior r^beta)."""
    n, m = run.ws.n, run.info.preset.finetune.prior_resample
    traj = run.prior.sample(n * m, 0.0, run.gen)
    log_r = _log_reward(run, traj[-1], dist)
    if m > 1:
        keep = torch.multinomial(torch.softmax(run.hp.beta * log_r, 0), n, replacement=True, generator=run.gen)
        traj, log_r = traj[:, keep], log_r[keep]
    return given_step(run, dist, traj, log_r, from_prior=True)


def given_step(run: FinetuneRun, dist: Dist, traj: torch.Tensor, log_r: torch.Tensor, **kind: bool) -> StepStats:
    """One step on given trajectories (T + 1, n, d) that the policy did not sample: lpf by autograd
    of one batched forward pass of the policy over them, lpp from the frozen prior. No behaviour
    log-probability: the trajectory-balance objectives only (`rtbcli.offpolicy.check_options`)."""
    lr, log_z = run.opt.param_groups[0]["lr"], None if run.scalar is None else run.scalar.detach().clone()
    with network_products(run):
        with torch.no_grad():
            step_lpp = run.prior.step_log_probs(traj)
        step_lpf = run.policy.step_log_probs(traj)
    batch = Batch(step_lpf, step_lpp, log_r, None)
    loss = run.obj.loss(batch, run.scalar, run.hp)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = _update(run, dist)
    return StepStats(loss.detach(), Batch(step_lpf.detach(), step_lpp, log_r, None), grad_norm, 0.0, lr, traj, log_z, **kind)


def _differentiable_log_reward(task: Task) -> Callable[[torch.Tensor], torch.Tensor]:
    """log r with autograd (the Langevin parametrisation's gradient): a Python reward's own function
    (`PythonReward` calls it without gradient), or the task's reward."""
    r = task.reward
    if isinstance(r, PythonReward):
        return functools.partial(r.function, **r.kwargs)
    return task.log_reward


def _log_reward(run: FinetuneRun, x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """log r of states that no rollout of the policy drew (local search's, the prior's batches), under a reward generator of their own."""
    with reward_rng(x.device, run.info.seed, run.step, dist.rank, 1):
        return run.task.log_reward(x)


def _optimizer(policy: DiffusionSampler, scalar: nn.Parameter | None, cfg, scale: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the policy and the scalar. Trust-PCL's loss is alpha^2 times RTB's, so its
    gradients are alpha^2 (policy) and alpha (V) times RTB's. Adam's step m / (sqrt(v) + eps)
    ignores that scale except through eps, so eps is scaled along with it and V's lr is
    alpha lr_logz: trust-pcl then takes exactly RTB's steps."""
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr, "eps": ADAM_EPS * scale[0]}]
    if scalar is not None:
        groups.append({"params": [scalar], "lr": cfg.lr_logz * scale[1], "eps": ADAM_EPS * scale[1]})
    return torch.optim.Adam(groups)


def _check_reward(task: Task, prior: DiffusionSampler | BrownianPrior, seed: int, device: torch.device) -> None:
    """The reward (energy mode: the target first) is finite and of the right shape on prior samples (a one-line InputError if not)."""
    x = prior.sample(PROBE_N, 0.0, make_generator(seed + 7919, device))[-1]
    with reward_rng(device, seed, -1):
        if task.energy is not None:
            check_target_output(task.energy, x)
        check_reward_output(task.reward if task.has_reward else task.log_reward, x)


def _run_info(
    start: Checkpoint | None,
    preset: Preset,
    preset_ref: str,
    algo: str,
    out: Path,
    seed: int,
    device,
    on_policy: bool,
    dist: Dist,
    state: RunState | None,
    task: Task,
) -> tuple[RunInfo, int]:
    """What the run's files record, fresh or as the saved run recorded it; and the step offset."""
    prior_sha, prior_path, offset = starting_point_ids(start)
    warm = {"warm_started_from": str(start.path), "warm_started_sha256": start.sha256} if offset and start is not None else {}
    run_id, length = new_run_id(), preset.finetune.steps
    if state is not None:
        run_id, length = state.meta["run_id"], schedule_steps(state)
        offset, warm = state.step_offset, json.loads(state.meta.get("warm_start", "{}"))
    beta = preset.beta
    top = {"algo": algo, "beta": repr(beta), "alpha": repr(1.0 / beta), "prior_sha256": prior_sha, "prior_path": prior_path}
    if preset.reward is not None:
        top["reward"] = preset.reward.function if isinstance(preset.reward, PythonRewardSpec) else preset.reward.type
        if isinstance(task.reward, PythonReward) and task.reward.sha256:
            top["reward_sha256"] = task.reward.sha256
    if preset.target is not None:  # energy mode: the Brownian prior (prior_path "brownian") and the target's reference
        top["target"] = preset.target.log_density
        if preset.target.sha256:
            top["target_sha256"] = preset.target.sha256
    info = RunInfo(
        "finetune",
        run_id,
        seed,
        device,
        preset,
        preset_ref,
        preset.finetune.steps,
        length,
        dist.world,
        Path(out),
        checkpoint_meta=top,
        run_meta={"on_policy": on_policy, **warm},
        state_meta={"algo": algo, "on_policy": on_policy, "step_offset": offset, "warm_start": json.dumps(warm)},
    )
    return info, offset


def check_energy_start(start: Checkpoint | None, preset: Preset) -> None:
    """Energy mode starts from the Brownian prior (no checkpoint) or from an energy-mode checkpoint, and a
    data-mode run from a prior checkpoint: a one-line InputError naming the fix otherwise."""
    if start is None and not preset.energy:
        raise InputError(
            f"--prior brownian samples a target with no data, but preset '{preset.name}' has [prior_data]: "
            f"give --target file.py:fn or an energy preset (gmm25-energy, funnel, manywell-energy)"
        )
    if start is not None and start.preset.energy != preset.energy:
        if preset.energy:
            raise InputError(
                f"preset '{preset.name}' samples a target from the Brownian prior, and '{start.path}' is a pretrained "
                f"prior's run: use --prior brownian (or leave --prior out)"
            )
        raise InputError(
            f"'{start.path}' samples a target from the Brownian prior, and preset '{preset.name}' has [prior_data]: "
            f"continue it under its own target (leave out --preset)"
        )


def check_network_options(start: Checkpoint, cfg, dist: Dist) -> None:
    """A user's network (`rtbcli.networks`) or a diffusers model (`rtbcli.lora`) trains by autograd in one process,
    without the Langevin parametrisation."""
    spec = start.preset.sampler
    if spec.network is None and spec.model is None:
        return
    what = "a network of your own" if spec.network is not None else "a diffusers model"
    if spec.model is not None and cfg.matmul_dtype != "float32":  # the step variances (~1e-5) make bf16's error in a mean ~nats
        raise InputError(
            "--matmul-dtype bfloat16 applies to rtbcli's bridge sampler: a diffusers model's log-probabilities need float32 products"
        )
    if cfg.langevin:
        raise InputError("the Langevin parametrisation is built on rtbcli's own drift network: switch it off (--no-langevin)")
    if dist.world > 1:
        raise InputError(f"{what} is fine-tuned in one process: run without torchrun")


def setup(
    start: Checkpoint | None,
    preset: Preset,
    preset_ref: str,
    algo: str,
    out: Path,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    on_policy: bool = False,
    dtype: torch.dtype = torch.float32,
    resume: bool = False,
    dist: Dist | None = None,
) -> FinetuneRun:
    """The run object: fresh from a prior, warm-started from a finetuned checkpoint, or (`resume`)
    the saved run of a finetuned checkpoint, restored exactly (the settings checked first).
    `start` None: energy mode's fresh run from the preset's Brownian prior (`--prior brownian`)."""
    obj, dist, cfg = objective(algo), dist or Dist(), preset.finetune
    if not obj.uses_beta and abs(preset.beta - 1.0) > 1e-12:
        raise InputError(f"{algo} ignores beta (its fixed point is p_theta exp(r / 2 lambda), not p_theta r^beta): run it at beta = 1")
    check_energy_start(start, preset)
    if start is not None:
        check_compatible(start, preset)
        check_network_options(start, cfg, dist)
        preset = recorded(preset, start.network)  # a preset naming the network has no SHA-256 of its file yet
    if resume and start is None:
        raise InputError("--resume needs a finetuned checkpoint to continue")
    b_local = dist.check_batch(cfg.batch_size)
    state = check_finetune_resumable(start, algo, preset, device) if resume and start is not None else None
    if state is not None:
        seed, on_policy = int(state.meta["seed"]), state.meta.get("on_policy") == "True"
    task = Task(preset).to(device)
    if task.energy is not None:  # record the target's dimension and (a user's) file hash with the run's config
        preset = preset.updated("target", dim=task.energy.dim, sha256=getattr(task.energy, "sha256", None))
    prior, policy, init, _, _, _ = starting_point(start, algo, preset.beta, device, dtype, langevin=cfg.langevin, seed=seed, preset=preset)
    prior.requires_grad_(False)
    _check_reward(task, prior, seed, device)
    if isinstance(task.reward, PythonReward):  # record the reward file's hash with the run's config
        preset = preset.updated("reward", sha256=task.reward.sha256)
    info, offset = _run_info(start, preset, preset_ref, algo, out, seed, device, on_policy, dist, state, task)
    scalar = nn.Parameter(torch.tensor(init, device=device, dtype=dtype)) if obj.scalar is not None else None
    scale = obj.gradient_scales(1.0 / preset.beta)
    opt = _optimizer(policy, scalar, cfg, scale)
    schedule = Schedule(cfg, info.schedule_steps)
    hp = HyperParams(beta=preset.beta, temper=float(policy.steps) if cfg.snis == "tempered" else 1.0, legacy_lambda=cfg.legacy_lambda)
    run = FinetuneRun(
        policy,
        prior,
        scalar,
        opt,
        None,
        schedule,
        make_generator(seed, device),
        Workspace(policy, b_local),
        task,
        obj,
        hp,
        obj.explores and not on_policy,
        cfg.grad_clip * scale[0] if cfg.grad_clip is not None else math.inf,
        scale[0],
        info,
        0,
        offset,
    )
    run.log_density = None if task.energy is None else task.energy.log_density
    attach_offpolicy(run, dist)
    if state is not None:
        assert start is not None and start.path is not None  # a checkpoint with a state file was loaded from a file
        restore(run, state, start.path)
    run.sched = schedule.scheduler(opt, run.step)
    return run


def attach_offpolicy(run: FinetuneRun, dist: Dist) -> None:
    """Check the off-policy options against the run (energy mode: `run.log_density` set) and build
    its `OffPolicy` (None when replay and local search are off); give a Langevin policy its gradient
    target, log pi in energy mode, else log r (`rtbcli.offpolicy`). One-line InputErrors name the fix."""
    cfg, energy = run.info.preset.finetune, run.log_density is not None
    check_options(cfg, run.info.state_meta["algo"], energy=energy, processes=dist.world)
    p = run.policy
    w = p.anchor
    probe = torch.zeros(4, p.dim, dtype=w.dtype, device=w.device)
    if cfg.langevin:
        net = p.net
        assert isinstance(net, LangevinDriftNet)  # `start_policy` built it
        target = run.log_density if run.log_density is not None else _differentiable_log_reward(run.task)
        check_gradient(target, probe, "switch the Langevin parametrisation off (langevin = false / --no-langevin)")
        net.log_density = target
    if cfg.local_search and run.log_density is not None:  # `check_options`: local search is energy mode's
        check_gradient(run.log_density, probe)
    run.offpolicy = None
    if uses_offpolicy(cfg):
        run.offpolicy = OffPolicy(
            cfg, p.dim, p.backward_sample, log_density=run.log_density, seed=run.info.seed, device=w.device, dtype=w.dtype
        )


def restore(run: FinetuneRun, state: RunState, checkpoint: Path) -> None:
    """Continue exactly where the saved run stopped: weights, Adam, generator, step, log."""
    run.policy.load_state_dict(state.section("param.policy"))
    if run.scalar is not None:
        with torch.no_grad():
            run.scalar.copy_(state.tensors["param.scalar"])
    for g in run.opt.param_groups:  # the schedule's base lrs (a version-1 state saved only the scheduled ones)
        g["initial_lr"] = g["lr"]
    restore_optimizer(run.opt, state.tensors, state.adam_groups)
    run.gen.set_state(state.generator_state("rollout"))
    if run.offpolicy is not None:
        run.offpolicy.load_state_dict(state.section("offpolicy"))
    run.step, run.seconds, run.log_lines = state.step, state.seconds, tuple(earlier_log(state, checkpoint))


class Watch:
    """What the loop keeps on the device between loggings (no host sync): the first step whose loss,
    or reward, was non-finite (0: never), and exact SNIS's smallest ESS since the start and its step."""

    def __init__(self, device: torch.device, ess: bool):
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.bad, self.bad_reward, self.low_step = zero, zero.clone(), zero.clone()
        self.low_ess, self.ess = torch.full((), math.inf, device=device), ess

    def update(self, st: StepStats, step: int) -> None:
        self.bad = torch.where((self.bad == 0) & ~torch.isfinite(st.loss), step, self.bad)
        self.bad_reward = torch.where((self.bad_reward == 0) & ~torch.isfinite(st.batch.log_r).all(), step, self.bad_reward)
        if self.ess and st.batch.lb is not None:
            ess_t = 1.0 / snis_weights(st.batch.lpf, st.batch.lb, 1.0).pow(2).sum()
            self.low_step = torch.where(ess_t < self.low_ess, step, self.low_step)
            self.low_ess = torch.minimum(self.low_ess, ess_t)


class FinetuneRecipe(Recipe):
    """Fine-tuning as `run_loop` drives it: its step, its log record, its files, its failures."""

    command = "finetune"

    def __init__(self, run: FinetuneRun, dist: Dist, paths: RunPaths, log: JsonlLog):
        self.run, self.dist, self.paths, self.log = run, dist, paths, log
        i = run.info
        self.name, self.preset, self.device, self.total, self.first = (
            f"finetune {i.state_meta['algo']}",
            i.preset,
            i.device,
            i.steps,
            run.step,
        )
        self.seconds_before = run.seconds
        # --snis exact warns once if its weights collapse
        self.watch = Watch(i.device, run.obj.weighs_behaviour and run.explore and run.hp.temper == 1.0)
        self.last_good, self.last_good_step = self.snapshot(), run.step
        self.loss = self.mean_log_r = float("nan")

    def snapshot(self) -> dict:
        r = self.run
        return {k: v.clone() for k, v in finetuned_tensors(r.policy, r.prior, r.info.state_meta["algo"], r.scalar).items()}

    def step(self) -> StepStats:
        st = train_step(self.run, self.dist)
        self.watch.update(st, self.run.step)
        return st

    def evaluate(self, step: int) -> dict | None:
        """`eval_every`: the policy's metrics now, on [evaluate] n samples, on rank 0, from a generator of its own (the
        training's random streams are untouched). Energy mode: Table 1's (`rtbcli.energy.table_metrics`); data mode:
        the mean log r and, where the target p_data r^beta has exact mode or bin masses, its mode metrics
        (`rtbcli.metrics.sample_metrics`: kl_mode, off_target, mode_coverage, kl_hist)."""
        r = self.run
        if not self.dist.is_main:
            return None
        seconds = self.timer.total  # training time to this step, earlier sessions included
        energy, n = r.task.energy, r.info.preset.evaluate.n
        gen = make_generator(_mix(r.info.seed, step, 2), self.device)
        if energy is not None:
            target = getattr(energy, "shipped", None) or energy
            metrics = table_metrics(r.policy, target, n, gen, with_w2=_has_pot())
        else:
            metrics = self._data_metrics(n, gen)
        return {"step": step, "eval": metrics, "seconds": seconds}

    @functools.cached_property
    def _data_target(self):
        """Data mode's target p_data r^beta for `eval_every`, built at the first evaluation."""
        from .suites import tilted_target  # the evaluation side; imported when a run asks for it

        return tilted_target(self.run.task, self.run.hp.beta)

    @torch.no_grad()
    def _data_metrics(self, n: int, gen: torch.Generator) -> dict:
        r = self.run
        x = r.policy.sample(n, 0.0, gen)[-1]
        metrics = {k: v for k, v in sample_metrics(x.cpu(), self._data_target).items() if v is not None}
        return {"n": float(n), "log_r_mean": float(r.task.log_reward(x).double().mean()), **metrics}

    def check(self) -> None:
        """Stop on the first non-finite reward or loss, naming which came first (a host sync)."""
        r, b = int(self.watch.bad_reward), int(self.watch.bad)
        if r and (not b or r <= b):
            what = "the reward" if self.run.log_density is None else "the target's log-density (through the reward it implies)"
            raise self.diverged(f"{what} returned NaN or inf", self.run.step, True)
        params_ok = all(bool(torch.isfinite(p).all()) for g in self.run.opt.param_groups for p in g["params"])
        if b or not params_ok:
            raise self.diverged("the loss or the parameters became non-finite", self.run.step, True)

    def diverged(self, reason: str, step: int, every_rank: bool) -> RunError:
        """The error for a failed run; rank 0 keeps the last good state. `every_rank`: every process saw it."""
        fix = " or fix the target" if "target" in reason else " or fix the reward" if "reward" in reason else ""
        advice = "try a lower --lr or --lr-logz" + fix
        self.log.close()
        if not self.dist.is_main:  # a failure of this process alone (the reward raised here): rank 0 does not know the cause
            return RunError(f"{reason} by step {step} in process {self.dist.rank} of {self.dist.world}: {advice}", every_rank=every_rank)
        meta = self.run.info.checkpoint_metadata(self.run.offset + self.last_good_step, "diverged", diverged_at=step)
        save_checkpoint(self.paths.last_good, self.last_good, meta)
        return RunError(
            f"{reason} by step {step}: the last good state (step {self.last_good_step}) is in {self.paths.last_good}; {advice}",
            every_rank=every_rank,
        )

    def record(self, st: StepStats, step: int, rate: float, seconds: float) -> tuple[dict, str]:
        self.check()
        r = self.run
        self.last_good, self.last_good_step = self.snapshot(), step
        self.loss, self.mean_log_r = float(st.loss), float(st.batch.log_r.mean())
        rec: dict[str, Any] = {
            "step": step,
            "loss": self.loss,
            "mean_log_r": self.mean_log_r,
            "exploration": st.exploration,
            "lr": st.lr,
            "grad_norm": float(st.grad_norm),
            "steps_per_s": rate,
            "seconds": seconds,
        }
        shown = ""
        if r.scalar is not None and r.obj.scalar is not None:
            v = float(r.scalar.detach())
            rec.update({r.obj.scalar: v, "log_z": r.learned_log_z()})
            shown = f"{r.obj.scalar_label} {v:.4f}  "
        elif st.batch.lb is not None:  # reinforce-kl off-policy: how many trajectories the weights rest on (a count)
            rec["weights_ess"] = ess = float(1.0 / snis_weights(st.batch.lpf, st.batch.lb, r.hp.temper).pow(2).sum())
            shown = f"ESS {ess:.1f}  "
        if r.offpolicy is not None:
            rec.update(r.offpolicy.log_record(st.replayed))
        if r.info.preset.finetune.prior_every:
            rec["prior_batch"] = st.from_prior
        self.warn_low_ess()
        return rec, f"loss {self.loss:.4g}  {shown}E[log r] {self.mean_log_r:.3f}"

    def warn_low_ess(self) -> None:
        w = self.watch
        if w.ess and float(w.low_ess) < ESS_WARN:
            w.ess = False  # warned once
            warnings.warn(
                f"the exact SNIS weights' effective sample size fell to {float(w.low_ess):.1f} of "
                f"{self.run.info.preset.finetune.batch_size} at step {int(w.low_step)}: the gradient rests on a few "
                f"trajectories; use --snis tempered or a smaller --exploration",
                RtbcliWarning,
                stacklevel=4,
            )

    def save(self, path: Path, step: int, status: str, log_to: Path | None) -> None:
        """Checkpoint and resumable state of `step` (rank 0 only)."""
        if not self.dist.is_main:
            return
        r = self.run
        params = {f"policy.{k}": v for k, v in r.policy.state_dict().items()}
        if r.scalar is not None:
            params["scalar"] = r.scalar.detach()
        extra = None if r.offpolicy is None else {f"offpolicy.{k}": v for k, v in r.offpolicy.state_dict().items()}
        save_run(
            path,
            r.info,
            step,
            status,
            log_to,
            tensors=finetuned_tensors(r.policy, r.prior, r.info.state_meta["algo"], r.scalar),
            params=params,
            opt=r.opt,
            generators={"rollout": r.gen},
            checkpoint_step=r.offset + step,
            extra=extra,
            seconds=self.timer.total,
        )


def finetune(
    start: Checkpoint | None,
    preset: Preset,
    preset_ref: str,
    algo: str,
    out: Path,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    on_policy: bool = False,
    log_path: Path | None = None,
    log_every: int = 50,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    resume: bool = False,
    save_every: int = 1000,
    dist: Dist | None = None,
) -> FinetuneResult:
    """Fine-tune with `algo` under `preset` (beta and budget from it).

    `start` is a prior checkpoint (a new run), None (energy mode: a new run from the preset's Brownian
    prior, `--prior brownian`), or a finetuned one: `resume=True` continues that
    run exactly from its saved state (to `preset.finetune.steps` in all; the schedules keep the
    run's original length, see the module docstring); otherwise it is a warm start with a fresh
    optimiser and schedule (see `starting_point`).
    """
    dist = dist or Dist()
    run = setup(start, preset, preset_ref, algo, out, seed=seed, device=device, on_policy=on_policy, dtype=dtype, resume=resume, dist=dist)
    paths = RunPaths(Path(out))
    log = JsonlLog(log_path if dist.is_main else None, preamble=list(run.log_lines))
    recipe = FinetuneRecipe(run, dist, paths, log)
    done = run_loop(
        recipe,
        paths,
        log,
        log_path,
        dist,
        log_every=log_every,
        save_every=save_every,
        progress=progress,
        eval_every=run.info.preset.finetune.eval_every,
    )
    ran, s = run.info.steps - recipe.first, done.seconds
    med = statistics.median(done.step_seconds) if done.step_seconds else 0.0
    return FinetuneResult(
        paths.out,
        log_path,
        algo,
        run.info.steps,
        recipe.first,
        s,
        ran / s if s > 0 else 0.0,
        recipe.loss,
        run.learned_log_z(),
        recipe.mean_log_r,
        done.step_seconds or [med],
        sum(p.numel() for p in run.policy.parameters() if p.requires_grad),
        peak_memory_mb(device),
    )


def _has_pot() -> bool:
    """Whether W2's optimal transport (POT, an optional extra) is installed: the in-loop evaluation leaves w2 out if not."""
    try:
        require_pot()
    except InputError:
        return False
    return True
