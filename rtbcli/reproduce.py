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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from .checkpoint import load_checkpoint
from .config import Preset, PythonRewardSpec
from .errors import InputError, PeerFailed, RunError
from .evaluate import evaluate
from .finetune import check_compatible, finetune
from .networks import attach_network
from .objectives import METHODS
from .plots import plot_panels
from .presets_loader import load_preset
from .pretrain import pretrain
from .reproduce_common import floor_row, metrics_of, provenance, shipped_prior
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
    """The full budget is the preset's finetune and evaluate sections; --quick its [reproduce] section (energy presets:
    the paper's budget, and --quick `reproduce_energy.QUICK_STEPS` steps at the preset's batch and K)."""
    if preset.target is not None:
        from .reproduce_energy import QUICK_STEPS

        return Budget(QUICK_STEPS if quick else preset.finetune.steps, preset.finetune.batch_size, preset.evaluate.n, None)
    if quick:
        r = preset.reproduce
        return Budget(r.quick_steps, r.quick_batch_size, r.quick_n, None, r.quick_lr)
    return Budget(preset.finetune.steps, preset.finetune.batch_size, preset.evaluate.n, None)


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


@dataclass
class _Plan:
    """One `reproduce` run as its stages read it."""

    preset: Preset
    ref: str
    budget: Budget
    out: Path
    methods: list
    quick: bool
    seed: int
    device: torch.device
    progress: bool
    console: Console
    prior_path: Path | None
    use_shipped: bool

    def say(self, k: int, text: str) -> None:
        self.console.print(f"[bold cyan][{k}/{len(self.methods) + 2}][/] {text}")


def reproduce(
    out: Path | None = None,
    *,
    prior_path: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    budget: Budget | None = None,
    preset_ref: str | None = None,
    methods: list[str] | None = None,
    seeds: int | None = None,
    configs: list[str] | None = None,
    reuse: bool = False,
) -> dict:
    """Run the whole comparison on a preset; returns the summary (also written to out/summary.json).

    `preset_ref` names the task (default: the reference task); `budget` overrides the quick or full
    budget; `methods` the preset's list of methods. An energy preset runs `reproduce_energy` (`seeds` seeds per
    configuration: default 1 with --quick, else 5).
    """
    preset, ref = load_preset(preset_ref)
    if preset.target is not None:
        return _reproduce_energy(
            preset, ref, out, prior_path, quick, seed, seeds, device, overwrite, progress, console, budget, configs, reuse
        )
    if preset.sampler.unet is not None:
        return _reproduce_unet(
            preset, ref, out, prior_path, quick, seed, seeds, device, overwrite, progress, console, budget, methods, configs, reuse
        )
    for name, named in (("--configs", configs is not None), ("--reuse", reuse)):
        if named:
            raise InputError(f"{name} applies to an energy preset (gmm25-energy, funnel, manywell-energy): drop it here")
    if seeds is not None:
        raise InputError("--seeds runs several seeds of an energy preset (gmm25-energy, funnel, manywell-energy): give --seed here")
    if preset.reward is None:
        raise InputError(f"preset '{ref}' names no reward: reproduce compares fine-tuning methods, give a preset with a [reward]")
    check_suite(Task(preset, allow_import=False))
    budget = budget or budget_for(preset, quick)
    use_shipped = quick and prior_path is None and budget.pretrain_steps is None
    if use_shipped and preset.reproduce.shipped_prior is None:
        raise InputError(f"--quick starts from a shipped prior, and preset '{ref}' has none: give --prior or --pretrain-steps")
    given = load_checkpoint(prior_path, expect_kind="prior") if prior_path is not None else None
    if given is not None:
        check_compatible(given, preset)
    plan = _Plan(
        preset,
        ref,
        budget,
        Path(out) if out is not None else default_out(ref, quick),
        [METHODS[m] for m in (methods or preset.reproduce.methods)],
        quick,
        seed,
        device,
        progress,
        console or Console(stderr=True),
        prior_path,
        use_shipped,
    )
    prepare_out(plan.out, overwrite)
    started, t_start = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    prior_ck = _prior_stage(plan)
    rows = _finetune_stage(plan, prior_ck)
    prior_row, floor, figure = _evaluate_stage(plan, prior_ck, rows)
    summary = {
        "command": "reproduce",
        "quick": quick,
        "seed": seed,
        **provenance(started, t_start, device),
        "preset": ref,
        "budget": budget.__dict__,
        "prior": str(plan.out / "prior.safetensors"),
        "prior_source": str(prior_path or ("shipped" if use_shipped else "pretrained")),
        "eval_n": budget.eval_n,
        "rows": rows,
        "prior_row": prior_row,
        "floor": floor,
        "figure": str(figure),
        "out": str(plan.out),
    }
    atomic_write_text(plan.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _reproduce_energy(
    preset, ref, out, prior_path, quick, seed, seeds, device, overwrite, progress, console, budget, configs, reuse
) -> dict:
    """An energy preset: every configuration from the Brownian prior, for every seed (`rtbcli.reproduce_energy`)."""
    from .reproduce_energy import DEFAULT_SEEDS, config_names, reproduce_energy

    config_names(configs, quick)  # before anything is written
    if prior_path is not None:
        raise InputError(f"preset '{ref}' samples a target from the Brownian prior: drop --prior")
    if budget is not None and budget.pretrain_steps is not None:
        raise InputError(f"preset '{ref}' samples a target from the Brownian prior: drop --pretrain-steps")
    path = Path(out) if out is not None else default_out(ref, quick)
    prepare_out(path, overwrite or reuse)
    return reproduce_energy(
        preset,
        ref,
        path,
        budget or budget_for(preset, quick),
        quick=quick,
        seeds=seeds if seeds is not None else (1 if quick else DEFAULT_SEEDS),
        first_seed=seed,
        device=device,
        progress=progress,
        console=console,
        configs=configs,
        reuse=reuse,
    )


def _reproduce_unet(
    preset, ref, out, prior_path, quick, seed, seeds, device, overwrite, progress, console, budget, methods, configs, reuse
) -> dict:
    """A diffusers-UNet preset: full fine-tuning beside LoRA, from a model folder (`rtbcli.reproduce_unet`)."""
    from .reproduce_unet import reproduce_unet

    for name, named in (("--configs", configs is not None), ("--reuse", reuse), ("--seeds", seeds is not None)):
        if named:
            raise InputError(f"{name} applies to an energy preset (gmm25-energy, funnel, manywell-energy): drop it here")
    if prior_path is not None and not Path(prior_path).is_dir():
        raise InputError(
            f"--prior '{prior_path}' is not a folder: preset '{ref}' fine-tunes a diffusers model folder (pretrain --preset {ref} writes one)"
        )
    budget = budget or budget_for(preset, quick)
    if quick and prior_path is None and budget.pretrain_steps is None and preset.reproduce.shipped_prior is None:
        raise InputError(f"--quick starts from a shipped prior, and preset '{ref}' has none: give --prior or --pretrain-steps")
    path = Path(out) if out is not None else default_out(ref, quick)
    prepare_out(path, overwrite)
    return reproduce_unet(
        preset, ref, path, budget, prior_path=prior_path, quick=quick, seed=seed, device=device, progress=progress, console=console,
        methods=methods or preset.reproduce.methods,
    )  # fmt: skip


def _prior_stage(plan: _Plan):
    """Stage 1: the prior (copied from --prior or the shipped one, or pretrained) as out/prior.safetensors."""
    prior_file, preset = plan.out / "prior.safetensors", plan.preset
    shipped = preset.reproduce.shipped_prior
    if plan.prior_path is None and plan.use_shipped:
        if shipped is None:  # not reached: planning checks it
            raise InputError(f"--quick starts from a shipped prior, and preset '{plan.ref}' has none: give --prior or --pretrain-steps")
        plan.say(1, f"prior: the shipped prior ({shipped})")
        shutil.copyfile(shipped_prior(shipped), prior_file)
    elif plan.prior_path is None:
        p = preset if plan.budget.pretrain_steps is None else preset.updated("pretrain", steps=plan.budget.pretrain_steps)
        plan.say(1, f"prior: pretraining {p.pretrain.steps:,} steps, batch {p.pretrain.batch_size}")
        pretrain(p, plan.ref, prior_file, seed=plan.seed, device=plan.device, log_path=plan.out / "prior.jsonl", progress=plan.progress)
    else:
        plan.say(1, f"prior: {plan.prior_path}")
        shutil.copyfile(plan.prior_path, prior_file)
    prior_ck = load_checkpoint(prior_file)
    # the network class the preset names (naming it there is the user's consent to import it, as for `pretrain`; a
    # checkpoint alone never imports code); the fine-tuned checkpoints of this run share it (`_evaluate_stage`)
    attach_network(prior_ck, preset.sampler.network)
    check_compatible(prior_ck, preset)
    return prior_ck


def _finetune_stage(plan: _Plan, prior_ck) -> list[dict]:
    """Stage 2: every method from the same prior and seed; a method that diverges is a row saying so."""
    b = plan.budget
    ft_preset: Preset = plan.preset.updated("finetune", steps=b.finetune_steps, batch_size=b.batch_size, lr=b.lr)
    rows = []
    for k, m in enumerate(plan.methods, start=2):
        plan.say(k, f"{m.label}: {b.finetune_steps:,} steps, batch {b.batch_size}, lr {ft_preset.finetune.lr:g}")
        ck_path = plan.out / f"{m.name}.safetensors"
        row = {"method": m.name, "label": m.label, "algo": m.algo, "on_policy": m.on_policy}
        try:
            r = finetune(
                prior_ck,
                ft_preset,
                plan.ref,
                m.algo,
                ck_path,
                seed=plan.seed,
                device=plan.device,
                on_policy=m.on_policy,
                log_path=plan.out / f"{m.name}.jsonl",
                progress=plan.progress,
                save_every=0,
            )
        except PeerFailed:
            raise
        except RunError as e:  # a method that diverges is a result of the comparison, not the end of it
            plan.say(k, f"{m.label} diverged: {e}")
            rows.append({**row, "checkpoint": None, "diverged": str(e)})
            continue
        rows.append({**row, "checkpoint": str(ck_path), "train_seconds": round(r.seconds, 1), "median_step_s": round(r.median_step_s, 4)})
    return rows


def _evaluate_stage(plan: _Plan, prior_ck, rows: list[dict]) -> tuple[dict, dict, Path]:
    """Stage 3: every sampler (and the prior, against the target) on the same n and seed; the figure. Fills the rows'
    metrics; returns the prior's row, the floor row and the figure's path."""
    n, seed, device, preset = plan.budget.eval_n, plan.seed, plan.device, plan.preset
    plan.say(len(plan.methods) + 2, f"evaluating {len(plan.methods) + 1} samplers on n = {n:,} (and the target's samples)")
    # the preset names its reward, so the checkpoints' Python reward may be imported (as `evaluate --reward` would)
    reward, reward_kwargs = (preset.reward.function, preset.reward.kwargs) if isinstance(preset.reward, PythonRewardSpec) else (None, None)
    ev_prior = evaluate(prior_ck, n, seed, device, beta=preset.beta, reward=reward, reward_kwargs=reward_kwargs)
    prior_row = {"method": "prior (no fine-tuning)", "label": "prior", **metrics_of(ev_prior.metrics)}
    reference = ev_prior.reference
    panels, subtitles = [("prior", ev_prior.samples)], [subtitle(prior_row)]
    if reference is not None:
        panels.append(("target (reference)" if ev_prior.target.method == "reference" else "target (exact)", reference.float()))
        subtitles.append("")
    for row in rows:
        if row["checkpoint"] is None:
            continue
        ck = load_checkpoint(row["checkpoint"])
        ck.network = prior_ck.network  # made by this run from the prior: its class, imported once
        ev = evaluate(ck, n, seed, device, reward=reward, reward_kwargs=reward_kwargs)
        row.update(metrics_of(ev.metrics))
        panels.append((row["label"], ev.samples))
        subtitles.append(subtitle(row))
    figure = plan.out / "figure.png"
    suptitle = f"{preset.name}: {preset.description}; {'quick' if plan.quick else 'full'} run, seed {seed}"
    suite = suite_of(ev_prior.task)
    if suite.own_figure:
        suite.plot_samples(figure, panels, title=suptitle)
    else:
        plot_panels(figure, panels, ev_prior.target, subtitles=subtitles, suptitle=suptitle, reference=reference)
    return prior_row, floor_row(ev_prior.metrics, ev_prior.target.method), figure


def subtitle(row: dict) -> str:
    """A figure panel's headline: mode KL and off-target mass where the target has exact modes, else sliced W2."""
    if row.get("kl_mode") is not None:
        return f"KL {row['kl_mode']:.3f} · off {100 * row['off_target']:.1f}%"
    if row.get("well_mass_mean_abs_err") is not None:
        return f"well err {row['well_mass_mean_abs_err']:.3f} · SW2 {row['sw2']:.3f}"
    return "" if row.get("sw2") is None else f"SW2 {row['sw2']:.3f} (floor {row['sw2_floor']:.3f})"
