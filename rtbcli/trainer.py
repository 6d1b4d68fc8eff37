"""The training skeleton shared by pretraining and fine-tuning (in the shape of torchtune's
recipes and CleanRL's loops).

A recipe (`rtbcli.pretrain`, `rtbcli.finetune`) has

- `setup(...)`: the run object, fresh or restored from a state file;
- `train_step(run, ...)`: one optimiser step, a pure function of the run object that returns
  the step's statistics as device tensors (no host sync: tests/test_host_syncs.py);

and hands `run_loop` a `Recipe`: what to do at logging time (the only host syncs), how to save,
and what to say when the run diverges. `run_loop` owns the rest: progress, the log, signals,
periodic and final saves, the last-good checkpoint and the exit codes.

Schedules (`Schedule`): the learning rate of every parameter group is its base lr times one
factor (torch.optim.lr_scheduler.LambdaLR), and the exploration s_e of fine-tuning, are
functions of the step and of the run's *original* planned length N (saved in the state file).
A resumed run continues them exactly; a run extended past N (`--resume X --steps M`, M > N)
continues at their final values: lr at lr_final (constant: lr), no exploration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import Dist
from .errors import Interrupted, RunError
from .rewards import RewardFailed
from .runtime import JsonlLog, Timer, atomic_group, make_progress
from .training import RunPaths, StopSignals, resume_command


def learning_rate(step: int, cfg, length: int | None = None) -> float:
    """lr at (0-indexed) `step` of a run planned for `length` steps (default `cfg.steps`), for a
    PretrainSpec or FinetuneSpec: constant; cosine from lr to lr_final; or wsd (constant, then
    linear to lr_final over the last `decay_fraction` of the run). From step `length` on: the
    final value (lr_final; constant: lr)."""
    n = cfg.steps if length is None else length
    step = min(step, n)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * step / n))
    start = n * (1 - cfg.decay_fraction)
    if step < start:
        return cfg.lr
    return cfg.lr + (cfg.lr_final - cfg.lr) * (step - start) / max(n - start, 1)


def exploration_std(it: int, total: int, s0: float, hold: float = 0.1, end: float = 0.9) -> float:
    """s_e at (0-indexed) iteration `it` of a run planned for `total` steps; 0 from its last step on.

    s_e = s0 for it < hold * total, else s0 * max(0, 1 - it / (end * total)) (the authors'
    schedule at total = 5,000, hold = 0.1, end = 0.9)."""
    if it >= total - 1:
        return 0.0
    if it < hold * total:
        return s0
    return s0 * max(0.0, 1.0 - it / (end * total)) if end > 0 else 0.0


def exploration_linear(it: int, s0: float, end_step: int, total: int) -> float:
    """The paper's schedule (gfn-diffusion `--exploration_wd`, end_step = 5,000): s_e = s0 max(0, 1 - it / end_step),
    0 from `end_step` on, and 0 at the last step of a run planned for `total` steps, as every schedule here."""
    if it >= total - 1:
        return 0.0
    return s0 * max(0.0, 1.0 - it / end_step)


@dataclass(frozen=True)
class Schedule:
    """The schedules of a run planned for `length` steps (`cfg`: a PretrainSpec or FinetuneSpec)."""

    cfg: Any
    length: int  # the run's original planned length; an extended run keeps it

    def lr_factor(self, it: int) -> float:
        """The factor of every group's base lr at (0-indexed) step `it`."""
        return learning_rate(it, self.cfg, self.length) / self.cfg.lr

    def exploration(self, it: int) -> float:
        c = self.cfg
        if getattr(c, "exploration_end_step", None) is not None:  # the paper's: linear to 0 at an absolute step
            return exploration_linear(it, c.exploration, c.exploration_end_step, self.length)
        return exploration_std(it, self.length, c.exploration, c.exploration_hold, c.exploration_end)

    def scheduler(self, opt: torch.optim.Optimizer, step: int) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR for the next step `step` (0 for a fresh run): every group's lr is its
        `initial_lr` (set here to its lr when missing: a fresh optimiser) times `lr_factor`."""
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        return torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor, last_epoch=step - 1)


class Recipe:
    """What `run_loop` asks of a recipe (pretraining, fine-tuning); every method runs on every process.

    Attributes: name (the progress bar's label), command ("pretrain" or "finetune": the resume
    command), preset, device, total (the last step), first (the step this session starts from).
    """

    name: str
    command: str
    preset: Any
    device: torch.device
    total: int
    first: int
    seconds_before: float = 0.0  # training time of the sessions a resumed run continues (its state's `seconds`)
    timer: Timer  # set by `run_loop`

    def step(self) -> Any:
        """One training step; its statistics (device tensors: no host sync)."""
        raise NotImplementedError

    def record(self, stats: Any, step: int, rate: float, seconds: float) -> tuple[dict, str]:
        """At logging time (a host sync): check the run (raising a RunError), return the log
        record and the progress line's status."""
        raise NotImplementedError

    def save(self, path: Path, step: int, status: str, log_to: Path | None) -> None:
        """The checkpoint and state of `step` (rank 0 writes)."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict | None:
        """An evaluation record for the log at `step` (`run_loop`'s eval_every), or None; its time is not training time."""
        return None

    def check(self) -> None:
        """Raise a RunError if the run has diverged (before any save)."""

    def resume_hint(self, partial: Path) -> str:
        """What the message of an interrupted run says to do next."""
        return f"continue with `{resume_command(self.command, partial, self.preset, self.device)}`"

    def diverged(self, reason: str, step: int, every_rank: bool) -> RunError:
        """The error of a run whose reward raised (in this process only unless `every_rank`)."""
        return RunError(f"{reason} by step {step}", every_rank=every_rank)


@dataclass
class LoopResult:
    seconds: float
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step (with its logging)


def run_loop(
    r: Recipe,
    paths: RunPaths,
    log: JsonlLog,
    log_path: Path | None,
    dist: Dist,
    *,
    log_every: int,
    save_every: int,
    progress: bool,
    eval_every: int = 0,
) -> LoopResult:
    """Run steps r.first + 1 .. r.total: log every `log_every` steps and at the end, evaluate
    (`Recipe.evaluate`) every `eval_every` steps and at the end, save the partial files every
    `save_every` steps and on SIGINT/SIGTERM (then raise Interrupted), and save the finished run
    (`training` module docstring: the files). The wall time of evaluations is left out of the
    run's time (`seconds`, the step rate)."""
    timer, step_seconds, step = Timer(r.seconds_before), [], r.first
    r.timer = timer  # the run's training time so far (`total`), for what a recipe logs and saves
    try:
        with StopSignals() as signals, make_progress(enabled=progress and dist.is_main) as bar:
            job = bar.add_task(r.name, total=r.total, completed=r.first, rate="", status="")
            for step in range(r.first + 1, r.total + 1):
                t_step = time.perf_counter()
                stats = r.step()
                bar.advance(job)
                if step % log_every == 0 or step == r.total:
                    rate = (step - r.first) / timer.elapsed
                    rec, status = r.record(stats, step, rate, timer.total)
                    log.write(**rec)
                    bar.update(job, rate=f"{rate:.1f} it/s", status=status)
                step_seconds.append(time.perf_counter() - t_step)  # with its logging: on CUDA, its host sync
                if eval_every and (step % eval_every == 0 or step == r.total):
                    t_eval = time.perf_counter()
                    evaluation = r.evaluate(step)
                    timer.start += time.perf_counter() - t_eval  # evaluation is not training time
                    if evaluation is not None:
                        log.write(**evaluation)
                if step < r.total and dist.any(signals.requested is not None):
                    _stop(r, paths, log, dist, signals, step)
                if save_every and step % save_every == 0 and step < r.total:
                    _save_partial(r, paths, log, dist, step, "running")
            # the finished run, still under the handlers: a first signal now is let pass (the run is complete once
            # this is written), a second stops at once and leaves no temporary file; SIGTERM's default ended the
            # process silently here, with the step's files half renamed
            r.check()
            seconds = timer.elapsed
            with atomic_group():  # the checkpoint and its state together
                r.save(paths.out, r.total, "finished", log_path)
            if dist.is_main:
                log.commit()
                paths.remove_partial()
    except RewardFailed as e:  # raised in this process only
        log.close()
        raise r.diverged(str(e), max(step - 1, r.first), False) from None  # by the last step done
    return LoopResult(seconds, step_seconds)


def _save_partial(r: Recipe, paths: RunPaths, log: JsonlLog, dist: Dist, step: int, status: str) -> None:
    with atomic_group():  # checkpoint, state and log of one step, put in place together
        r.save(paths.partial, step, status, paths.partial_log)
        log.snapshot(paths.partial_log if dist.is_main else None)


def _stop(r: Recipe, paths: RunPaths, log: JsonlLog, dist: Dist, signals: StopSignals, step: int) -> None:
    """Save the step reached and raise Interrupted (exit 128 + the signal)."""
    r.check()
    _save_partial(r, paths, log, dist, step, "interrupted")
    log.discard()  # the partial log holds its records
    dist.barrier()
    raise Interrupted(
        f"{signals.name} at step {step} of {r.total}: saved to {paths.partial}; {r.resume_hint(paths.partial)}",
        signals.exit_code,
    )
