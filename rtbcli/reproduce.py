"""`rtbcli reproduce`: the illustrative example of Deleu et al. (2025), end to end.

The claim: on the 25-mode prior with the 9-mode reward (the `reference` preset), RTB recovers
the target; the RL baseline of the RTB paper (reward r instead of log r, a squared log-ratio
penalty, on-policy) does not; and REINFORCE with KL regularisation and the right reward (log r),
off-policy with self-normalised importance weights, recovers it as well as RTB. Trust-PCL is
RTB's loss times alpha^2 and lands on the same sampler.

Steps: pretrain a prior (or reuse one), fine-tune it with every method below from the same
seed, evaluate every result (and the prior, against the target) on the same n and seed, then
write a table, a figure, every checkpoint and log, and `summary.json` into the output folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console

from . import __version__
from .checkpoint import load_checkpoint
from .config import Preset, PythonRewardSpec
from .errors import InputError, PeerFailed, RunError
from .evaluate import evaluate
from .finetune import check_compatible, finetune
from .objectives import METHODS
from .plots import plot_panels
from .presets_loader import load_preset
from .pretrain import pretrain
from .runtime import atomic_write_text
from .suites import check_suite, suite_of
from .tasks import Task


@dataclass(frozen=True)
class Budget:
    """How much work each stage gets."""

    finetune_steps: int
    batch_size: int
    eval_n: int
    pretrain_steps: int | None  # None: the preset's; quick mode uses the shipped prior when there is one
    lr: float | None = None  # policy learning rate; None: the preset's


def budget_for(preset: Preset, quick: bool) -> Budget:
    """The full budget is the preset's finetune and evaluate sections; --quick its [reproduce] section."""
    if quick:
        r = preset.reproduce
        return Budget(r.quick_steps, r.quick_batch_size, r.quick_n, None, r.quick_lr)
    return Budget(preset.finetune.steps, preset.finetune.batch_size, preset.evaluate.n, None)


def shipped_prior(name: str = "prior-reference.safetensors") -> Path:
    """A prior that ships with rtbcli (made by `rtbcli pretrain`; see its metadata)."""
    return Path(str(resources.files("rtbcli") / "data" / name))


def default_out(ref: str, quick: bool) -> Path:
    return Path("runs") / f"reproduce-{Path(ref).stem}{'-quick' if quick else ''}"


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create the output folder; refuse one that already holds files unless told to overwrite."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out '{out}' already holds files: choose a new folder or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out '{out}' cannot be created ({e.strerror}): choose another folder") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"--out '{out}' is not writable: choose another folder")


def reproduce(out: Path | None = None, *, prior_path: Path | None = None, quick: bool = False, seed: int = 0,
              device: torch.device = torch.device("cpu"), overwrite: bool = False, progress: bool = True,
              console: Console | None = None, budget: Budget | None = None, preset_ref: str | None = None,
              methods: list[str] | None = None) -> dict:
    """Run the whole comparison on a preset; returns the summary (also written to out/summary.json).

    `preset_ref` names the task (default: the reference task); `budget` overrides the quick or full
    budget; `methods` the preset's list of methods.
    """
    console = console or Console(stderr=True)
    preset, ref = load_preset(preset_ref)
    if preset.reward is None:
        raise InputError(f"preset '{ref}' names no reward: reproduce compares fine-tuning methods, give a preset with a [reward]")
    check_suite(Task(preset, allow_import=False))
    budget = budget or budget_for(preset, quick)
    out = Path(out) if out is not None else default_out(ref, quick)
    chosen = [METHODS[m] for m in (methods or preset.reproduce.methods)]
    shipped = preset.reproduce.shipped_prior
    use_shipped = quick and prior_path is None and budget.pretrain_steps is None
    if use_shipped and shipped is None:
        raise InputError(f"--quick starts from a shipped prior, and preset '{ref}' has none: give --prior or --pretrain-steps")
    prior_ck = load_checkpoint(prior_path, expect_kind="prior") if prior_path is not None else None
    if prior_ck is not None:
        check_compatible(prior_ck, preset)
    prepare_out(out, overwrite)
    started, t_start = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    n_stages = len(chosen) + 2
    say = lambda k, text: console.print(f"[bold cyan][{k}/{n_stages}][/] {text}")

    # 1. the prior
    prior_file = out / "prior.safetensors"
    if prior_ck is None and use_shipped:
        say(1, f"prior: the shipped prior ({shipped})")
        shutil.copyfile(shipped_prior(shipped), prior_file)
    elif prior_ck is None:
        p = preset if budget.pretrain_steps is None else preset.updated("pretrain", steps=budget.pretrain_steps)
        say(1, f"prior: pretraining {p.pretrain.steps:,} steps, batch {p.pretrain.batch_size}")
        pretrain(p, ref, prior_file, seed=seed, device=device, log_path=out / "prior.jsonl", progress=progress)
    else:
        say(1, f"prior: {prior_path}")
        shutil.copyfile(prior_path, prior_file)
    prior_ck = load_checkpoint(prior_file)
    check_compatible(prior_ck, preset)
    ft_preset: Preset = preset.updated("finetune", steps=budget.finetune_steps, batch_size=budget.batch_size, lr=budget.lr)

    # 2. every method, from the same prior and seed
    rows = []
    for k, m in enumerate(chosen, start=2):
        say(k, f"{m.label}: {budget.finetune_steps:,} steps, batch {budget.batch_size}, lr {ft_preset.finetune.lr:g}")
        ck_path = out / f"{m.name}.safetensors"
        row = {"method": m.name, "label": m.label, "algo": m.algo, "on_policy": m.on_policy}
        try:
            r = finetune(prior_ck, ft_preset, ref, m.algo, ck_path, seed=seed, device=device, on_policy=m.on_policy,
                         log_path=out / f"{m.name}.jsonl", progress=progress, save_every=0)
        except PeerFailed:
            raise
        except RunError as e:  # a method that diverges is a result of the comparison, not the end of it
            say(k, f"{m.label} diverged: {e}")
            rows.append({**row, "checkpoint": None, "diverged": str(e)})
            continue
        rows.append({**row, "checkpoint": str(ck_path), "train_seconds": round(r.seconds, 1), "median_step_s": round(r.median_step_s, 4)})

    # 3. evaluation of everything on the same n and seed
    say(n_stages, f"evaluating {len(chosen) + 1} samplers on n = {budget.eval_n:,} (and the target's samples)")
    # the preset names its reward, so the checkpoints' Python reward may be imported (as `evaluate --reward` would)
    named = {"reward": preset.reward.function, "reward_kwargs": preset.reward.kwargs} if isinstance(preset.reward, PythonRewardSpec) else {}
    ev_prior = evaluate(prior_ck, budget.eval_n, seed, device, beta=preset.beta, **named)
    prior_row = {"method": "prior (no fine-tuning)", "label": "prior", **metrics_of(ev_prior.metrics)}
    reference = ev_prior.reference
    panels = [("prior", ev_prior.samples)]
    if reference is not None:
        panels.append(("target (reference)" if ev_prior.target.method == "reference" else "target (exact)", reference.float()))
    subtitles = [subtitle(prior_row)] + ([""] if reference is not None else [])
    for row in rows:
        if row["checkpoint"] is None:
            continue
        ev = evaluate(load_checkpoint(row["checkpoint"]), budget.eval_n, seed, device, **named)
        row.update(metrics_of(ev.metrics))
        panels.append((row["label"], ev.samples))
        subtitles.append(subtitle(row))
    floor = floor_row(ev_prior.metrics, ev_prior.target.method)
    figure = out / "figure.png"
    suptitle = f"{preset.name}: {preset.description}; {'quick' if quick else 'full'} run, seed {seed}"
    suite = suite_of(ev_prior.task)
    if suite.own_figure:
        suite.plot_samples(figure, panels, title=suptitle)
    else:
        plot_panels(figure, panels, ev_prior.target, subtitles=subtitles, suptitle=suptitle, reference=reference)
    summary = {
        "command": "reproduce", "quick": quick, "seed": seed, "device": device.type, "rtbcli_version": __version__,
        "torch_version": torch.__version__, "machine": {"python": platform.python_version(), "platform": platform.platform(),
                                                         "torch_threads": torch.get_num_threads()},
        "started": started.isoformat(timespec="seconds"), "wall_seconds": round(time.perf_counter() - t_start, 1),
        "preset": ref, "budget": budget.__dict__, "prior": str(prior_file), "prior_source": str(prior_path or ("shipped" if use_shipped else "pretrained")),
        "eval_n": budget.eval_n, "rows": rows, "prior_row": prior_row, "floor": floor, "figure": str(figure), "out": str(out),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


ROW_KEYS = ("mode_coverage", "n_target_modes", "kl_mode", "off_target", "kl_hist", "log_z_learned", "log_z_is", "ess", "elbo", "eubo",
            "elbo_prior", "path_kl", "log_r_mean", "sw2", "sw2_floor", "mmd2", "mmd2_floor", "n_compared", "n_far", "well_mass_mean_abs_err",
            "well_mass_max_abs_err", "class_fraction", "class_fraction_target", "diversity", "nearest_train_distance", "log_z_true",
            "log_z_is_data")


def metrics_of(m: dict) -> dict:
    return {k: m.get(k) for k in ROW_KEYS}


def floor_row(m: dict, method: str) -> dict:
    """What a sampler of the target itself scores: the exact sampler, or the reference against itself."""
    row = {"method": "exact sampler (floor)" if method != "reference" else "reference (floor)", **m.get("floor", {})}
    row.update(sw2=m.get("sw2_floor"), mmd2=m.get("mmd2_floor"), well_mass_mean_abs_err=m.get("well_mass_mean_abs_err_floor"),
               well_mass_max_abs_err=m.get("well_mass_max_abs_err_floor"), class_fraction=m.get("class_fraction_real"),
               diversity=m.get("diversity_real"), nearest_train_distance=m.get("nearest_train_distance_real"))
    return row


def subtitle(row: dict) -> str:
    """A figure panel's headline: mode KL and off-target mass where the target has exact modes, else sliced W2."""
    if row.get("kl_mode") is not None:
        return f"KL {row['kl_mode']:.3f} · off {100 * row['off_target']:.1f}%"
    if row.get("well_mass_mean_abs_err") is not None:
        return f"well err {row['well_mass_mean_abs_err']:.3f} · SW2 {row['sw2']:.3f}"
    return "" if row.get("sw2") is None else f"SW2 {row['sw2']:.3f} (floor {row['sw2_floor']:.3f})"


