"""`rtbcli reproduce` on an energy preset (gmm25-energy, funnel, manywell-energy): Table 1 of Sendera et al. 2024.

Each configuration (an objective plus off-policy tools, `CONFIGS`) is trained from the Brownian prior with the
library's `finetune`, for every seed, as `rtbcli finetune --preset P` does, and scored with the library's `evaluate`
on the preset's K (2,000): delta_log_z, delta_log_z_rw, w2 (beside its exact-sample floor w2_floor) and eubo. The
table gives mean and std over seeds per configuration, then the paper's rows for the same target
(`rtbcli.energy.published`). Everything goes into the output folder, with `summary.json`.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from .checkpoint import load_checkpoint
from .config import Preset
from .energy.published import load_table1
from .errors import InputError, PeerFailed, RunError
from .evaluate import evaluate
from .finetune import finetune
from .runtime import atomic_write_text

EXPLORATION = 0.2  # the paper's extra exploration std, decaying linearly to 0 ...
EXPLORATION_END = 5_000  # ... by this step of the 25,000 (scaled to shorter budgets)
PAPER_STEPS = 25_000
QUICK_STEPS = 1_000  # gmm25: 700 steps of each quick configuration took 22-25 s on 2 CPU threads (unshared)
QUICK_CONFIGS = ("TB+Expl+LS", "VarGrad+Expl")
DEFAULT_SEEDS = 5
METRICS = ("delta_log_z", "delta_log_z_rw", "w2", "w2_floor", "eubo")


@dataclass(frozen=True)
class Config:
    """One row of the comparison: an objective, on- or off-policy, and finetune overrides (the off-policy tools)."""

    name: str
    algo: str
    on_policy: bool = False
    explore: bool = False  # the decaying exploration std
    overrides: dict = field(default_factory=dict)
    paper: str | None = None  # the published row it corresponds to


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("TB", "rtb", paper="TB"),
        Config("TB+Expl", "rtb", explore=True, paper="TB + Expl."),
        Config("TB+Expl+LS", "rtb", explore=True, overrides={"replay": True, "local_search": True}, paper="TB + Expl. + LS"),
        Config("VarGrad+Expl", "vargrad", explore=True, paper="VarGrad + Expl."),
        Config("Trust-PCL+Expl", "trust-pcl", explore=True),
        Config("REINFORCE-KL", "reinforce-kl", on_policy=True),
    )
}


def table_target(preset: Preset) -> str | None:
    """The published table's key for the preset's target ('gmm25', 'funnel', 'manywell'), or None for another target."""
    assert preset.target is not None
    module, _, name = preset.target.log_density.partition(":")
    return name if module == "rtbcli.energy.targets" and name in load_table1()["targets"] else None


def exact_samples_note(target: str | None) -> str:
    if target == "gmm25":
        return "W2 against exact i.i.d. samples (multinomial mode counts), not the paper's stratified draw (80 per mode)"
    return "W2 against exact i.i.d. samples of the target"


def exploration_end_step(steps: int) -> int:
    """Step 5,000 of the paper's 25,000, scaled to the run's budget."""
    return max(1, round(EXPLORATION_END * steps / PAPER_STEPS))


def preset_for(preset: Preset, config: Config, budget) -> Preset:
    """The preset a configuration trains with: the budget's steps, batch and lr, exploration, the off-policy tools."""
    explore = {"exploration": EXPLORATION, "exploration_end_step": exploration_end_step(budget.finetune_steps)} if config.explore else {}
    return preset.updated(
        "finetune",
        steps=budget.finetune_steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        **({"exploration": 0.0} if not config.explore else explore),
        **config.overrides,
    )


def reproduce_energy(
    preset: Preset,
    ref: str,
    out: Path,
    budget,
    *,
    quick: bool,
    seeds: int,
    first_seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    console: Console | None = None,
    configs: list[str] | None = None,
) -> dict:
    """Train and score every configuration for every seed; returns the summary (also written to out/summary.json).
    The caller has prepared `out`."""
    names = configs or list(QUICK_CONFIGS if quick else CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise InputError(f"unknown configuration(s) {unknown}: choose from {list(CONFIGS)}")
    console = console or Console(stderr=True)
    started, t_start = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    runs, total, k = [], len(names) * seeds, 0
    for name in names:
        config = CONFIGS[name]
        p = preset_for(preset, config, budget)
        for seed in range(first_seed, first_seed + seeds):
            k += 1
            console.print(f"[bold cyan][{k}/{total}][/] {name}, seed {seed}: {budget.finetune_steps:,} steps, batch {budget.batch_size}")
            runs.append(_one(p, ref, config, seed, out, budget.eval_n, device, progress, console))
    target = table_target(preset)
    table = load_table1()
    published = [{"method": r["method"], "amortized": r["amortized"], **r[target]} for r in table["rows"]] if target is not None else []
    summary = {
        "command": "reproduce",
        "mode": "energy",
        "quick": quick,
        "preset": ref,
        "target": target,
        "seeds": list(range(first_seed, first_seed + seeds)),
        "device": device.type,
        "rtbcli_version": __version__,
        "torch_version": torch.__version__,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "budget": {**budget.__dict__, "exploration": EXPLORATION, "exploration_end_step": exploration_end_step(budget.finetune_steps)},
        "eval_n": budget.eval_n,
        "w2_samples": exact_samples_note(target),
        "configs": {
            n: {"algo": CONFIGS[n].algo, "on_policy": CONFIGS[n].on_policy, "explore": CONFIGS[n].explore, **CONFIGS[n].overrides}
            for n in names
        },
        "runs": runs,
        "rows": [aggregate(n, [r for r in runs if r["config"] == n]) for n in names],
        "published": published,
        "published_citation": table["citation"] if target is not None else None,
        "out": str(out),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _one(p: Preset, ref: str, config: Config, seed: int, out: Path, n: int, device, progress: bool, console: Console) -> dict:
    """One configuration and seed: train from the Brownian prior, evaluate; a run that diverges is a row saying so."""
    stem = f"{config.name}-seed{seed}".replace("+", "_")
    ck_path = out / f"{stem}.safetensors"
    run = {"config": config.name, "algo": config.algo, "seed": seed}
    try:
        r = finetune(
            None,
            p,
            ref,
            config.algo,
            ck_path,
            seed=seed,
            device=device,
            on_policy=config.on_policy,
            log_path=out / f"{stem}.jsonl",
            progress=progress,
            save_every=0,
        )
    except PeerFailed:
        raise
    except RunError as e:  # a configuration that diverges is a result, not the end of the comparison
        console.print(f"{config.name}, seed {seed} diverged: {e}")
        return {**run, "checkpoint": None, "diverged": str(e)}
    ev = evaluate(load_checkpoint(ck_path), n, seed, device)
    return {
        **run,
        "checkpoint": str(ck_path),
        "train_seconds": round(r.seconds, 1),
        **{m: ev.metrics.get(m) for m in METRICS},
    }


def aggregate(name: str, runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric and the training time ([mean, std]; std 0 for one seed; None: no run)."""
    done = [r for r in runs if r.get("checkpoint") is not None]
    row: dict = {"config": name, "seeds": len(runs), "diverged": len(runs) - len(done)}
    for key in (*METRICS, "train_seconds"):
        vals = [float(r[key]) for r in done if r.get(key) is not None]
        row[key] = None if not vals else [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
    return row


def _pm(cell, digits: int = 3) -> str:
    return "—" if cell is None else f"{cell[0]:.{digits}f} ± {cell[1]:.{digits}f}"


def energy_table(summary: dict) -> Table:
    """The comparison: our rows (mean ± std over seeds), the paper's rows for the target, the exact-sample W2 floor."""
    seeds = len(summary["seeds"])
    b = summary["budget"]
    t = Table(
        title=f"{summary['preset']}: {b['finetune_steps']:,} steps, batch {b['batch_size']}, K = {summary['eval_n']:,}, "
        f"{seeds} seed{'s' if seeds != 1 else ''}",
        caption=summary["w2_samples"],
    )
    for col in ("configuration", "ΔlogZ", "ΔlogZ^RW", "W2", "EUBO", "train s"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for row in summary["rows"]:
        name = row["config"] + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        t.add_row(
            name, _pm(row["delta_log_z"]), _pm(row["delta_log_z_rw"]), _pm(row["w2"], 2), _pm(row["eubo"]), _pm(row["train_seconds"], 0)
        )
    floors = [row["w2_floor"] for row in summary["rows"] if row["w2_floor"] is not None]
    if floors:
        t.add_row("exact sampler (W2 floor)", "", "", _pm(floors[0], 2), "", "", style="dim")
    if summary["published"]:
        c = summary["published_citation"]
        t.add_section()
        t.add_row(
            f"[italic]published (Sendera et al. 2024, arXiv {c['arxiv']}, Table 1 / C.1; 25,000 steps, 5 runs)[/]", "", "", "", "", ""
        )
        for r in summary["published"]:
            t.add_row(
                r["method"] + ("" if r["amortized"] else " (MCMC)"),
                _pm(r["delta_log_z"]),
                _pm(r["delta_log_z_rw"]),
                _pm(r["w2"], 2),
                "",
                "",
                style="dim",
            )
    return t
