"""Fine-tuning a prior toward p_prior(x) r(x)^beta with rtb, trust-pcl, reinforce-kl or legacy-rl.

One step (design.md §2-§3), the same for every objective:

1. draw B trajectories without gradient from the behaviour policy: the learned policy's mean
   with per-step variance sigma2 * dt + s_e^2 (s_e = 0 on-policy), keeping the policy
   network's activations (`rtbcli.rollout`);
2. the learned policy's log-probabilities (un-inflated variance) and the behaviour's come from
   the residuals of that rollout; the frozen prior scores the trajectories in one batched pass;
3. autograd differentiates the objective (`rtbcli.objectives`) with respect to the per-step
   log-probabilities and log Z / V(s0); one batched backward pass over all T*B transitions
   (`rollout.backward`) turns that into the policy's gradient; one Adam step.

Exploration schedule for a run of N steps (the authors' schedule at N = 5,000):
s_e(it) = s_0 for it < hold*N, else s_0 * max(0, 1 - it / (end*N)), with hold = 0.1, end = 0.9.

Learning rates: the policy's is `lr`; log Z's (rtb) is `lr_logz`; trust-pcl's V(s0) gets
alpha * lr_logz, and Adam's eps is scaled with trust-pcl's gradients (alpha^2 for the policy,
alpha for V). Adam otherwise ignores the loss scale alpha^2, so trust-pcl then takes the same
steps as rtb from the same seed and trains the same sampler (the tests check this end to end).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, base_metadata, sampler_tensors, save_checkpoint
from .config import Preset
from .errors import InputError, RtbcliError, RunError
from .objectives import legacy_rl_loss, outcome_rewards, reinforce_kl_loss, rtb_loss, snis_weights, trust_pcl_loss
from .runtime import JsonlLog, Timer, keep_freed_memory, make_generator, make_progress
from .rollout import Workspace, rollout, step_log_probs
from .rollout import backward as policy_backward
from .sampler import DiffusionSampler
from .tasks import Task

ALGOS = ("rtb", "trust-pcl", "reinforce-kl", "legacy-rl")
SCALAR_NAME = {"rtb": "log_z", "trust-pcl": "v_soft_s0"}
ADAM_EPS = 1e-8  # torch's default; scaled for trust-pcl (see `finetune`)


class Interrupted(RtbcliError):
    exit_code = 130


@dataclass
class FinetuneResult:
    out: Path
    log: Path | None
    algo: str
    steps: int
    seconds: float
    steps_per_s: float
    loss: float
    log_z: float | None  # learned log Z (rtb) or V(s0) / alpha (trust-pcl)
    mean_log_r: float
    step_seconds: list[float]  # wall time of every step (host clock), for benchmarks

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_seconds)


def exploration_std(it: int, total: int, s0: float, hold: float = 0.1, end: float = 0.9) -> float:
    """s_e at (0-indexed) iteration `it` of a run of `total` steps."""
    if it < hold * total:
        return s0
    return s0 * max(0.0, 1.0 - it / (end * total)) if end > 0 else 0.0


def check_compatible(prior: Checkpoint, preset: Preset) -> None:
    """The prior must be a sampler for the preset's space, with the preset's sampler settings."""
    if prior.preset.dim != preset.dim:
        raise InputError(f"the prior samples dimension {prior.preset.dim} but the preset's task has dimension {preset.dim}: use a prior pretrained on this preset")
    if prior.preset.sampler != preset.sampler:
        mine, theirs = prior.preset.sampler.model_dump(), preset.sampler.model_dump()
        diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
        raise InputError(f"the prior's sampler settings differ from the preset's ({diff}): use the preset the prior was pretrained with")


def finetuned_tensors(policy: DiffusionSampler, prior: DiffusionSampler, algo: str, scalar: torch.Tensor | None) -> dict:
    tensors = {**sampler_tensors(policy, "policy"), **sampler_tensors(prior, "prior")}
    if algo in SCALAR_NAME:
        tensors[SCALAR_NAME[algo]] = scalar.detach().to("cpu", torch.float32).reshape(())
    return tensors


def starting_point(start: Checkpoint, algo: str, beta: float, device, dtype):
    """(prior, policy, initial scalar, prior sha256, prior path, step offset) from a checkpoint.

    A prior checkpoint starts a run: the policy is a copy of the prior, log Z = V(s0) = 0. A
    finetuned checkpoint resumes one: its policy, its frozen prior, and its log Z (or V(s0)/alpha)
    converted to what `algo` learns at this beta (log Z, or V(s0) = log Z / beta). Adam's moments
    and the exploration schedule start afresh.
    """
    if start.kind == "prior":
        prior, policy = start.sampler("policy", device, dtype), start.sampler("policy", device, dtype)
        return prior, policy, 0.0, start.sha256, str(start.path), 0
    prior, policy = start.sampler("prior", device, dtype), start.sampler("policy", device, dtype)
    log_z = start.scalar("log_z")
    if log_z is None and start.scalar("v_soft_s0") is not None:
        log_z = start.scalar("v_soft_s0") / float(start.meta["alpha"])
    if log_z is None or algo not in SCALAR_NAME:
        init = 0.0
    else:
        init = log_z if algo == "rtb" else log_z / beta  # V(s0) = alpha log Z
    return prior, policy, init, start.meta.get("prior_sha256", ""), start.meta.get("prior_path", ""), start.step


def finetune(start: Checkpoint, preset: Preset, preset_ref: str, algo: str, out: Path, *, seed: int = 0,
             device: torch.device = torch.device("cpu"), on_policy: bool = False, log_path: Path | None = None,
             log_every: int = 50, progress: bool = True, dtype: torch.dtype = torch.float32) -> FinetuneResult:
    """Fine-tune with `algo` under `preset` (beta and budget from it), from a prior checkpoint or
    resuming a finetuned one (see `starting_point`)."""
    if algo not in ALGOS:
        raise InputError(f"unknown objective '{algo}': choose one of {', '.join(ALGOS)}")
    check_compatible(start, preset)
    keep_freed_memory()
    cfg, beta = preset.finetune, preset.beta
    alpha = 1.0 / beta
    task = Task(preset).to(device)
    probe = task.log_reward(task.prior_data.sample(1000, make_generator(seed, torch.device("cpu")), dtype=torch.float64))
    if not torch.isfinite(probe).all():
        raise InputError("the reward returns non-finite values on the prior data: fix the preset's reward")

    prior, policy, init, prior_sha, prior_path, offset = starting_point(start, algo, beta, device, dtype)
    prior.requires_grad_(False)
    T, var = policy.steps, policy.step_var
    scalar = nn.Parameter(torch.tensor(init, device=device, dtype=dtype)) if algo in SCALAR_NAME else None
    # Trust-PCL's loss is alpha^2 times RTB's, so its gradients are alpha^2 (policy) and alpha (V)
    # times RTB's. Adam's step m / (sqrt(v) + eps) ignores that scale except through eps, so eps
    # is scaled along with it and V's lr is alpha lr_logz: trust-pcl then takes exactly RTB's steps.
    scale = (alpha * alpha, alpha) if algo == "trust-pcl" else (1.0, 1.0)
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr, "eps": ADAM_EPS * scale[0]}]
    if scalar is not None:
        groups.append({"params": [scalar], "lr": cfg.lr_logz * scale[1], "eps": ADAM_EPS * scale[1]})
    opt = torch.optim.Adam(groups)
    explore = not on_policy and algo != "legacy-rl"
    ws = Workspace(policy, cfg.batch_size)
    temper = float(T) if cfg.snis == "tempered" else 1.0
    gen = make_generator(seed, device)
    torch.manual_seed(seed)

    def learned_log_z() -> float | None:
        if scalar is None:
            return None
        value = float(scalar.detach())
        return value if algo == "rtb" else value / alpha

    def snapshot() -> dict:
        return {k: v.clone() for k, v in finetuned_tensors(policy, prior, algo, scalar).items()}

    def meta(step: int, **extra) -> dict:
        run = {"command": "finetune", "device": device.type, "seed": seed, "on_policy": on_policy, "prior_path": prior_path,
               "steps": cfg.steps, **({"resumed_from": str(start.path), "resumed_sha256": start.sha256} if offset else {}), **extra}
        m = base_metadata("finetuned", preset, preset_ref, offset + step, seed, run)
        m.update(algo=algo, beta=repr(beta), alpha=repr(alpha), prior_sha256=prior_sha, prior_path=prior_path)
        return m

    log = JsonlLog(log_path)
    timer = Timer()
    bad = torch.zeros((), dtype=torch.bool, device=device)
    last_good, last_good_step = snapshot(), 0
    loss_v, mean_log_r = float("nan"), float("nan")
    step = 0
    step_seconds: list[float] = []
    try:
        with make_progress(enabled=progress) as bar:
            job = bar.add_task(f"finetune {algo}", total=cfg.steps, rate="", status="")
            for it in range(cfg.steps):
                t_step = time.perf_counter()
                s_e = exploration_std(it, cfg.steps, cfg.exploration, cfg.exploration_hold, cfg.exploration_end) if explore else 0.0
                # 1. trajectories from the behaviour policy, without gradient, with the policy's activations
                ro = rollout(policy, ws, s_e * s_e, gen)
                log_r = task.log_reward(ro.traj[-1])
                # 2. log-probabilities: policy and behaviour from the residuals, prior in one batched pass
                with torch.no_grad():
                    step_lpp = prior.step_log_probs(ro.traj)
                step_lpf = step_log_probs(ro.residual, var).requires_grad_()
                lpf, lpp = step_lpf.sum(0), step_lpp.sum(0)
                # 3. the objective, its gradient, one Adam step
                if algo == "rtb":
                    loss = rtb_loss(scalar, lpf, lpp, log_r, beta)
                elif algo == "trust-pcl":
                    loss = trust_pcl_loss(scalar, step_lpf, step_lpp, outcome_rewards(log_r, T), alpha)
                elif algo == "reinforce-kl":
                    lb = step_log_probs(ro.residual, var + s_e * s_e).sum(0) if explore else None
                    loss = reinforce_kl_loss(lpf, lpp, log_r, alpha, snis_weights(lpf, lb, temper))
                else:
                    loss = legacy_rl_loss(lpf, lpp, log_r, cfg.legacy_lambda)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # dL/d(log Z or V) and dL/d(step lpf)
                policy_backward(ro, step_lpf.grad)  # dL/d(policy weights), one batched pass
                opt.step()
                bad |= ~torch.isfinite(loss.detach())
                step = it + 1
                step_seconds.append(time.perf_counter() - t_step)
                bar.advance(job)
                if step % log_every == 0 or step == cfg.steps:
                    # the only host syncs of the loop, at logging time
                    params_ok = all(bool(torch.isfinite(p).all()) for g in opt.param_groups for p in g["params"])
                    if bool(bad) or not params_ok:
                        kept = out.with_name(out.stem + ".last-good.safetensors")
                        save_checkpoint(kept, last_good, meta(last_good_step, status="diverged", diverged_at=step))
                        log.close()
                        raise RunError(f"the loss or the parameters became non-finite by step {step}: the last good state "
                                       f"(step {last_good_step}) is in {kept}; try a lower --lr or --lr-logz")
                    last_good, last_good_step = snapshot(), step
                    loss_v, mean_log_r = float(loss.detach()), float(log_r.mean())
                    lz = learned_log_z()
                    rate = step / timer.elapsed
                    rec = dict(step=step, loss=loss_v, mean_log_r=mean_log_r, exploration=s_e, steps_per_s=rate, seconds=timer.elapsed)
                    shown = ""
                    if algo == "rtb":
                        rec["log_z"] = lz
                        shown = f"logZ {lz:.4f}  "
                    elif algo == "trust-pcl":
                        v = float(scalar.detach())
                        rec.update(v_soft_s0=v, log_z=lz)
                        shown = f"V {v:.4f}  "
                    log.write(**rec)
                    bar.update(job, rate=f"{rate:.1f} it/s", status=f"loss {loss_v:.4g}  {shown}E[log r] {mean_log_r:.3f}")
    except KeyboardInterrupt:
        partial = out.with_name(out.stem + ".partial.safetensors")
        save_checkpoint(partial, last_good, meta(last_good_step, status="interrupted"))
        log.close()
        raise Interrupted(f"interrupted at step {step}: the last logged state (step {last_good_step}) is in {partial}") from None
    seconds = timer.elapsed
    save_checkpoint(out, finetuned_tensors(policy, prior, algo, scalar),
                    meta(cfg.steps, seconds=round(seconds, 1), median_step_s=round(statistics.median(step_seconds), 4)))
    log.commit()
    return FinetuneResult(out, log_path, algo, cfg.steps, seconds, cfg.steps / seconds, loss_v, learned_log_z(), mean_log_r,
                          step_seconds)
