"""`rtbcli reproduce` on a diffusers-UNet preset (digits-unet): full fine-tuning beside LoRA adapters, one table, one figure.

Stages: the prior, a diffusers model folder (the preset's shipped one with --quick, --prior DIR, or pretrained with the
DDPM loss into out/prior); then each method of the preset's [reproduce] fine-tuned twice from it with the same seed,
every weight ("full") and LoRA adapters of rank `reproduce.lora_rank` at `reproduce.lora_lr` (adapters start at zero and
move slowly at the full run's rate); then the prior and every sampler evaluated on the same n and seed. Writes every
checkpoint and log, `summary.json` (each row with its trainable parameters, peak memory and wall time) and figure.png:
digit grids of the prior, each fine-tuned sampler and the real images of the rewarded class.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from .checkpoint import load_checkpoint
from .config import Preset, PythonRewardSpec
from .errors import InputError, PeerFailed, RunError
from .evaluate import evaluate
from .finetune import finetune
from .model_prior import folder_checkpoint, with_model_of
from .objectives import METHODS
from .reproduce_common import provenance, shipped_prior
from .runtime import atomic_write_text
from .suites import suite_of


def prior_folder(
    preset: Preset, ref: str, out: Path, prior_path: Path | None, quick: bool, pretrain_steps: int | None, seed, device, progress, say
) -> Path:
    """Stage 1: the prior's model folder, out/prior (a copy of --prior DIR or of the shipped folder, or pretrained)."""
    dest = out / "prior"
    if prior_path is not None:  # a folder (`reproduce` checked)
        say(f"prior: {prior_path}")
        shutil.copytree(prior_path, dest, dirs_exist_ok=True)
    elif quick and pretrain_steps is None:
        shipped = preset.reproduce.shipped_prior
        if shipped is None:
            raise InputError(f"--quick starts from a shipped prior, and preset '{ref}' has none: give --prior or --pretrain-steps")
        say(f"prior: the shipped model folder ({shipped})")
        shutil.copytree(shipped_prior(shipped), dest, dirs_exist_ok=True)
    else:
        from .unet_pretrain import pretrain_unet

        p = preset if pretrain_steps is None else preset.updated("pretrain", steps=pretrain_steps)
        say(f"prior: pretraining the UNet {p.pretrain.steps:,} steps, batch {p.pretrain.batch_size} (DDPM loss)")
        pretrain_unet(p, ref, dest, seed=seed, device=device, log_path=out / "prior.jsonl", progress=progress)
    return dest


def reproduce_unet(
    preset: Preset, ref: str, out: Path, budget, *, prior_path, quick, seed, device, progress, console: Console | None, methods
) -> dict:
    """Run the comparison (the module docstring); returns the summary, also written to out/summary.json."""
    console = console or Console(stderr=True)
    rp = preset.reproduce
    variants = [(m, None) for m in methods] + ([(m, rp.lora_rank) for m in methods] if rp.lora_rank is not None else [])
    total = len(variants) + 2

    def say(k: int, text: str) -> None:
        console.print(f"[bold cyan][{k}/{total}][/] {text}")

    started, t0 = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    folder = prior_folder(preset, ref, out, prior_path, quick, budget.pretrain_steps, seed, device, progress, lambda s: say(1, s))
    rows = []
    for k, (name, rank) in enumerate(variants, start=2):
        m = METHODS[name]
        lora = rank is not None
        lr = (rp.lora_lr if lora and rp.lora_lr is not None else budget.lr) or preset.finetune.lr
        start = folder_checkpoint(folder, preset, None, rank, None, None)
        ft = with_model_of(preset.updated("finetune", steps=budget.finetune_steps, batch_size=budget.batch_size, lr=lr), start)
        stem = f"{m.name}-{'lora' if lora else 'full'}"
        label = f"{m.label}, {'LoRA rank ' + str(rank) if lora else 'full'}"
        say(k, f"{label}: {budget.finetune_steps:,} steps, batch {budget.batch_size}, lr {lr:g}")
        row: dict = {"method": f"{m.name} ({'LoRA r' + str(rank) if lora else 'full'})", "label": label, "algo": m.algo, "lora_rank": rank}
        try:
            r = finetune(start, ft, ref, m.algo, out / f"{stem}.safetensors", seed=seed, device=device, on_policy=m.on_policy,
                         log_path=out / f"{stem}.jsonl", progress=progress, save_every=0)  # fmt: skip
        except PeerFailed:
            raise
        except RunError as e:  # a run that diverges is a result of the comparison, not the end of it
            say(k, f"{label} diverged: {e}")
            rows.append({**row, "checkpoint": None, "diverged": str(e)})
            continue
        rows.append(
            {
                **row,
                "checkpoint": str(out / f"{stem}.safetensors"),
                "train_seconds": round(r.seconds, 1),
                "median_step_s": round(r.median_step_s, 4),
                "trainable_parameters": r.trainable_parameters,
                "peak_memory_mb": None if r.peak_memory_mb is None else round(r.peak_memory_mb, 1),
            }
        )
    prior_row, floor, figure = _evaluate(preset, folder, rows, budget.eval_n, seed, device, out, quick, lambda s: say(total, s))

    summary = {
        "command": "reproduce",
        "mode": "unet",
        "quick": quick,
        "seed": seed,
        **provenance(started, t0, device),
        "preset": ref,
        "budget": budget.__dict__,
        "lora_lr": rp.lora_lr,
        "prior": str(folder),
        "prior_source": str(prior_path or ("shipped" if quick and budget.pretrain_steps is None else "pretrained")),
        "eval_n": budget.eval_n,
        "rows": rows,
        "prior_row": prior_row,
        "floor": floor,
        "figure": str(figure),
        "out": str(out),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _evaluate(preset: Preset, folder: Path, rows: list[dict], n: int, seed: int, device, out: Path, quick: bool, say):
    """The prior and every sampler on the same n and seed; the figure (digit grids, the real images last)."""
    from .reproduce_common import floor_row, metrics_of

    say(f"evaluating {len(rows) + 1} samplers on n = {n:,}")
    reward, kwargs = (preset.reward.function, preset.reward.kwargs) if isinstance(preset.reward, PythonRewardSpec) else (None, None)
    ev_prior = evaluate(
        folder_checkpoint(folder, preset, None, None, None, None), n, seed, device, beta=preset.beta, reward=reward, reward_kwargs=kwargs
    )
    prior_row = {"method": "prior (no fine-tuning)", "label": "prior", **metrics_of(ev_prior.metrics)}
    panels = [("prior", ev_prior.samples)]
    for row in rows:
        if row.get("checkpoint") is None:
            continue
        ev = evaluate(load_checkpoint(row["checkpoint"]), n, seed, device, reward=reward, reward_kwargs=kwargs)
        row.update(metrics_of(ev.metrics))
        panels.append((row["label"], ev.samples))
    if ev_prior.reference is not None:
        panels.append(("real images of the class", ev_prior.reference.float()))
    figure = out / "figure.png"
    title = f"{preset.name}: {preset.description}; {'quick' if quick else 'full'} run, seed {seed}"
    suite_of(ev_prior.task).plot_samples(figure, panels, title=title)
    return prior_row, floor_row(ev_prior.metrics, ev_prior.target.method), figure
