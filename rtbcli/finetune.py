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

Exploration schedule for a run of N steps (the authors' schedule at N = 5,000):
s_e(it) = s_0 for it < hold*N, else s_0 * max(0, 1 - it / (end*N)), with hold = 0.1, end = 0.9,
and s_e = 0 at the last step of every run, however short.

Learning rates: the policy's is `lr`; log Z's (rtb) is `lr_logz`; trust-pcl's V(s0) gets
alpha * lr_logz, and Adam's eps is scaled with trust-pcl's gradients (alpha^2 for the policy,
alpha for V). Adam otherwise ignores the loss scale alpha^2, so trust-pcl then takes the same
steps as rtb from the same seed and trains the same sampler (the tests check this end to end).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, base_metadata, sampler_tensors, save_checkpoint
from .config import DataFileSpec, DatasetSpec, MixtureSpec, Preset, PythonRewardSpec
from .distributed import Dist
from .errors import InputError, Interrupted, RtbcliWarning, RunError
from .objectives import OBJECTIVES, Batch, HyperParams, Objective, snis_weights
from .rewards import PythonReward, RewardFailed, check_reward_output
from .rollout import Workspace, rollout, step_log_probs
from .rollout import backward as policy_backward
from .runtime import JsonlLog, Timer, atomic_group, make_generator, make_progress
from .sampler import DiffusionSampler
from .state import load_state, save_state
from .tasks import Task
from .training import RunPaths, StopSignals, config_differences, earlier_log, learning_rate, new_run_id, resume_command

ADAM_EPS = 1e-8  # torch's default; scaled for trust-pcl (see `finetune`)
PROBE_N = 256  # prior samples the reward is checked on before a run
ESS_WARN = 5.0  # --snis exact warns once when its weights' effective sample size falls below this


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

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_seconds)


def objective(algo: str) -> Objective:
    if algo not in OBJECTIVES:
        raise InputError(f"unknown objective '{algo}': choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[algo]


def exploration_std(it: int, total: int, s0: float, hold: float = 0.1, end: float = 0.9) -> float:
    """s_e at (0-indexed) iteration `it` of a run of `total` steps; 0 at the last step."""
    if it >= total - 1:
        return 0.0
    if it < hold * total:
        return s0
    return s0 * max(0.0, 1.0 - it / (end * total)) if end > 0 else 0.0


def _mixture_weights(spec: MixtureSpec) -> list[float]:
    """The normalised component weights (omitted weights are equal ones: the same mixture)."""
    w = [1.0] * len(spec.means) if spec.weights is None else [float(v) for v in spec.weights]
    total = sum(w)
    return [v / total for v in w]


def data_identity(spec) -> tuple:
    """What makes two presets' prior data the same data (a file by its content, not its path)."""
    if isinstance(spec, MixtureSpec):
        return ("mixture", json.dumps({"means": spec.means, "variance": spec.variance, "weights": _mixture_weights(spec)}))
    if isinstance(spec, DataFileSpec):
        return ("file", spec.sha256)
    if isinstance(spec, DatasetSpec):
        return ("dataset", spec.dataset, spec.split, spec.scaling)
    return ("?", repr(spec))


def describe_data(spec) -> str:
    if isinstance(spec, MixtureSpec):
        return f"a {len(spec.means)}-component mixture (variance {spec.variance:g})"
    if isinstance(spec, DataFileSpec):
        return f"the data file {spec.path} (SHA-256 {str(spec.sha256)[:12]}...)"
    scale, shift = spec.scaling
    return f"the {spec.dataset} dataset ({spec.split}, scale {scale:g}, shift {shift:g})"


def mixture_difference(a: MixtureSpec, b: MixtureSpec) -> str:
    """What differs between two mixtures, e.g. 'their means differ (component 1: [-10.0, -10.0] vs [-10.0, -9.0])'."""
    parts = []
    if len(a.means) != len(b.means):
        parts.append(f"{len(a.means)} vs {len(b.means)} components")
    elif a.means != b.means:
        k = next(i for i, (x, y) in enumerate(zip(a.means, b.means)) if x != y)
        parts.append(f"means differ (component {k + 1}: {a.means[k]} vs {b.means[k]})")
    if a.variance != b.variance:
        parts.append(f"variance {a.variance:g} vs {b.variance:g}")
    if len(a.means) == len(b.means) and _mixture_weights(a) != _mixture_weights(b):
        parts.append("weights differ")
    return "their " + ", ".join(parts)


def check_compatible(prior: Checkpoint, preset: Preset) -> None:
    """The prior must be a sampler of the preset's data, with the preset's sampler settings.

    The preset's data define the target that `evaluate` scores against (p_data r^beta), so a
    prior pretrained on other data is refused.
    """
    if prior.preset.dim != preset.dim:
        raise InputError(f"the prior samples dimension {prior.preset.dim} but the preset's task has dimension {preset.dim}: use a prior pretrained on this preset")
    if prior.preset.sampler != preset.sampler:
        mine, theirs = prior.preset.sampler.model_dump(), preset.sampler.model_dump()
        diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
        raise InputError(f"the prior's sampler settings differ from the preset's ({diff}): use the preset the prior was pretrained with")
    a, b = prior.preset.prior_data, preset.prior_data
    if data_identity(a) != data_identity(b):
        both = isinstance(a, MixtureSpec) and isinstance(b, MixtureSpec)
        what = f"; {mixture_difference(a, b)}" if both else ""
        raise InputError(f"the prior was pretrained on {describe_data(a)} but the preset's prior_data are {describe_data(b)}{what}: "
                         f"fine-tune under the preset the prior was pretrained with (its data define the target)")


def finetuned_tensors(policy: DiffusionSampler, prior: DiffusionSampler, algo: str, scalar: torch.Tensor | None) -> dict:
    """A finetuned checkpoint's tensors: policy.*, prior.*, and the objective's learned scalar."""
    tensors = {**sampler_tensors(policy, "policy"), **sampler_tensors(prior, "prior")}
    name = OBJECTIVES[algo].scalar
    if name is not None:
        tensors[name] = scalar.detach().to("cpu", torch.float32).reshape(())
    return tensors


def starting_point(start: Checkpoint, algo: str, beta: float, device, dtype):
    """(prior, policy, initial scalar, prior sha256, prior path, step offset) from a checkpoint.

    A prior checkpoint starts a run: the policy is a copy of the prior, log Z = V(s0) = 0. A
    finetuned checkpoint warm-starts one: its policy, its frozen prior, and its log Z (or
    V(s0)/alpha) converted to what `algo` learns at this beta (log Z, or V(s0) = log Z / beta).
    """
    if start.kind == "prior":
        prior, policy = start.sampler("policy", device, dtype), start.sampler("policy", device, dtype)
        return prior, policy, 0.0, start.sha256, str(start.path), 0
    prior, policy = start.sampler("prior", device, dtype), start.sampler("policy", device, dtype)
    log_z, obj = start.learned_log_z(), OBJECTIVES[algo]
    init = 0.0 if log_z is None or obj.scalar is None else obj.scalar_from_log_z(log_z, 1.0 / beta)
    return prior, policy, init, start.meta.get("prior_sha256", ""), start.meta.get("prior_path", ""), start.step


def check_resumable(start: Checkpoint, algo: str, preset: Preset, device: torch.device):
    """The state beside a finetuned checkpoint, checked against the run that would continue it."""
    if start.kind != "finetuned":
        raise InputError(f"--resume needs a finetuned checkpoint; '{start.path}' is a prior: start a run with --prior")
    state = load_state(start.path, "finetune")
    # a warm-started run's checkpoints number their steps on from the checkpoint it started from
    if state.meta.get("run_id") != start.meta.get("run_id") or state.step + int(state.meta.get("step_offset", 0)) != start.step:
        raise InputError(f"the state file beside '{start.path}' belongs to another run or step: resume from the checkpoint it was saved with")
    if state.meta["algo"] != algo:
        raise InputError(f"'{start.path}' is a {state.meta['algo']} run: resume it with --algo {state.meta['algo']} (or start a new "
                         f"{algo} run from it with --warm-start)")
    saved = state.preset()
    mine = preset.updated("finetune", steps=saved.finetune.steps)
    if isinstance(saved.reward, PythonRewardSpec) and isinstance(mine.reward, PythonRewardSpec):
        mine = mine.updated("reward", sha256=saved.reward.sha256)  # the run recorded its file's hash; a changed file only warns
    if saved != mine:
        diff = ", ".join(config_differences(saved.model_dump(), mine.model_dump()))
        raise InputError(f"--resume continues a run under its own preset, but the preset given differs ({diff}): leave out --preset "
                         f"and other settings except --steps, or start a new run with --warm-start")
    if state.meta.get("device") != device.type:
        raise InputError(f"the run was on {state.meta.get('device')}, its random state cannot continue on {device.type}: "
                         f"resume with --device {state.meta.get('device')}")
    if preset.finetune.steps <= state.step:
        raise InputError(f"the run is at step {state.step}; --steps {preset.finetune.steps} would end it before that: give a larger total")
    return state


def finetune(start: Checkpoint, preset: Preset, preset_ref: str, algo: str, out: Path, *, seed: int = 0,
             device: torch.device = torch.device("cpu"), on_policy: bool = False, log_path: Path | None = None,
             log_every: int = 50, progress: bool = True, dtype: torch.dtype = torch.float32, resume: bool = False,
             save_every: int = 1000, dist: Dist | None = None) -> FinetuneResult:
    """Fine-tune with `algo` under `preset` (beta and budget from it).

    `start` is a prior checkpoint (a new run), or a finetuned one: `resume=True` continues that
    run exactly from its saved state (to `preset.finetune.steps` in all); otherwise it is a warm
    start with a fresh optimiser and schedule (see `starting_point`).
    """
    obj, dist = objective(algo), dist or Dist()
    cfg, beta = preset.finetune, preset.beta
    if not obj.uses_beta and abs(beta - 1.0) > 1e-12:
        raise InputError(f"{algo} ignores beta (its fixed point is p_theta exp(r / 2 lambda), not p_theta r^beta): run it at beta = 1")
    check_compatible(start, preset)
    b_local = dist.check_batch(cfg.batch_size)
    state = check_resumable(start, algo, preset, device) if resume else None
    alpha = 1.0 / beta
    task = Task(preset).to(device)
    prior, policy, init, prior_sha, prior_path, offset = starting_point(start, algo, beta, device, dtype)
    warm = {"warm_started_from": str(start.path), "warm_started_sha256": start.sha256} if offset else {}
    prior.requires_grad_(False)
    check_reward_output(task.reward if task.has_reward else task.log_reward,
                        prior.sample(PROBE_N, 0.0, make_generator(seed + 7919, device))[-1])
    if isinstance(task.reward, PythonReward):  # record the reward file's hash with the run's config
        preset = preset.updated("reward", sha256=task.reward.sha256)
    T, var = policy.steps, policy.step_var
    scalar = nn.Parameter(torch.tensor(init, device=device, dtype=dtype)) if obj.scalar is not None else None
    # Trust-PCL's loss is alpha^2 times RTB's, so its gradients are alpha^2 (policy) and alpha (V)
    # times RTB's. Adam's step m / (sqrt(v) + eps) ignores that scale except through eps, so eps
    # is scaled along with it and V's lr is alpha lr_logz: trust-pcl then takes exactly RTB's steps.
    scale = obj.gradient_scales(alpha)
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr, "eps": ADAM_EPS * scale[0]}]
    if scalar is not None:
        groups.append({"params": [scalar], "lr": cfg.lr_logz * scale[1], "eps": ADAM_EPS * scale[1]})
    clip = cfg.grad_clip * scale[0] if cfg.grad_clip is not None else math.inf
    base_lrs = [g["lr"] for g in groups]  # the schedule scales every group's lr alike (trust-pcl stays RTB's twin)
    opt = torch.optim.Adam(groups)
    explore = obj.explores and not on_policy
    hp = HyperParams(beta=beta, temper=float(T) if cfg.snis == "tempered" else 1.0, legacy_lambda=cfg.legacy_lambda)
    ws = Workspace(policy, b_local)
    gen = make_generator(seed, device)
    first, run_id, log_lines = 0, new_run_id(), []
    if state is not None:  # continue exactly where the saved run stopped
        policy.load_state_dict(state.section("param.policy"))
        if scalar is not None:
            with torch.no_grad():
                scalar.copy_(state.tensors["param.scalar"])
        from .state import restore_optimizer
        restore_optimizer(opt, state.tensors, state.adam_groups)
        gen.set_state(state.generator_state("rollout"))
        first, run_id = state.step, state.meta["run_id"]
        offset, warm = int(state.meta.get("step_offset", 0)), json.loads(state.meta.get("warm_start", "{}"))
        seed, on_policy = int(state.meta["seed"]), state.meta.get("on_policy") == "True"
        prior_sha, prior_path = start.meta.get("prior_sha256", ""), start.meta.get("prior_path", "")
        log_lines = earlier_log(state, start.path)
        explore = obj.explores and not on_policy
    paths = RunPaths(Path(out))
    main = dist.is_main

    def learned_log_z() -> float | None:
        if scalar is None:
            return None
        return obj.log_z(float(scalar.detach()), alpha)

    def snapshot() -> dict:
        return {k: v.clone() for k, v in finetuned_tensors(policy, prior, algo, scalar).items()}

    def meta(step: int, **extra) -> dict:
        run = {"command": "finetune", "device": device.type, "seed": seed, "on_policy": on_policy, "prior_path": prior_path,
               "steps": cfg.steps, "run_id": run_id, "processes": dist.world, "out": str(paths.out),
               **warm, **extra}
        m = base_metadata("finetuned", preset, preset_ref, offset + step, seed, run)
        m.update(algo=algo, beta=repr(beta), alpha=repr(alpha), prior_sha256=prior_sha, prior_path=prior_path, run_id=run_id)
        if preset.reward is not None:
            m["reward"] = preset.reward.function if isinstance(preset.reward, PythonRewardSpec) else preset.reward.type
            if isinstance(task.reward, PythonReward) and task.reward.sha256:
                m["reward_sha256"] = task.reward.sha256
        return m

    def save(path: Path, step: int, status: str, log_to: Path | None) -> None:
        """Checkpoint and resumable state of `step` (rank 0 only)."""
        if not main:
            return
        save_checkpoint(path, finetuned_tensors(policy, prior, algo, scalar), meta(step, status=status))
        params = {f"policy.{k}": v for k, v in policy.state_dict().items()}
        if scalar is not None:
            params["scalar"] = scalar.detach()
        state_meta = {"kind": "finetune", "run_id": run_id, "step": step, "planned_steps": cfg.steps, "algo": algo, "seed": seed,
                      "on_policy": on_policy, "device": device.type, "config": preset.model_dump_json(), "preset": preset_ref,
                      "exploration_schedule": json.dumps({"s0": cfg.exploration, "hold": cfg.exploration_hold, "end": cfg.exploration_end}),
                      "log": str(log_to) if log_to else "", "step_offset": offset, "warm_start": json.dumps(warm)}
        save_state(RunPaths(path).state, params=params, opt=opt, generators={"rollout": gen}, meta=state_meta)

    log = JsonlLog(log_path if main else None, preamble=log_lines)
    timer = Timer()
    # the first step at which the loss, or the reward, was non-finite (0: never); kept on the device
    bad = torch.zeros((), dtype=torch.long, device=device)
    bad_reward = torch.zeros((), dtype=torch.long, device=device)
    last_good, last_good_step = snapshot(), first
    loss_v, mean_log_r = float("nan"), float("nan")
    step = first
    step_seconds: list[float] = []
    watch_ess = obj.weighs_behaviour and explore and hp.temper == 1.0  # --snis exact warns once if its weights collapse
    low_ess = torch.full((), math.inf, device=device)
    low_step = torch.zeros((), dtype=torch.long, device=device)

    def diverged(reason: str, every_rank: bool = True) -> RunError:
        """The error for a failed run; rank 0 keeps the last good state. `every_rank`: every process saw it."""
        advice = "try a lower --lr or --lr-logz" + (" or fix the reward" if "reward" in reason else "")
        log.close()
        if not main:  # a failure of this process alone (the reward raised here): rank 0 does not know the cause
            return RunError(f"{reason} by step {step} in process {dist.rank} of {dist.world}: {advice}", every_rank=every_rank)
        save_checkpoint(paths.last_good, last_good, meta(last_good_step, status="diverged", diverged_at=step))
        return RunError(f"{reason} by step {step}: the last good state (step {last_good_step}) is in {paths.last_good}; {advice}",
                        every_rank=every_rank)

    def check_finite() -> None:
        """At logging time (a host sync): stop on the first non-finite reward or loss, naming which came first."""
        r, b = int(bad_reward), int(bad)
        if r and (not b or r <= b):
            raise diverged("the reward returned NaN or inf")
        params_ok = all(bool(torch.isfinite(p).all()) for g in opt.param_groups for p in g["params"])
        if b or not params_ok:
            raise diverged("the loss or the parameters became non-finite")

    try:
        with StopSignals() as signals, make_progress(enabled=progress and main) as bar:
            job = bar.add_task(f"finetune {algo}", total=cfg.steps, completed=first, rate="", status="")
            for it in range(first, cfg.steps):
                t_step = time.perf_counter()
                s_e = exploration_std(it, cfg.steps, cfg.exploration, cfg.exploration_hold, cfg.exploration_end) if explore else 0.0
                lr_factor = learning_rate(it, cfg) / cfg.lr
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = base * lr_factor
                # 1. trajectories from the behaviour policy, without gradient, with the policy's activations
                ro = rollout(policy, ws, s_e * s_e, gen, (dist.rank, dist.world))
                log_r = task.log_reward(ro.traj[-1])
                # 2. log-probabilities: policy and behaviour from the residuals, prior in one batched pass
                with torch.no_grad():
                    step_lpp = prior.step_log_probs(ro.traj)
                step_lpf = step_log_probs(ro.residual, var).requires_grad_()
                lb = step_log_probs(ro.residual, var + s_e * s_e).sum(0) if explore and obj.weighs_behaviour else None
                batch = Batch(step_lpf, step_lpp, log_r, lb)
                if dist.active:  # the global batch: every rank's trajectories, gradients only through this rank's
                    batch = Batch(dist.gather(step_lpf), dist.gather(step_lpp), dist.gather(log_r), None if lb is None else dist.gather(lb))
                # 3. the objective, its gradient, one Adam step
                loss = obj.loss(batch, scalar, hp)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # dL/d(log Z or V) and dL/d(step lpf)
                policy_backward(ro, step_lpf.grad)  # dL/d(policy weights) through this rank's trajectories
                dist.sum_grads(list(policy.parameters()))
                # the policy gradient's norm (no host sync); clipped to grad_clip, in RTB's units (trust-pcl's gradient is alpha^2 RTB's)
                grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), clip) / scale[0]
                opt.step()
                step = it + 1
                bad = torch.where((bad == 0) & ~torch.isfinite(loss.detach()), step, bad)
                bad_reward = torch.where((bad_reward == 0) & ~torch.isfinite(batch.log_r).all(), step, bad_reward)  # global: every rank agrees
                if watch_ess and batch.lb is not None:  # exact SNIS: the smallest ESS since the last logging, and its step
                    ess_t = 1.0 / snis_weights(batch.lpf.detach(), batch.lb, 1.0).pow(2).sum()
                    low_step = torch.where(ess_t < low_ess, step, low_step)
                    low_ess = torch.minimum(low_ess, ess_t)
                bar.advance(job)
                if step % log_every == 0 or step == cfg.steps:
                    # the only host syncs of the loop, at logging time
                    check_finite()
                    last_good, last_good_step = snapshot(), step
                    loss_v, mean_log_r = float(loss.detach()), float(batch.log_r.mean())
                    lz = learned_log_z()
                    rate = (step - first) / timer.elapsed
                    rec = dict(step=step, loss=loss_v, mean_log_r=mean_log_r, exploration=s_e, lr=cfg.lr * lr_factor, grad_norm=float(grad_norm), steps_per_s=rate, seconds=timer.elapsed)
                    shown = ""
                    if scalar is not None:
                        v = float(scalar.detach())
                        rec.update({obj.scalar: v, "log_z": lz})
                        shown = f"{obj.scalar_label} {v:.4f}  "
                    elif batch.lb is not None:  # reinforce-kl off-policy: how many trajectories the weights rest on
                        w = snis_weights(batch.lpf.detach(), batch.lb, hp.temper)
                        rec["weights_ess"] = ess = float(1.0 / w.pow(2).sum())
                        shown = f"ESS {ess:.1f}  "
                    if watch_ess and float(low_ess) < ESS_WARN:
                        watch_ess = False  # warned once
                        warnings.warn(f"the exact SNIS weights' effective sample size fell to {float(low_ess):.1f} of {cfg.batch_size} at step "
                                      f"{int(low_step)}: the gradient rests on a few trajectories; use --snis tempered or a smaller --exploration",
                                      RtbcliWarning, stacklevel=2)
                    log.write(**rec)
                    bar.update(job, rate=f"{rate:.1f} it/s", status=f"loss {loss_v:.4g}  {shown}E[log r] {mean_log_r:.3f}")
                step_seconds.append(time.perf_counter() - t_step)  # with its logging: on CUDA, its host sync
                if step < cfg.steps and dist.any(signals.requested is not None):
                    check_finite()
                    with atomic_group():  # checkpoint, state and log of one step, put in place together
                        save(paths.partial, step, "interrupted", paths.partial_log)
                        log.snapshot(paths.partial_log if main else None)
                    log.discard()  # the partial log holds its records
                    dist.barrier()
                    raise Interrupted(f"{signals.name} at step {step} of {cfg.steps}: saved to {paths.partial}; continue with "
                                      f"`{resume_command('finetune', paths.partial, preset, device)}`", signals.exit_code)
                if save_every and step % save_every == 0 and step < cfg.steps:
                    with atomic_group():  # checkpoint, state and log of one step, put in place together
                        save(paths.partial, step, "running", paths.partial_log)
                        log.snapshot(paths.partial_log if main else None)
    except RewardFailed as e:  # raised in this process only
        raise diverged(str(e), every_rank=False) from None
    check_finite()
    seconds = timer.elapsed
    med = statistics.median(step_seconds) if step_seconds else 0.0
    with atomic_group():  # the checkpoint and its state together
        save(paths.out, cfg.steps, "finished", log_path)
    if main:
        log.commit()
        paths.remove_partial()
    ran = cfg.steps - first
    return FinetuneResult(paths.out, log_path, algo, cfg.steps, first, seconds, ran / seconds if seconds > 0 else 0.0, loss_v,
                          learned_log_z(), mean_log_r, step_seconds or [med])
