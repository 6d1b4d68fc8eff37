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

The learning-rate schedule is a function of the step and of the run's original planned length N
(kept in its state): a resumed run continues it exactly, a run extended past N stays at lr_final
(`rtbcli.trainer`).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import sampler_tensors
from .checkpointer import RunInfo, save_run, schedule_steps
from .config import Preset
from .data import samples_for_check, scale_advice
from .distributed import Dist
from .errors import RtbcliWarning, RunError
from .gaussian import centred_log_prob
from .networks import Network, attach_network, make_sampler, network_of, recorded
from .rollout import fused_layout, rows_backward
from .runtime import JsonlLog, make_generator
from .sampler import DiffusionSampler, matmul_context
from .state import RunState, restore_optimizer
from .tasks import Task
from .trainer import Recipe, Schedule, learning_rate, run_loop
from .trainer_checks import check_pretrain_resumable
from .training import RunPaths, earlier_log, new_run_id


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
    return x[rank * n : (rank + 1) * n]


def pairs_loss(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Rao-Blackwellised bridge NLL (up to a constant) from n independent (x_T, t_i, x_i) triples.

        i ~ U{0..T-1},  x_T ~ data,  x_i ~ N(t_i x_T, sigma2 t_i (1 - t_i) I)
        loss = T * mean dt |(x_T - x_i) / (1 - t_i) - f(x_i, t_i)|^2 / (2 sigma2)   (per trajectory)

    With `shard` = (rank, world) the n triples are the global batch: this rank scores its share
    and returns its part of the global mean.
    """
    i, x, target, dt = _pairs(sampler, task, n, gen, shard)
    drift = sampler.drift(x, i)  # DriftNet: the time table's T rows, gathered
    sq = (target - drift).pow(2).sum(-1)
    return _weighted_mean(sq, dt, sampler.steps, n, shard) / (2 * sampler.sigma2)


def _pairs(
    sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """The draws of `pairs_loss`: this rank's step indices i, states x_i, regression targets and dt (`_times_at`)."""
    T, sigma2 = sampler.steps, sampler.sigma2
    w = sampler.anchor
    i = _share(torch.randint(0, T, (n,), generator=gen, device=w.device), shard)
    t, rest, dt = _times_at(sampler, i, w.dtype)
    x_end = _share(task.data.sample(n, gen, dtype=w.dtype, device=w.device), shard)
    eps = _share(torch.randn(n, sampler.dim, generator=gen, dtype=w.dtype, device=w.device), shard)
    x = t * x_end + torch.sqrt(sigma2 * t * rest) * eps
    return i, x, (x_end - x) / rest, dt


def pairs_backward(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """`pairs_loss` (the same draws and value) with its gradient accumulated into .grad by hand
    (`rtbcli.rollout.rows_backward`, for a DriftNet); returns the loss, detached.

    dL/df = -T dt_i (target - f) / (n sigma2) for each pair."""
    i, x, target, dt = _pairs(sampler, task, n, gen, shard)
    scale = -sampler.steps / (n * sampler.sigma2)

    def loss_and_grad(drift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = target.sub_(drift)  # target - f
        loss = _weighted_mean(diff.pow(2).sum(-1), dt, sampler.steps, n, shard) / (2 * sampler.sigma2)
        return loss, diff.mul_(scale * dt if isinstance(dt, float) else scale * dt[:, None])

    return rows_backward(sampler, x, i, loss_and_grad)


def _times_at(sampler: DiffusionSampler, i: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """(t_i, 1 - t_i, dt_i) at step indices i (n,): t_i and 1 - t_i (n, 1), and dt the float 1 / T on the uniform grid,
    else dt_i (n,). Off the uniform grid 1 - t_i and dt_i come from the float64 grid (`TimeGrid.times`)."""
    if sampler.uniform:
        t = (i.to(dtype) / sampler.steps)[:, None]
        return t, 1 - t, 1.0 / sampler.steps
    grid = sampler.grid64()
    g = grid[i]
    return g.to(dtype)[:, None], (1 - g).to(dtype)[:, None], grid.diff()[i].to(dtype)


def _weighted_mean(sq: torch.Tensor, dt: float | torch.Tensor, T: int, n: int, shard: tuple[int, int]) -> torch.Tensor:
    """T * mean(dt_i * sq) over the global batch of n (this rank's part of it): the sum over the T steps, estimated."""
    if isinstance(dt, float):
        return T * dt * (sq.mean() if shard[1] == 1 else sq.sum() / n)
    sq = sq * dt
    return T * (sq.mean() if shard[1] == 1 else sq.sum() / n)


BOX_SPREAD = 3.0  # the box term's states: the bridge marginal with its standard deviation times this
BOX_SAMPLES = 100_000  # data points whose range is the box (all rows of smaller data sets)


def data_box(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (d,): the per-coordinate range of the data (of BOX_SAMPLES draws from a fixed generator, or
    of every row), in the sampler's dtype and device."""
    rows = samples_for_check(task.data, BOX_SAMPLES, 0)
    return rows.min(0).values, rows.max(0).values


def box_loss(
    sampler: DiffusionSampler,
    task: Task,
    box: tuple[torch.Tensor, torch.Tensor],
    n: int,
    gen: torch.Generator,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """The box term (docs/maths.md#pretraining): zero for the exact drift, positive where the network extrapolates outward.

    The exact drift is f*(x, t) = (E[x_T | x_t = x] - x) / (1 - t), so its implied endpoint m = x + (1 - t) f*(x, t)
    is a mean of data points and lies in the data's bounding box [lo, hi] at *every* x, also where no bridge goes
    and the NLL says nothing. On n states from the bridge marginal widened BOX_SPREAD times,

        i ~ U{0..T-1},  x_T ~ data,  x ~ N(t_i x_T, BOX_SPREAD^2 sigma2 t_i (1 - t_i) I),  m = x + (1 - t_i) f(x, t_i)
        loss = T * mean dt |dist(m, [lo, hi])|^2 / ((1 - t_i)^2 2 sigma2)

    in the NLL's units (the pairs loss's residual (x_T - m) / (1 - t_i) is at least this long, as x_T is in the box).
    """
    T, sigma2 = sampler.steps, sampler.sigma2
    w = sampler.anchor
    i = _share(torch.randint(0, T, (n,), generator=gen, device=w.device), shard)
    t, rest, dt = _times_at(sampler, i, w.dtype)
    x_end = _share(task.data.sample(n, gen, dtype=w.dtype, device=w.device), shard)
    eps = _share(torch.randn(n, sampler.dim, generator=gen, dtype=w.dtype, device=w.device), shard)
    x = t * x_end + BOX_SPREAD * torch.sqrt(sigma2 * t * rest) * eps
    sq = box_residuals(sampler, x, i, box)
    return _weighted_mean(sq, dt, T, n, shard) / (2 * sigma2)


def box_residuals(sampler: DiffusionSampler, x: torch.Tensor, i: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """|dist(x + (1 - t_i) f(x, t_i), [lo, hi])|^2 / (1 - t_i)^2 for states x (n, d) at steps i (n,): shape (n,)."""
    rest = _times_at(sampler, i, x.dtype)[1]  # 1 - t_i
    m = x + rest * sampler.net(x, sampler.time_table()[i])
    lo, hi = (b.to(x.dtype) for b in box)
    out = (lo - m).clamp_min(0) + (m - hi).clamp_min(0)
    return (out / rest).pow(2).sum(-1)


def trajectory_loss(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """-mean log p_F(tau) over n whole bridge trajectories from the data (the authors' estimator)."""
    lp = sampler.log_prob(_bridges(sampler, task, n, gen, shard))
    return -(lp.mean() if shard[1] == 1 else lp.sum() / n)


def _bridges(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int]) -> torch.Tensor:
    """The draws of `trajectory_loss`: this rank's share (T + 1, n / world, d) of n bridge trajectories from the data."""
    w = sampler.anchor
    x = task.data.sample(n, gen, dtype=w.dtype, device=w.device)
    traj = sampler.backward_sample(x, gen)  # the pinned bridge, drawn for the global batch ...
    return traj[:, shard[0] * (n // shard[1]) : (shard[0] + 1) * (n // shard[1])]  # ... this rank's share


def trajectory_backward(
    sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """`trajectory_loss` (the same draws and value) with its gradient accumulated into .grad by hand
    (`rtbcli.rollout.rows_backward`, for a DriftNet); returns the loss, detached.

    With the residual r_i = x_{i+1} - x_i - dt_i f(x_i, t_i), d log p_F / d f_i = r_i / sigma2, so
    dL/df_i = -r_i / (n sigma2) at each of the T * n transitions."""
    traj = _bridges(sampler, task, n, gen, shard)
    T, m, d = traj.shape[0] - 1, traj.shape[1], traj.shape[2]

    def loss_and_grad(drift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = traj[1:] - traj[:-1] - sampler.dt * drift.reshape(T, m, d)
        loss = -centred_log_prob(residual, sampler.step_var).sum() / n
        return loss, residual.mul_(-1.0 / (n * sampler.sigma2)).reshape(-1, d)

    return rows_backward(sampler, traj[:-1].reshape(-1, d), None, loss_and_grad)  # row t * m + b: x_t of path b


ELBO_ELEMENTS = 2**25  # the logged ELBO's trajectories are drawn in chunks of at most this many values (128 MB in float32)


@torch.no_grad()
def bridge_elbo(sampler: DiffusionSampler, task: Task, n: int, gen: torch.Generator) -> float:
    """mean(log p_F(tau) - log p_B(tau | x)) over n fresh bridge trajectories: <= E_data log p_theta(x).

    In one batch where n (T + 1) d values fit in ELBO_ELEMENTS, else in chunks of trajectories (at d = 20,000 one
    batch of 256 needed 8 GB; the chunks draw their bridges one after another, so the value differs, not its law)."""
    w = sampler.anchor
    x = task.data.sample(n, gen, dtype=w.dtype, device=w.device)
    per = max(1, ELBO_ELEMENTS // ((sampler.steps + 1) * sampler.dim))
    if per >= n:
        traj = sampler.backward_sample(x, gen)
        return float((sampler.log_prob(traj) - sampler.backward_log_prob(traj)).mean())
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for part in x.split(per):
        traj = sampler.backward_sample(part, gen)
        total += (sampler.log_prob(traj) - sampler.backward_log_prob(traj)).double().sum()
    return float(total / n)


def new_sampler(preset: Preset, seed: int, device, network: Network | None = None) -> DiffusionSampler:
    """A freshly initialised sampler (of the user's `network` class where the preset names one); the initialisation
    draws from its own seeded RNG, leaving torch's global one alone."""
    if preset.sampler.network is not None:
        assert network is not None, "the preset names a network: load it (rtbcli.networks.network_of)"
        return make_sampler(preset.sampler, preset.dim, network, seed).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusionSampler.from_spec(preset.dim, preset.sampler).to(device)


@dataclass
class PretrainRun:
    """A pretraining run between steps: what `setup` builds and `train_step` advances."""

    sampler: DiffusionSampler  # trained
    ema: DiffusionSampler | None  # its moving average (pretrain.ema > 0), what is saved
    opt: torch.optim.Adam
    sched: torch.optim.lr_scheduler.LambdaLR | None
    gen: torch.Generator  # every draw of a step
    check_gen: torch.Generator  # the logged ELBO's own draws
    task: Task
    info: RunInfo
    step: int = 0
    seconds: float = 0.0  # training time to `step` (a resumed run's earlier sessions)
    log_lines: tuple[str, ...] = ()
    box: tuple[torch.Tensor, torch.Tensor] | None = None  # the data's range, for the box term (pretrain.box_weight > 0)

    @property
    def kept(self) -> DiffusionSampler:
        """What is logged and saved: the moving average, or the trained sampler."""
        return self.ema if self.ema is not None else self.sampler


def train_step(run: PretrainRun, dist: Dist) -> torch.Tensor:
    """One step: the estimator's loss on a fresh global batch, one Adam step, the moving average.
    Returns this process's share of the loss (on the device)."""
    cfg = run.info.preset.pretrain
    by_hand = fused_layout(run.sampler.net)  # a DriftNet: the loss's gradient by hand, now (`rtbcli.rollout.rows_backward`)
    if cfg.estimator == "pairs":
        batch_loss, n = (pairs_backward if by_hand else pairs_loss), cfg.batch_size * run.sampler.steps
    else:
        batch_loss, n = (trajectory_backward if by_hand else trajectory_loss), cfg.batch_size
    run.opt.zero_grad(set_to_none=True)
    with matmul_context(cfg.matmul_dtype, run.sampler.anchor.device):
        loss = batch_loss(run.sampler, run.task, n, run.gen, (dist.rank, dist.world))
    if cfg.box_weight > 0:
        assert run.box is not None, "setup finds the box"
        nb = max(cfg.batch_size * run.sampler.steps // 4, dist.world)  # a quarter of the pairs estimator's work
        loss = loss + cfg.box_weight * box_loss(run.sampler, run.task, run.box, nb - nb % dist.world, run.gen, (dist.rank, dist.world))
    if loss.requires_grad:  # the autograd estimators, and the box term
        loss.backward()
    dist.sum_grads(list(run.sampler.parameters()))
    run.opt.step()
    assert run.sched is not None, "setup builds the schedule"
    run.sched.step()
    run.step += 1
    if run.ema is not None:
        ema_update(run.ema, run.sampler, cfg.ema)
    return loss.detach()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)


def setup(
    preset: Preset,
    preset_ref: str,
    out: Path,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    resume_from=None,
    dist: Dist | None = None,
    network: Network | None = None,
) -> PretrainRun:
    """The run object: a freshly initialised sampler, or (`resume_from`, a prior checkpoint with
    its state file) the saved run, restored exactly (the settings checked first). `network`: the
    class of a preset's [sampler] network (default: imported from the preset's reference; a resumed
    run's is the one attached to its checkpoint, `rtbcli.networks.attach_network`)."""
    dist, cfg = dist or Dist(), preset.pretrain
    if network is None and preset.sampler.network is not None:
        if resume_from is not None:
            if resume_from.network is None:
                attach_network(resume_from, None)  # the one-line error naming --network
            network = resume_from.network
        else:
            network = network_of(preset)
    if resume_from is None:
        preset = recorded(preset, network)  # the network file's SHA-256, with the run's config
    dist.check_batch(cfg.batch_size)
    state = check_pretrain_resumable(resume_from, preset, device) if resume_from is not None else None
    task = Task(preset, allow_import=False).to(device)  # pretraining never calls the reward
    if dist.is_main and state is None:
        advice = scale_advice(samples_for_check(task.data, 5000, seed), preset.sampler.sigma2)
        if advice:
            warnings.warn(advice, RtbcliWarning, stacklevel=3)
    if state is not None:
        seed = int(state.meta["seed"])
    sampler = new_sampler(preset, seed, device, network)
    ema = copy.deepcopy(sampler).requires_grad_(False) if cfg.ema > 0 else None
    info = RunInfo(
        "pretrain",
        new_run_id() if state is None else state.meta["run_id"],
        seed,
        device,
        preset,
        preset_ref,
        cfg.steps,
        cfg.steps if state is None else schedule_steps(state),
        dist.world,
        Path(out),
        state_meta={"lr_schedule": cfg.lr_schedule},
    )
    opt = torch.optim.Adam(sampler.parameters(), lr=cfg.lr)
    run = PretrainRun(sampler, ema, opt, None, make_generator(seed, device), make_generator(seed + 1, device), task, info)
    if cfg.box_weight > 0:
        run.box = tuple(b.to(device) for b in data_box(task))  # type: ignore[assignment]
    if state is not None:
        restore(run, state, resume_from.path)
    run.sched = Schedule(cfg, info.schedule_steps).scheduler(opt, run.step)
    return run


def restore(run: PretrainRun, state: RunState, checkpoint: Path) -> None:
    """Continue exactly where the saved run stopped: weights, moving average, Adam, generators, step, log."""
    run.sampler.load_state_dict(state.section("param.policy"))
    if run.ema is not None:
        run.ema.load_state_dict(state.section("ema"))
    for g in run.opt.param_groups:  # the schedule's base lr (a version-1 state saved only the scheduled one)
        g["initial_lr"] = g["lr"]
    restore_optimizer(run.opt, state.tensors, state.adam_groups)
    run.gen.set_state(state.generator_state("data"))
    run.check_gen.set_state(state.generator_state("check"))
    run.step, run.seconds, run.log_lines = state.step, state.seconds, tuple(earlier_log(state, checkpoint))


class PretrainRecipe(Recipe):
    """Pretraining as `run_loop` drives it: its step, its log record, its files."""

    command, name = "pretrain", "pretrain"

    def __init__(self, run: PretrainRun, dist: Dist, log: JsonlLog):
        self.run, self.dist, self.log = run, dist, log
        self.preset, self.device, self.total, self.first = run.info.preset, run.info.device, run.info.steps, run.step
        self.seconds_before = run.seconds
        self.loss = self.elbo = float("nan")
        task, seed = run.task, run.info.seed
        self.data_lp = float(task.data_log_prob(samples_for_check(task.data, 20_000, seed + 2)).mean()) if task.data_is_exact else None

    def step(self) -> torch.Tensor:
        return train_step(self.run, self.dist)

    def record(self, loss: torch.Tensor, step: int, rate: float, seconds: float) -> tuple[dict, str]:
        self.loss = self.dist.sum(loss).item()  # the global loss; the host syncs of the loop, at logging time only
        if not math.isfinite(self.loss):  # the same on every rank
            self.log.close()
            raise RunError(f"pretraining diverged at step {step} (loss {self.loss}): nothing was saved; lower --lr", every_rank=True)
        r = self.run
        self.elbo = bridge_elbo(r.kept, r.task, 256, r.check_gen) if self.dist.is_main else float("nan")
        lr = learning_rate(step - 1, r.info.preset.pretrain, r.info.schedule_steps)  # the schedule's lr of this step
        rec = {
            "step": step,
            "loss": self.loss,
            "elbo": self.elbo,
            "data_log_prob": self.data_lp,
            "lr": lr,
            "steps_per_s": rate,
            "seconds": seconds,
        }
        status = f"loss {self.loss:.3f}  elbo {self.elbo:.3f}" + (f" (data {self.data_lp:.3f})" if self.data_lp is not None else "")
        return rec, status

    def save(self, path: Path, step: int, status: str, log_to: Path | None) -> None:
        if not self.dist.is_main:
            return
        r = self.run
        top = {"final_loss": f"{self.loss:.6g}", "final_elbo": f"{self.elbo:.6g}", "seconds": f"{self.timer.total:.1f}"}
        extra = {f"ema.{k}": v for k, v in r.ema.state_dict().items()} if r.ema is not None else {}
        save_run(
            path,
            r.info,
            step,
            status,
            log_to,
            tensors=sampler_tensors(r.kept, "policy"),
            params={f"policy.{k}": v for k, v in r.sampler.state_dict().items()},
            opt=r.opt,
            generators={"data": r.gen, "check": r.check_gen},
            extra=extra,
            top=top,
            seconds=self.timer.total,
        )


def pretrain(
    preset: Preset,
    preset_ref: str,
    out: Path,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    log_path: Path | None = None,
    log_every: int = 100,
    progress: bool = True,
    resume_from=None,
    save_every: int = 1000,
    dist: Dist | None = None,
    network: Network | None = None,
) -> PretrainResult:
    """Train a prior sampler on the preset's data and save it to `out` (atomically).

    `resume_from` (a prior checkpoint with its state file) continues that run exactly, to
    `preset.pretrain.steps` in all (the schedule keeps the run's original length).
    """
    dist = dist or Dist()
    run = setup(preset, preset_ref, out, seed=seed, device=device, resume_from=resume_from, dist=dist, network=network)
    log = JsonlLog(log_path if dist.is_main else None, preamble=list(run.log_lines))
    recipe = PretrainRecipe(run, dist, log)
    done = run_loop(recipe, RunPaths(Path(out)), log, log_path, dist, log_every=log_every, save_every=save_every, progress=progress)
    ran, s = run.info.steps - recipe.first, done.seconds
    return PretrainResult(
        Path(out),
        log_path,
        run.info.steps,
        recipe.first,
        s,
        ran / s if s > 0 else 0.0,
        recipe.loss,
        recipe.elbo,
        recipe.data_lp,
        done.step_seconds,
    )
