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
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .checkpoint import load_checkpoint
from .config import Preset
from .energy.published import best_row, load_table1
from .errors import InputError, PeerFailed, RunError
from .evaluate import evaluate
from .finetune import finetune
from .plots import plot_panels
from .reproduce_common import provenance
from .runtime import atomic_write_text

EXPLORATION = 0.2  # the paper's extra exploration std, decaying linearly to 0 ...
EXPLORATION_END = 5_000  # ... by this step of the 25,000 (scaled to shorter budgets)
PAPER_STEPS = 25_000
QUICK_STEPS = 1_000  # gmm25: 700 steps of each quick configuration took 22-25 s on 2 CPU threads (unshared)
QUICK_CONFIGS = ("TB+Expl+LS", "VarGrad+Expl")
LP_LS = {"langevin": True, "replay": True, "local_search": True}  # the paper's LP + LS rows
LP_FRACTION = 0.4  # the paper's LP rows: 10,000 of its 25,000 iterations (a Langevin step costs ~4x a plain one)
EVALS_PER_RUN = 25  # in-loop evaluations (finetune's eval_every) per run, on K samples: the time to reach each number
QUICK_EVALS_PER_RUN = 5  # (a few seconds each at K = 2,000)
DEFAULT_SEEDS = 5
METRICS = ("delta_log_z", "delta_log_z_rw", "w2", "w2_floor", "w2_stratified", "w2_stratified_floor", "eubo")


@dataclass(frozen=True)
class Config:
    """One row of the comparison: an objective, on- or off-policy, and finetune overrides (the off-policy tools)."""

    name: str
    algo: str
    on_policy: bool = False
    explore: bool = False  # the decaying exploration std
    overrides: dict = field(default_factory=dict)
    paper: str | None = None  # the published row it corresponds to
    steps_fraction: float = 1.0  # of the budget's steps: the paper trains its LP rows 10,000 of 25,000 iterations


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("TB", "rtb", paper="TB"),
        Config("TB+Expl", "rtb", explore=True, paper="TB + Expl."),
        Config("TB+Expl+LS", "rtb", explore=True, overrides={"replay": True, "local_search": True}, paper="TB + Expl. + LS"),
        Config("TB+Expl+LP", "rtb", explore=True, overrides={"langevin": True}, paper="TB + Expl. + LP", steps_fraction=LP_FRACTION),
        Config(
            "TB+Expl+LP+LS",
            "rtb",
            explore=True,
            overrides=LP_LS,
            paper="TB + Expl. + LP + LS",
            steps_fraction=LP_FRACTION,
        ),
        # no exploration: the paper has no such row; on ManyWell exploration cost this row its ELBO (README)
        Config("TB+LP+LS", "rtb", overrides=LP_LS, steps_fraction=LP_FRACTION),
        Config("VarGrad", "vargrad"),  # on-policy, no exploration: the paper has no such row; rtbcli's best Funnel ΔlogZ
        Config("VarGrad+Expl", "vargrad", explore=True, paper="VarGrad + Expl."),
        Config(
            "VarGrad+Expl+LP+LS",
            "vargrad",
            explore=True,
            overrides=LP_LS,
            paper="VarGrad + Expl. + LP + LS",
            steps_fraction=LP_FRACTION,
        ),
        Config("Trust-PCL+Expl", "trust-pcl", explore=True),
        Config("REINFORCE-KL", "reinforce-kl", on_policy=True),
    )
}


def config_names(configs: list[str] | None, quick: bool) -> list[str]:
    """The configurations to run (default: all; quick: `QUICK_CONFIGS`), an unknown or repeated name refused."""
    if configs is not None and not configs:
        raise InputError(f"--configs is empty: give names from {', '.join(CONFIGS)}")
    names = list(configs) if configs else list(QUICK_CONFIGS if quick else CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise InputError(f"unknown configuration(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    if len(set(names)) != len(names):
        raise InputError(f"--configs names a configuration twice: {', '.join(names)}")
    return names


def table_target(preset: Preset) -> str | None:
    """The published table's key for the preset's target ('gmm25', 'funnel', 'manywell'), or None for another target."""
    assert preset.target is not None
    module, _, name = preset.target.log_density.partition(":")
    return name if module == "rtbcli.energy.targets" and name in load_table1()["targets"] else None


def exact_samples_note(target: str | None) -> str:
    if target == "gmm25":
        return (
            "W2 against exact i.i.d. samples (multinomial mode counts); W2 strat. against the paper's stratified draw "
            "(an equal count per mode, as its Table 1 was measured: its W2 column is there)"
        )
    return "W2 against exact i.i.d. samples of the target"


def exploration_end_step(steps: int) -> int:
    """Step 5,000 of the paper's 25,000, scaled to the run's budget."""
    return max(1, round(EXPLORATION_END * steps / PAPER_STEPS))


def preset_for(preset: Preset, config: Config, budget, quick: bool = False) -> Preset:
    """The preset a configuration trains with: the budget's steps, batch and lr, exploration, the off-policy tools."""
    steps = config_steps(config, budget.finetune_steps)
    explore = {"exploration": EXPLORATION, "exploration_end_step": exploration_end_step(budget.finetune_steps)} if config.explore else {}
    evals = QUICK_EVALS_PER_RUN if quick else EVALS_PER_RUN
    return preset.updated("evaluate", n=budget.eval_n).updated(
        "finetune",
        steps=steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        eval_every=max(1, steps // evals),
        **({"exploration": 0.0} if not config.explore else explore),
        **config.overrides,
    )


def config_steps(config: Config, steps: int) -> int:
    """A configuration's share of the budget's steps (the LP rows: 40%, as the paper's 10,000 of 25,000)."""
    return max(1, round(steps * config.steps_fraction))


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
    reuse: bool = False,
) -> dict:
    """Train and score every configuration for every seed; returns the summary (also written to out/summary.json).
    The caller has prepared `out`. `reuse`: finished runs already in `out` (same configuration, seed and settings) are
    evaluated, not trained again: a grid cut off part-way resumes, and seeds run as separate commands into one folder
    come together in one table."""
    names = config_names(configs, quick)
    console = console or Console(stderr=True)
    # --reuse: the training seconds of every finished run found, each file checked before anything is trained
    reused = {
        (name, seed): reusable_seconds(
            out / f"{run_stem(name, seed)}.safetensors",
            out / f"{run_stem(name, seed)}.jsonl",
            preset_for(preset, CONFIGS[name], budget, quick),
            CONFIGS[name],
            seed,
        )
        for name in (names if reuse else [])
        for seed in range(first_seed, first_seed + seeds)
    }
    started, t_start = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    runs, total, k = [], len(names) * seeds, 0
    panels: list[tuple[str, torch.Tensor]] = []  # the figure: each configuration's first seed, beside exact samples
    plot_target: list = []
    for name in names:
        config = CONFIGS[name]
        p = preset_for(preset, config, budget, quick)
        for seed in range(first_seed, first_seed + seeds):
            k += 1
            console.print(f"[bold cyan][{k}/{total}][/] {name}, seed {seed}: {p.finetune.steps:,} steps, batch {budget.batch_size}")
            run, ev = _one(p, ref, config, seed, out, budget.eval_n, device, progress, console, reused.get((name, seed)))
            runs.append(run)
            if ev is not None and not any(t == name for t, _ in panels):
                if not panels and ev.target_samples is not None:
                    panels.append(("exact samples", ev.target_samples))
                panels.append((name, ev.samples))
                plot_target[:] = [ev.target]
    target = table_target(preset)
    goals = published_goals(target)
    for run in runs:
        run["seconds_to_goal"] = seconds_to_goal(run.get("curve") or [], goals)
    table = load_table1()
    published = [{"method": r["method"], "amortized": r["amortized"], **r[target]} for r in table["rows"]] if target is not None else []
    summary = {
        "command": "reproduce",
        "mode": "energy",
        "quick": quick,
        "preset": ref,
        "target": target,
        "seeds": list(range(first_seed, first_seed + seeds)),
        **provenance(started, t_start, device),
        "budget": {**budget.__dict__, "exploration": EXPLORATION, "exploration_end_step": exploration_end_step(budget.finetune_steps)},
        "eval_n": budget.eval_n,
        "w2_samples": exact_samples_note(target),
        "configs": {
            n: {"algo": CONFIGS[n].algo, "on_policy": CONFIGS[n].on_policy, "explore": CONFIGS[n].explore, **CONFIGS[n].overrides}
            for n in names
        },
        "runs": runs,
        "goals": goals,
        "rows": [aggregate(n, [r for r in runs if r["config"] == n]) for n in names],
        "published": published,
        "published_citation": table["citation"] if target is not None else None,
        "out": str(out),
    }
    if panels:
        summary["figure"] = str(out / "figure.png")
        plot_panels(
            out / "figure.png",
            panels,
            plot_target[0],
            suptitle=f"{ref}: samples of each configuration (seed {first_seed}), {budget.eval_n:,} each"
            + ("" if preset.dim == 2 else " (coordinates 0 and 1)"),
        )
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _one(
    p: Preset,
    ref: str,
    config: Config,
    seed: int,
    out: Path,
    n: int,
    device,
    progress: bool,
    console: Console,
    reused_seconds: float | None = None,
) -> tuple[dict, Any]:
    """One configuration and seed: train from the Brownian prior, evaluate; a run that diverges is a row saying so.
    `reused_seconds`: the finished run already in `out` (`reusable_seconds`) is evaluated, not trained again.
    Returns the row and the evaluation (None: diverged)."""
    stem = run_stem(config.name, seed)
    ck_path, log_path = out / f"{stem}.safetensors", out / f"{stem}.jsonl"
    run = {"config": config.name, "algo": config.algo, "seed": seed}
    seconds = reused_seconds
    if seconds is not None:
        console.print(f"{config.name}, seed {seed}: reusing the finished run in {ck_path}")
        ev = evaluate(load_checkpoint(ck_path), n, seed, device)
        return _row(run, ck_path, p, seconds, ev, log_path, reused=True), ev
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
        return {**run, "checkpoint": None, "diverged": str(e)}, None
    ev = evaluate(load_checkpoint(ck_path), n, seed, device)
    return _row(run, ck_path, p, r.seconds, ev, log_path, reused=False), ev


def run_stem(config: str, seed: int) -> str:
    """The file stem of a configuration's run for a seed in the output folder: 'TB_Expl_LS-seed0'."""
    return f"{config}-seed{seed}".replace("+", "_")


def _row(run: dict, ck_path: Path, p: Preset, seconds: float, ev, log_path: Path, reused: bool) -> dict:
    return {
        **run,
        "checkpoint": str(ck_path),
        "reused": reused,
        "steps": p.finetune.steps,
        "train_seconds": round(seconds, 1),
        **{m: ev.metrics.get(m) for m in METRICS},
        "curve": learning_curve(log_path),
    }


def reusable_seconds(ck_path: Path, log_path: Path, p: Preset, config: Config, seed: int) -> float | None:
    """The training seconds of a finished run in `ck_path` of this configuration, seed and settings (None: no file).
    A file that holds another run is an InputError: `--reuse` never mixes settings into one row. The in-loop
    evaluations' period (`eval_every`) is not a setting of the run (they draw from a generator of their own), so a run
    of `finetune --eval-every N` with the same settings is reused."""
    if not ck_path.exists():
        return None
    ck = load_checkpoint(ck_path)
    run = json.loads(ck.meta.get("run", "{}"))
    same = (
        ck.kind == "finetuned"
        and ck.algo == config.algo
        and int(ck.meta.get("seed", -1)) == seed
        and bool(run.get("on_policy")) == config.on_policy
        and ck.preset.finetune.model_copy(update={"eval_every": 0}) == p.finetune.model_copy(update={"eval_every": 0})
        and ck.preset.sampler == p.sampler
        and ck.preset.target is not None
        and p.target is not None
        and ck.preset.target.log_density == p.target.log_density
    )
    if not same:
        raise InputError(
            f"--reuse: {ck_path} holds a run with other settings than {config.name}, seed {seed}: remove it or choose another --out"
        )
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()] if log_path.exists() else []
    if run.get("status") != "finished" or not records or "seconds" not in records[-1]:
        raise InputError(f"--reuse: {ck_path} is not a finished run with its log ({log_path.name}): remove it or choose another --out")
    return float(records[-1]["seconds"])


CURVE_KEYS = ("delta_log_z", "delta_log_z_rw", "w2", "w2_stratified")


W2_STRATIFIED = "w2_stratified"


def learning_curve(log: Path) -> list[dict]:
    """The run's in-loop evaluations (finetune's eval_every): step, training seconds so far, and Table 1's numbers."""
    rows = []
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        rec = json.loads(line)
        if "eval" in rec:
            rows.append({"step": rec["step"], "seconds": round(rec["seconds"], 2), **{k: rec["eval"].get(k) for k in CURVE_KEYS}})
    return rows


def published_goals(target: str | None) -> dict[str, float]:
    """The numbers to reach on a published target (the issue's goal): the best amortised row's mean of delta_log_z and
    w2, and for delta_log_z_rw the best row's mean plus one of its stds. 25GMM's published W2 was measured against a
    stratified reference (`exact_samples_note`), so its goal is on w2_stratified, measured the same way."""
    if target is None:
        return {}
    goals = {}
    for m in ("delta_log_z", "delta_log_z_rw", "w2"):
        _, mean, std = best_row(target, m)
        goals[W2_STRATIFIED if m == "w2" and target == "gmm25" else m] = mean + std if m == "delta_log_z_rw" else mean
    return goals


def seconds_to_goal(curve: list[dict], goals: dict[str, float]) -> dict[str, float | None]:
    """Per metric, the training seconds at the first in-loop evaluation at or below its goal (None: not reached)."""
    out: dict[str, float | None] = {}
    for m, goal in goals.items():
        hit = [c["seconds"] for c in curve if c.get(m) is not None and c[m] <= goal]
        out[m] = hit[0] if hit else None
    return out


def aggregate(name: str, runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric and the training time ([mean, std]; std 0 for one seed; None: no run)."""
    done = [r for r in runs if r.get("checkpoint") is not None]
    row: dict = {"config": name, "seeds": len(runs), "diverged": len(runs) - len(done)}
    for key in (*METRICS, "train_seconds"):
        vals = [float(r[key]) for r in done if r.get(key) is not None]
        row[key] = None if not vals else [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
    reached: dict = {}
    for m in sorted({m for r in done for m in r.get("seconds_to_goal", {})}, key=CURVE_KEYS.index):
        secs = [r["seconds_to_goal"][m] for r in done if r["seconds_to_goal"].get(m) is not None]
        reached[m] = {"runs": len(secs), "of": len(done), "median_seconds": statistics.median(secs) if secs else None}
    row["seconds_to_goal"] = reached
    return row


def _pm(cell, digits: int = 3, one_seed: bool = False) -> str:
    """mean ± std; with one seed the mean alone (a std of one run is not a number)."""
    if cell is None:
        return "—"
    return f"{cell[0]:.{digits}f}" if one_seed else f"{cell[0]:.{digits}f} ± {cell[1]:.{digits}f}"


def energy_table(summary: dict) -> Table:
    """The comparison: our rows (mean ± std over seeds), the paper's rows for the target, the exact-sample W2 floor.
    25GMM has a column more, W2 against the stratified reference the paper measured with: its published W2 goes there."""
    seeds = len(summary["seeds"])
    b = summary["budget"]
    strat = any(row.get(W2_STRATIFIED) is not None for row in summary["rows"])
    lp = sorted({r["steps"] for r in summary["runs"] if r.get("steps") and r["steps"] != b["finetune_steps"]})
    lp_steps = f" (LP rows: {', '.join(f'{n:,}' for n in lp)})" if lp else ""  # their share of the budget, config_steps
    t = Table(
        title=f"{summary['preset']}: {b['finetune_steps']:,} steps{lp_steps}, batch {b['batch_size']}, K = {summary['eval_n']:,}, "
        f"{seeds} seed{'s' if seeds != 1 else ''}",
        caption=summary["w2_samples"],
    )
    cols = ("configuration", "ΔlogZ", "ΔlogZ^RW", "W2", *(("W2 strat.",) if strat else ()), "EUBO", "train s")
    for col in cols:
        t.add_column(col, justify="left" if col == "configuration" else "right")
    blank = [""] * (len(cols) - 1)
    for row in summary["rows"]:
        name = row["config"] + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        one = row["seeds"] - row["diverged"] <= 1
        w2 = [_pm(row["w2"], 2, one), *((_pm(row.get(W2_STRATIFIED), 2, one),) if strat else ())]
        t.add_row(
            name,
            _pm(row["delta_log_z"], 3, one),
            _pm(row["delta_log_z_rw"], 3, one),
            *w2,
            _pm(row["eubo"], 3, one),
            _pm(row["train_seconds"], 0, one),
        )
    floor = next((row for row in summary["rows"] if row["w2_floor"] is not None), None)
    if floor is not None:
        one = seeds == 1
        w2 = [_pm(floor["w2_floor"], 2, one), *((_pm(floor.get("w2_stratified_floor"), 2, one),) if strat else ())]
        t.add_row("exact sampler (W2 floor)", "", "", *w2, "", "", style="dim")
    if summary["published"]:
        c = summary["published_citation"]
        t.add_section()
        t.add_row(f"[italic]published (Sendera et al. 2024, arXiv {c['arxiv']}, Table 1 / C.1; 25,000 steps, 5 runs)[/]", *blank)
        for r in summary["published"]:
            w2 = ["", _pm(r["w2"], 2)] if strat else [_pm(r["w2"], 2)]
            t.add_row(
                r["method"] + ("" if r["amortized"] else " (MCMC)"),
                _pm(r["delta_log_z"]),
                _pm(r["delta_log_z_rw"]),
                *w2,
                "",
                "",
                style="dim",
            )
    return t


def goal_table(summary: dict) -> Table | None:
    """Time to the published best: per configuration and metric, the median training seconds (2 CPU threads here) at the
    first in-loop evaluation at or below the goal, and in how many runs it was reached."""
    goals = summary.get("goals") or {}
    if not goals:
        return None
    labels = {"delta_log_z": "ΔlogZ", "delta_log_z_rw": "ΔlogZ^RW", "w2": "W2", W2_STRATIFIED: "W2 (stratified ref.)"}
    t = Table(
        title="time to the published best (training seconds at the first in-loop evaluation at or below it; runs that reached it)",
        caption="goals: " + ", ".join(f"{labels[m]} ≤ {g:.3g}" for m, g in goals.items()) + " (ΔlogZ^RW: best mean + its std)",
    )
    t.add_column("configuration")
    for m in goals:
        t.add_column(labels[m], justify="right")
    for row in summary["rows"]:
        cells = []
        for m in goals:
            c = row["seconds_to_goal"].get(m, {"of": 0})
            cells.append(
                "—"
                if not c["of"]
                else f"{c['median_seconds']:.0f} s ({c['runs']}/{c['of']})"
                if c["runs"]
                else f"not reached (0/{c['of']})"
            )
        t.add_row(row["config"], *cells)
    return t
