"""Pretraining a diffusers UNet2DModel on image data with the DDPM loss (`rtbcli pretrain` on a preset with [sampler.unet]).

The loss is Ho et al. (2020)'s simple epsilon-MSE,

    L(theta) = E_{x0 ~ data, t ~ U{0..N-1}, eps ~ N(0, I)} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2 / d,

with abar_t of the preset's DDPMScheduler ([sampler.scheduler], the schedules `rtbcli.ddpm` supports). It is the
variational bound of the N-step model up to per-step weights, so its minimiser is the same model. The data
are flat rows (B, d), d = C * H * W in C order (`rtbcli.lora`'s convention); they are reshaped for the UNet.

The run is driven by the training skeleton (`rtbcli.trainer.run_loop`) like every other. What it writes is a
diffusers folder (`save_pretrained`: the UNet's config.json and safetensors weights, scheduler_config.json, and
`rtbcli-pretrain.json` with the run's preset, seed, steps and log), so that `rtbcli finetune --prior DIR` and
diffusers itself load it. A folder is written whole to a temporary name and renamed into place. With
`pretrain.ema` > 0 the saved weights are an exponential moving average. An interrupted run leaves DIR.partial
(the weights so far); it does not resume (run it again).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Preset
from .ddpm import Schedule as DDPMSchedule
from .ddpm import schedule_from_config
from .distributed import Dist
from .errors import InputError, RunError
from .lora import UNetEps, require_diffusers
from .pretrain import ema_update
from .runtime import JsonlLog, make_generator, write_folder
from .tasks import Task
from .trainer import Recipe, Schedule, learning_rate, run_loop
from .training import RunPaths

INFO_FILE = "rtbcli-pretrain.json"


def scheduler_config(preset: Preset) -> tuple[dict[str, Any], DDPMSchedule]:
    """The DDPMScheduler config of a [sampler.unet] preset and its schedule (an InputError for what `rtbcli.ddpm` does not support)."""
    cfg = {"_class_name": "DDPMScheduler", **preset.sampler.scheduler}
    return cfg, schedule_from_config(cfg, where=f"preset '{preset.name}' [sampler.scheduler]")


def new_unet(preset: Preset, seed: int) -> UNetEps:
    """A freshly initialised UNet2DModel of the preset's [sampler.unet] (its own seeded RNG), checked against d."""
    diffusers, _ = require_diffusers()
    kwargs = dict(preset.sampler.unet or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet = diffusers.UNet2DModel(**kwargs)
        except Exception as e:
            raise InputError(
                f"preset '{preset.name}': [sampler.unet] does not build a UNet2DModel ({e.__class__.__name__}: {str(e).strip()[:160]}): "
                "fix its arguments (diffusers.UNet2DModel's constructor)"
            ) from None
    eps = UNetEps(unet)
    if eps.dim != preset.dim:
        raise InputError(
            f"preset '{preset.name}': [sampler.unet] makes images of {eps.shape} (d = {eps.dim}), the data have d = {preset.dim}: "
            "set sample_size and in_channels to the data's image shape"
        )
    return eps


def eps_loss(eps: UNetEps, x0: torch.Tensor, abar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The simple DDPM loss on a batch x0 (B, d): mean over the batch and the d coordinates of the squared error."""
    t = torch.randint(0, abar.numel(), (x0.shape[0],), generator=gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device)
    a = abar[t][:, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return (eps(xt, t) - noise).square().mean()


class FolderPaths(RunPaths):
    """The files of a run whose output is a folder: DIR, DIR.partial/ and their logs."""

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def partial_log(self) -> Path:
        return self.out.with_name(self.out.name + ".partial.jsonl")

    def remove_partial(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial_log.unlink(missing_ok=True)


@dataclass
class UNetPretrainResult:
    out: Path
    log: Path | None
    steps: int
    first_step: int
    seconds: float
    steps_per_s: float
    loss: float
    elbo: float  # not computed here (a full N-step pass); `rtbcli evaluate` of a fine-tuned run reports it
    data_log_prob: float | None
    step_seconds: list[float]
    parameters: int


class UNetPretrainRecipe(Recipe):
    """epsilon-MSE pretraining as `run_loop` drives it."""

    command, name = "pretrain", "pretrain"

    log: JsonlLog  # set once everything is checked (a run refused at its start leaves no file)

    def __init__(self, preset: Preset, preset_ref: str, seed: int, device: torch.device):
        self.preset, self.preset_ref, self.seed, self.device = preset, preset_ref, seed, device
        cfg = preset.pretrain
        if cfg.box_weight > 0:
            raise InputError("[pretrain] box_weight applies to rtbcli's bridge sampler, not a UNet: remove it")
        self.sched_config, schedule = scheduler_config(preset)
        self.eps = new_unet(preset, seed).to(device)
        self.ema = copy.deepcopy(self.eps).requires_grad_(False) if cfg.ema > 0 else None
        self.task = Task(preset, allow_import=False)
        abar = torch.cumprod(1 - schedule.betas(), 0)
        self.abar = abar.to(device=device, dtype=torch.float32)
        self.gen = make_generator(seed, device)
        self.opt = torch.optim.Adam(self.eps.parameters(), lr=cfg.lr)
        self.sched = Schedule(cfg, cfg.steps).scheduler(self.opt, 0)
        self.total, self.first, self.loss = cfg.steps, 0, float("nan")

    def step(self) -> torch.Tensor:
        cfg = self.preset.pretrain
        x0 = self.task.data.sample(cfg.batch_size, self.gen, device=self.device)
        loss = eps_loss(self.eps, x0, self.abar, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            ema_update(self.ema, self.eps, cfg.ema)
        return loss.detach()

    def record(self, loss: torch.Tensor, step: int, rate: float, seconds: float) -> tuple[dict, str]:
        self.loss = float(loss)
        if not math.isfinite(self.loss):
            self.log.close()
            raise RunError(f"pretraining diverged at step {step} (loss {self.loss}): nothing was saved; lower --lr")
        lr = learning_rate(step - 1, self.preset.pretrain, self.total)
        return {"step": step, "loss": self.loss, "lr": lr, "steps_per_s": rate, "seconds": seconds}, f"eps-MSE {self.loss:.4f}"

    def resume_hint(self, partial: Path) -> str:
        return "a UNet pretraining run does not resume: run the same command again (that folder holds the weights so far)"

    @property
    def kept(self) -> UNetEps:
        return self.ema if self.ema is not None else self.eps

    def save(self, path: Path, step: int, status: str, log_to: Path | None) -> None:
        diffusers, _ = require_diffusers()
        info = {
            "kind": "prior",
            "status": status,
            "trained_by": "rtbcli pretrain (epsilon-MSE, rtbcli.unet_pretrain)",
            "preset": self.preset_ref,
            "config": json.loads(self.preset.model_dump_json()),
            "seed": self.seed,
            "step": step,
            "steps": self.total,
            "final_loss": self.loss,
            "seconds": round(self.timer.elapsed, 1),
            "log": str(log_to) if log_to is not None else None,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        }

        def fill(tmp: Path) -> None:
            self.kept.unet.save_pretrained(str(tmp), safe_serialization=True)
            diffusers.DDPMScheduler.from_config(self.sched_config).save_pretrained(str(tmp))
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")

        write_folder(path, fill)


def pretrain_unet(
    preset: Preset,
    preset_ref: str,
    out: Path,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    log_path: Path | None = None,
    log_every: int = 100,
    progress: bool = True,
    save_every: int = 1000,
) -> UNetPretrainResult:
    """Train the preset's UNet with the epsilon loss on its data; write the diffusers folder `out`."""
    recipe = UNetPretrainRecipe(preset, preset_ref, seed, device)
    log = recipe.log = JsonlLog(log_path)
    done = run_loop(recipe, FolderPaths(Path(out)), log, log_path, Dist(), log_every=log_every, save_every=save_every, progress=progress)
    n, s = recipe.total, done.seconds
    params = sum(p.numel() for p in recipe.eps.parameters())
    return UNetPretrainResult(
        Path(out), log_path, n, 0, s, n / s if s > 0 else 0.0, recipe.loss, float("nan"), None, done.step_seconds, params
    )
