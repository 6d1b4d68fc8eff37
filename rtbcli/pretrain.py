"""Prior pretraining by maximum likelihood on bridge trajectories (design.md §2).

Each step draws a batch of data points x ~ p_data, a Brownian-bridge trajectory from each back
to x_0 = 0 (p_B, exact and vectorised), and minimises the negative log-likelihood of those
trajectories under the forward sampler, -mean log p_F(tau). Since log p_F(tau) - log p_B(tau | x)
is a lower bound on log p_F(x), the logged `elbo` = mean(log p_F - log p_B) estimates a lower
bound on E_data[log p_theta(x)] and approaches -H(p_data) (the logged `data_log_prob`) as the
prior fits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import base_metadata, sampler_tensors, save_checkpoint
from .config import Preset
from .errors import RunError
from .runtime import JsonlLog, Timer, make_generator, make_progress
from .sampler import DiffusionSampler, bridge_log_prob, bridge_sample
from .tasks import Task


@dataclass
class PretrainResult:
    out: Path
    log: Path | None
    steps: int
    seconds: float
    steps_per_s: float
    nll: float
    elbo: float
    data_log_prob: float
    step_seconds: list[float]  # wall time of every step (host clock), for benchmarks


def cosine_lr(step: int, total: int, lr: float, lr_final: float) -> float:
    """Cosine decay from lr (step 0) to lr_final (last step)."""
    return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * min(step, total) / total))


def pretrain(preset: Preset, preset_ref: str, out: Path, *, seed: int = 0, device: torch.device = torch.device("cpu"),
             log_path: Path | None = None, log_every: int = 100, progress: bool = True) -> PretrainResult:
    """Train a prior sampler on the preset's data and save it to `out` (atomically)."""
    cfg = preset.pretrain
    task = Task(preset)
    torch.manual_seed(seed)  # network initialisation
    sampler = DiffusionSampler.from_spec(task.dim, preset.sampler).to(device)
    gen = make_generator(seed, device)
    opt = torch.optim.Adam(sampler.parameters(), lr=cfg.lr)
    T, sigma2 = preset.sampler.steps, preset.sampler.sigma2
    log = JsonlLog(log_path)
    data_lp = float(task.data_log_prob(task.prior_data.sample(20_000, make_generator(seed + 1, torch.device("cpu")), dtype=torch.float64)).mean())
    timer = Timer()
    nll = elbo = float("nan")
    step_seconds: list[float] = []
    with make_progress(enabled=progress) as bar:
        job = bar.add_task("pretrain", total=cfg.steps, rate="", status="")
        for step in range(1, cfg.steps + 1):
            t_step = time.perf_counter()
            lr = cosine_lr(step - 1, cfg.steps, cfg.lr, cfg.lr_final) if cfg.lr_schedule == "cosine" else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            x = task.prior_data.sample(cfg.batch_size, gen, device=device)
            traj = bridge_sample(x, T, sigma2, gen)
            lpf = sampler.log_prob(traj)
            loss = -lpf.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_seconds.append(time.perf_counter() - t_step)
            bar.advance(job)
            if step % log_every == 0 or step == cfg.steps:
                nll = loss.item()  # the only host sync, at logging time
                elbo = (lpf.detach() - bridge_log_prob(traj, sigma2)).mean().item()
                if not math.isfinite(nll):
                    log.close()
                    raise RunError(f"pretraining diverged at step {step} (loss {nll}): nothing was saved; lower --lr")
                rate = step / timer.elapsed
                log.write(step=step, nll=nll, elbo=elbo, lr=lr, steps_per_s=rate, seconds=timer.elapsed)
                bar.update(job, rate=f"{rate:.1f} it/s", status=f"nll {nll:.2f}  elbo {elbo:.3f} (data {data_lp:.3f})")
    seconds = timer.elapsed
    run = {"command": "pretrain", "device": device.type, "seed": seed}
    meta = base_metadata("prior", preset, preset_ref, cfg.steps, seed, run)
    meta.update(final_nll=f"{nll:.6g}", final_elbo=f"{elbo:.6g}", seconds=f"{seconds:.1f}")
    save_checkpoint(out, sampler_tensors(sampler, "policy"), meta)
    log.commit()
    return PretrainResult(out, log_path, cfg.steps, seconds, cfg.steps / seconds, nll, elbo, data_lp, step_seconds)
