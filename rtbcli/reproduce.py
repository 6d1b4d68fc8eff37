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
from rich.markup import escape
from rich.table import Table

from . import __version__
from .checkpoint import load_checkpoint
from .config import Preset, load_preset
from .errors import InputError
from .evaluate import evaluate
from .finetune import check_compatible, finetune
from .plots import plot_panels
from .pretrain import pretrain
from .runtime import atomic_write_text


@dataclass(frozen=True)
class Method:
    name: str  # row label and file stem
    algo: str
    on_policy: bool
    label: str  # figure panel title


METHODS = (
    Method("rtb", "rtb", False, "RTB"),
    Method("trust-pcl", "trust-pcl", False, "Trust-PCL"),
    Method("reinforce-kl", "reinforce-kl", False, "REINFORCE-KL (off-policy)"),
    Method("reinforce-kl-on-policy", "reinforce-kl", True, "REINFORCE-KL (on-policy)"),
    Method("legacy-rl", "legacy-rl", True, "RL + KL, reward r (RTB paper)"),
)


@dataclass(frozen=True)
class Budget:
    """How much work each stage gets."""

    finetune_steps: int
    batch_size: int
    eval_n: int
    pretrain_steps: int | None  # None: the preset's (10,000); quick mode uses the shipped prior
    lr: float | None = None  # policy learning rate; None: the preset's (1e-3)


FULL = Budget(finetune_steps=5_000, batch_size=500, eval_n=20_000, pretrain_steps=None)
# A few minutes on 2 CPU threads: 1,000 steps of batch 200 at a 3x learning rate reach, for
# rtb, what 2,000-3,000 default steps reach (mode-weight KL ~0.03 on the reference task).
QUICK = Budget(finetune_steps=1_000, batch_size=200, eval_n=10_000, pretrain_steps=None, lr=3e-3)

SHIPPED_PRIOR = "prior-reference.safetensors"


def shipped_prior() -> Path:
    """The reference prior that ships with rtbcli (made by `rtbcli pretrain`; see its metadata)."""
    return Path(str(resources.files("rtbcli") / "data" / SHIPPED_PRIOR))


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


def reproduce(out: Path, *, prior_path: Path | None = None, quick: bool = False, seed: int = 0,
              device: torch.device = torch.device("cpu"), overwrite: bool = False, progress: bool = True,
              console: Console | None = None, budget: Budget | None = None, preset_ref: str | None = None,
              methods=METHODS) -> dict:
    """Run the whole example; returns the summary (also written to out/summary.json).

    `preset_ref` runs the same comparison on another task (default: the reference task);
    `budget` overrides the quick or full budget.
    """
    console = console or Console(stderr=True)
    budget = budget or (QUICK if quick else FULL)
    preset, ref = load_preset(preset_ref)
    if quick and prior_path is None and budget.pretrain_steps is None and ref != "reference":
        raise InputError("--quick starts from the shipped reference prior: give --prior or --pretrain-steps for another preset")
    prior_ck = load_checkpoint(prior_path, expect_kind="prior") if prior_path is not None else None
    if prior_ck is not None:
        check_compatible(prior_ck, preset)
    prepare_out(out, overwrite)
    started, t_start = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    n_stages = len(methods) + 2
    say = lambda k, text: console.print(f"[bold cyan][{k}/{n_stages}][/] {text}")

    # 1. the prior
    prior_file = out / "prior.safetensors"
    if prior_ck is None and quick and budget.pretrain_steps is None:
        say(1, f"prior: the shipped reference prior ({shipped_prior().name})")
        shutil.copyfile(shipped_prior(), prior_file)
    elif prior_ck is None:
        p = preset if budget.pretrain_steps is None else preset.updated("pretrain", steps=budget.pretrain_steps)
        say(1, f"prior: pretraining {p.pretrain.steps:,} steps, batch {p.pretrain.batch_size}")
        pretrain(p, ref, prior_file, seed=seed, device=device, log_path=out / "prior.jsonl", progress=progress)
    else:
        say(1, f"prior: {prior_path}")
        shutil.copyfile(prior_path, prior_file)
    prior_ck = load_checkpoint(prior_file)
    ft_preset: Preset = preset.updated("finetune", steps=budget.finetune_steps, batch_size=budget.batch_size, lr=budget.lr)

    # 2. every method, from the same prior and seed
    rows = []
    for k, m in enumerate(methods, start=2):
        say(k, f"{m.label}: {budget.finetune_steps:,} steps, batch {budget.batch_size}, lr {ft_preset.finetune.lr:g}")
        ck_path = out / f"{m.name}.safetensors"
        r = finetune(prior_ck, ft_preset, ref, m.algo, ck_path, seed=seed, device=device, on_policy=m.on_policy,
                     log_path=out / f"{m.name}.jsonl", progress=progress)
        rows.append({"method": m.name, "label": m.label, "algo": m.algo, "on_policy": m.on_policy, "checkpoint": str(ck_path),
                     "train_seconds": round(r.seconds, 1), "median_step_s": round(r.median_step_s, 4)})

    # 3. evaluation of everything on the same n and seed
    say(n_stages, f"evaluating {len(methods) + 1} samplers on n = {budget.eval_n:,} (and exact target samples)")
    ev_prior = evaluate(prior_ck, budget.eval_n, seed, device, beta=preset.beta)
    prior_row = {"method": "prior (no fine-tuning)", "label": "prior", **metrics_of(ev_prior.metrics)}
    panels = [(f"prior ({len(preset.prior_data.means)} modes)", ev_prior.samples), ("target (exact)", ev_prior.target_samples)]
    subtitles = [subtitle(prior_row), ""]
    for row in rows:
        ev = evaluate(load_checkpoint(row["checkpoint"]), budget.eval_n, seed, device)
        row.update(metrics_of(ev.metrics))
        panels.append((row["label"], ev.samples))
        subtitles.append(subtitle(row))
    floor = {"method": "exact sampler (floor)", **ev_prior.metrics["floor"]}
    figure = out / "figure.png"
    plot_panels(figure, panels, ev_prior.target, subtitles=subtitles,
                suptitle=f"{preset.name}: {preset.description}; {'quick' if quick else 'full'} run, seed {seed}")
    summary = {
        "command": "reproduce", "quick": quick, "seed": seed, "device": device.type, "rtbcli_version": __version__,
        "torch_version": torch.__version__, "machine": {"python": platform.python_version(), "platform": platform.platform(),
                                                         "torch_threads": torch.get_num_threads()},
        "started": started.isoformat(timespec="seconds"), "wall_seconds": round(time.perf_counter() - t_start, 1),
        "preset": ref, "budget": budget.__dict__, "prior": str(prior_file), "prior_source": str(prior_path or ("shipped" if quick else "pretrained")),
        "eval_n": budget.eval_n, "rows": rows, "prior_row": prior_row, "floor": floor, "figure": str(figure),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def subtitle(row: dict) -> str:
    """A figure panel's mode KL and off-target mass, where the target has exact modes."""
    return "" if row["kl_mode"] is None else f"KL {row['kl_mode']:.3f} · off {100 * row['off_target']:.1f}%"


def metrics_of(m: dict) -> dict:
    keys = ("mode_coverage", "n_target_modes", "kl_mode", "off_target", "kl_hist", "log_z_learned", "log_z_is", "ess",
            "elbo", "eubo")
    return {k: m[k] for k in keys}


def summary_table(summary: dict) -> Table:
    """One row per method, the prior and the exact-sampler floor."""
    t = Table(title=escape(f"reproduce {summary['preset']} ({'quick' if summary['quick'] else 'full'}; n = {summary['eval_n']:,}, "
                           f"seed {summary['seed']})"), title_justify="left")
    for c in ("method", "modes", "mode KL", "off-target", "hist KL", "log Z", "log Z (IS)", "ELBO", "train s"):
        t.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"

    def add(row, style=None):
        cov = "-" if row.get("mode_coverage") is None else f"{row['mode_coverage']}/{row['n_target_modes']}"
        off = "-" if row.get("off_target") is None else f"{100 * row['off_target']:.1f}%"
        train = "-" if row.get("train_seconds") is None else f"{row['train_seconds']:.0f}"
        t.add_row(escape(row["method"]), cov, f(row.get("kl_mode")), off, f(row.get("kl_hist"), 3), f(row.get("log_z_learned"), 3),
                  f(row.get("log_z_is"), 3), f(row.get("elbo"), 3), train, style=style)

    add(summary["prior_row"], style="dim")
    for row in summary["rows"]:
        add(row)
    add(summary["floor"], style="italic")
    return t
