"""Prior pretraining by maximum likelihood on bridge trajectories (docs/maths.md#pretraining).

The objective is the expected negative log-likelihood of Brownian-bridge trajectories drawn from
the data and pinned at x_0 = 0,

    L(theta) = E_{x_T ~ data, tau ~ p_B(. | x_T)} [ -sum_i log N(x_{i+1}; x_i + dt f(x_i, t_i), sigma2 dt I) ].

Two unbiased estimators of its gradient (`pretrain.estimator` in the preset):

- `trajectory` (the authors'): B whole bridge trajectories per step, the NLL of all T steps.
- `pairs` (default): each term's Brownian increment is replaced by its conditional mean given
  (x_i, x_T) (Rao-Blackwell), E[x_{i+1} | x_i, x_T] = x_i + dt (x_T - x_i) / (1 - t_i), which
  changes the loss by a constant only; a term then needs just (x_T, t_i, x_i), and x_i | x_T is
  the bridge marginal N(t_i x_T, sigma2 t_i (1 - t_i) I). So a step draws B*T independent triples
  (the network work of B trajectories) and regresses f(x_i, t_i) on (x_T - x_i) / (1 - t_i):
  the same objective and expected gradient, without the Brownian noise and without the
  correlation of T terms that share one x_T. On the reference task it reaches in 2,500 steps
  what the trajectory estimator reaches in 5,000 (see the README).

Every random draw of a step is made for the global batch from the run's generator; with several
processes each rank keeps its share and the partial gradients are summed (`rtbcli.distributed`).

`elbo` in the log is mean(log p_F(tau) - log p_B(tau | x)) on fresh bridge trajectories: a lower
bound on E_data[log p_theta(x)], which approaches -H(p_data) (`data_log_prob`) as the prior fits.
With `pretrain.ema` > 0 the saved weights are an exponential moving average of the trained ones.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import base_metadata, sampler_tensors, save_checkpoint
from .config import Preset
from .data import samples_for_check, scale_advice
from .distributed import Dist
from .errors import InputError, Interrupted, RtbcliWarning, RunError
from .runtime import JsonlLog, Timer, atomic_group, make_generator, make_progress
from .sampler import DiffusionSampler, bridge_log_prob, bridge_sample
from .state import load_state, restore_optimizer, save_state
from .tasks import Task
from .training import RunPaths, StopSignals, config_differences, earlier_log, learning_rate, new_run_id, resume_command


@dataclass
class PretrainResult:
    out: Path
    log: Path | None
    steps: int
    first_step: int
    seconds: float
    steps_per_s: float
    loss: float
    elbo: float
    data_log_prob: float | None  # E_data log p_data(x), where the data density is known
    step_seconds: list[float]  # wall time of every step of this session (host clock, with its logging), for benchmarks;
    # on CUDA a step's kernels may still run after it unless it logged (a host sync): log every step to time CUDA steps


def _share(x: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    rank, world = shard
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def pairs_loss(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Rao-Blackwellised bridge NLL (up to a constant) from n independent (x_T, t_i, x_i) triples.

        i ~ U{0..T-1},  x_T ~ data,  x_i ~ N(t_i x_T, sigma2 t_i (1 - t_i) I)
        loss = T * mean dt |(x_T - x_i) / (1 - t_i) - f(x_i, t_i)|^2 / (2 sigma2)   (per trajectory)

    With `shard` = (rank, world) the n triples are the global batch: this rank scores its share
    and returns its part of the global mean.
    """
    T, sigma2, dt = sampler.steps, sampler.sigma2, sampler.dt
    w = sampler.net.state.weight
    i = _share(torch.randint(0, T, (n,), generator=gen, device=w.device), shard)
    t = (i.to(w.dtype) / T)[:, None]
    x_end = _share(task.data.sample(n, gen, dtype=w.dtype, device=w.device), shard)
    eps = _share(torch.randn(n, sampler.dim, generator=gen, dtype=w.dtype, device=w.device), shard)
    x = t * x_end + torch.sqrt(sigma2 * t * (1 - t)) * eps
    target = (x_end - x) / (1 - t)
    drift = sampler.net(x, sampler.time_table()[i])  # the time table: T rows, gathered
    sq = (target - drift).pow(2).sum(-1)
    return T * dt * (sq.mean() if shard[1] == 1 else sq.sum() / n) / (2 * sigma2)


def trajectory_loss(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """-mean log p_F(tau) over n whole bridge trajectories from the data (the authors' estimator)."""
    w = sampler.net.state.weight
    x = task.data.sample(n, gen, dtype=w.dtype, device=w.device)
    traj = bridge_sample(x, sampler.steps, sampler.sigma2, gen)  # drawn for the global batch ...
    lp = sampler.log_prob(traj[:, shard[0] * (n // shard[1]):(shard[0] + 1) * (n // shard[1])])  # ... this rank's share
    return -(lp.mean() if shard[1] == 1 else lp.sum() / n)


@torch.no_grad()
def bridge_elbo(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator) -> float:
    """mean(log p_F(tau) - log p_B(tau | x)) over n fresh bridge trajectories: <= E_data log p_theta(x)."""
    w = sampler.net.state.weight
    traj = bridge_sample(task.data.sample(n, gen, dtype=w.dtype, device=w.device), sampler.steps, sampler.sigma2, gen)
    return float((sampler.log_prob(traj) - bridge_log_prob(traj, sampler.sigma2)).mean())


def new_sampler(preset: Preset, seed: int, device) -> DiffusionSampler:
    """A freshly initialised sampler; the initialisation draws from its own seeded RNG, leaving torch's global one alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusionSampler.from_spec(preset.dim, preset.sampler).to(device)


def check_resumable(checkpoint, preset: Preset, device: torch.device):
    if checkpoint.kind != "prior":
        raise InputError(f"'{checkpoint.path}' is a finetuned checkpoint: resume it with `rtbcli finetune --resume`")
    state = load_state(checkpoint.path, "pretrain")
    if state.meta.get("run_id") != checkpoint.meta.get("run_id") or state.step != checkpoint.step:
        raise InputError(f"the state file beside '{checkpoint.path}' belongs to another run or step: resume from the checkpoint it was saved with")
    saved, mine = state.preset(), preset.updated("pretrain", steps=state.preset().pretrain.steps)
    if saved != mine:
        diff = ", ".join(config_differences(saved.model_dump(), mine.model_dump()))
        raise InputError(f"--resume continues a run under its own preset, but the preset given differs ({diff}): leave out --preset "
                         f"and other settings except --steps")
    if state.meta.get("device") != device.type:
        raise InputError(f"the run was on {state.meta.get('device')}, its random state cannot continue on {device.type}: "
                         f"resume with --device {state.meta.get('device')}")
    if preset.pretrain.steps <= state.step:
        raise InputError(f"the run is at step {state.step}; --steps {preset.pretrain.steps} would end it before that: give a larger total")
    return state


def pretrain(preset: Preset, preset_ref: str, out: Path, *, seed: int = 0, device: torch.device = torch.device("cpu"),
             log_path: Path | None = None, log_every: int = 100, progress: bool = True, resume_from=None, save_every: int = 1000,
             dist: Dist | None = None) -> PretrainResult:
    """Train a prior sampler on the preset's data and save it to `out` (atomically).

    `resume_from` (a prior checkpoint with its state file) continues that run exactly, to
    `preset.pretrain.steps` in all.
    """
    dist = dist or Dist()
    cfg = preset.pretrain
    dist.check_batch(cfg.batch_size)
    state = check_resumable(resume_from, preset, device) if resume_from is not None else None
    task = Task(preset, allow_import=False).to(device)  # pretraining never calls the reward
    if dist.is_main and state is None:
        advice = scale_advice(samples_for_check(task.data, 5000, seed), preset.sampler.sigma2)
        if advice:
            warnings.warn(advice, RtbcliWarning, stacklevel=2)
    sampler = new_sampler(preset, seed, device)
    ema = copy.deepcopy(sampler).requires_grad_(False) if cfg.ema > 0 else None
    kept = ema if ema is not None else sampler  # what is logged and saved
    gen = make_generator(seed, device)
    check_gen = make_generator(seed + 1, device)  # the logged ELBO's own draws
    opt = torch.optim.Adam(sampler.parameters(), lr=cfg.lr)
    batch_loss = pairs_loss if cfg.estimator == "pairs" else trajectory_loss
    n = cfg.batch_size * (preset.sampler.steps if cfg.estimator == "pairs" else 1)
    first, run_id, log_lines = 0, new_run_id(), []
    if state is not None:
        sampler.load_state_dict(state.section("param.policy"))
        if ema is not None:
            ema.load_state_dict(state.section("ema"))
        restore_optimizer(opt, state.tensors, state.adam_groups)
        gen.set_state(state.generator_state("data"))
        check_gen.set_state(state.generator_state("check"))
        first, run_id, seed = state.step, state.meta["run_id"], int(state.meta["seed"])
        log_lines = earlier_log(state, resume_from.path)
    paths, main, shard = RunPaths(Path(out)), dist.is_main, (dist.rank, dist.world)
    data_lp = float(task.data_log_prob(samples_for_check(task.data, 20_000, seed + 2)).mean()) if task.data_is_exact else None

    def save(path: Path, step: int, status: str, log_to: Path | None, loss_v: float, elbo: float) -> None:
        if not main:
            return
        run = {"command": "pretrain", "device": device.type, "seed": seed, "steps": cfg.steps, "run_id": run_id, "status": status,
               "processes": dist.world, "out": str(paths.out)}
        meta = base_metadata("prior", preset, preset_ref, step, seed, run)
        meta.update(final_loss=f"{loss_v:.6g}", final_elbo=f"{elbo:.6g}", seconds=f"{timer.elapsed:.1f}", run_id=run_id)
        save_checkpoint(path, sampler_tensors(kept, "policy"), meta)
        state_meta = {"kind": "pretrain", "run_id": run_id, "step": step, "planned_steps": cfg.steps, "seed": seed, "device": device.type,
                      "config": preset.model_dump_json(), "preset": preset_ref, "lr_schedule": cfg.lr_schedule, "log": str(log_to) if log_to else ""}
        extra = {f"ema.{k}": v for k, v in ema.state_dict().items()} if ema is not None else {}
        save_state(RunPaths(path).state, params={f"policy.{k}": v for k, v in sampler.state_dict().items()}, opt=opt,
                   generators={"data": gen, "check": check_gen}, meta=state_meta, extra=extra)

    log = JsonlLog(log_path if main else None, preamble=log_lines)
    timer = Timer()
    loss_v = elbo = float("nan")
    step_seconds: list[float] = []
    with StopSignals() as signals, make_progress(enabled=progress and main) as bar:
        job = bar.add_task("pretrain", total=cfg.steps, completed=first, rate="", status="")
        for step in range(first + 1, cfg.steps + 1):
            t_step = time.perf_counter()
            lr = learning_rate(step - 1, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = batch_loss(sampler, task, n, gen, shard)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.sum_grads(list(sampler.parameters()))
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), sampler.parameters()):
                        pe.lerp_(p, 1.0 - cfg.ema)
            bar.advance(job)
            if step % log_every == 0 or step == cfg.steps:
                loss_v = dist.sum(loss).item()  # the global loss; the host syncs of the loop, at logging time only
                if not math.isfinite(loss_v):  # the same on every rank
                    log.close()
                    raise RunError(f"pretraining diverged at step {step} (loss {loss_v}): nothing was saved; lower --lr", every_rank=True)
                elbo = bridge_elbo(kept, task, 256, check_gen) if main else float("nan")
                rate = (step - first) / timer.elapsed
                log.write(step=step, loss=loss_v, elbo=elbo, data_log_prob=data_lp, lr=lr, steps_per_s=rate, seconds=timer.elapsed)
                status = f"loss {loss_v:.3f}  elbo {elbo:.3f}" + (f" (data {data_lp:.3f})" if data_lp is not None else "")
                bar.update(job, rate=f"{rate:.1f} it/s", status=status)
            step_seconds.append(time.perf_counter() - t_step)  # with its logging: on CUDA, its host sync
            if step < cfg.steps and dist.any(signals.requested is not None):
                with atomic_group():  # checkpoint, state and log of one step, put in place together
                    save(paths.partial, step, "interrupted", paths.partial_log, loss_v, elbo)
                    log.snapshot(paths.partial_log if main else None)
                log.discard()  # the partial log holds its records
                dist.barrier()
                raise Interrupted(f"{signals.name} at step {step} of {cfg.steps}: saved to {paths.partial}; continue with "
                                  f"`{resume_command('pretrain', paths.partial, preset, device)}`", signals.exit_code)
            if save_every and step % save_every == 0 and step < cfg.steps:
                with atomic_group():  # checkpoint, state and log of one step, put in place together
                    save(paths.partial, step, "running", paths.partial_log, loss_v, elbo)
                    log.snapshot(paths.partial_log if main else None)
    seconds = timer.elapsed
    with atomic_group():  # the checkpoint and its state together
        save(paths.out, cfg.steps, "finished", log_path, loss_v, elbo)
    if main:
        log.commit()
        paths.remove_partial()
    ran = cfg.steps - first
    return PretrainResult(paths.out, log_path, cfg.steps, first, seconds, ran / seconds if seconds > 0 else 0.0, loss_v, elbo, data_lp,
                          step_seconds)
