"""Figures read at a glance: samples over the target's contours, and per-mode weights.

Drawn with matplotlib's Agg canvas on standalone `Figure`s (no pyplot state, safe headless and
in tests) and written atomically as PNG: a failed save leaves any earlier file untouched.

>>> plot_evaluation("eval.png", ev.samples, ev.target, ev.metrics)
>>> plot_panels("fig1.png", [("prior", xp), ("target", xt), ("RTB", xr)], target)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .errors import InputError
from .runtime import atomic_path, check_writable
from .targets import Target

DPI = 120
MAX_POINTS = 4000  # scatter at most this many points (a fixed subsample)
LEVELS = (-9.0, -6.0, -3.0, -1.0)  # contour levels of log density relative to its maximum
SAMPLE_COLOR, TARGET_COLOR, MASS_COLOR = "#1f5fa8", "#d9822b", "#9a9a9a"


def _as_points(samples: np.ndarray | torch.Tensor, target: Target | None) -> tuple[np.ndarray, int]:
    """Finite rows of `samples` as float64 (n, 2), subsampled to MAX_POINTS, and the number dropped as non-finite."""
    x = samples.detach().cpu().double().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, dtype=np.float64)
    d = target.cell_means.shape[1] if target is not None else (x.shape[1] if x.ndim == 2 else x.ndim)
    if d != 2 or x.ndim != 2 or x.shape[1] != 2:
        raise InputError(f"plots need a 2-D task: got samples of shape {tuple(x.shape)} for a {d}-D task")
    finite = np.isfinite(x).all(axis=1)
    x = x[finite]
    if len(x) > MAX_POINTS:
        x = x[np.sort(np.random.default_rng(0).choice(len(x), MAX_POINTS, replace=False))]
    return x, int((~finite).sum())


def _half_width(target: Target | None) -> float:
    """Half-width of the square plotting box: 13 for the reference grid, wider if modes lie farther out."""
    return 13.0 if target is None else max(13.0, float(target.cell_means.abs().max()) + 3.0)


def _density(target: Target, half: float, n: int = 241) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates (n,) and log density relative to its maximum, (n, n) indexed [y, x]."""
    c = torch.linspace(-half, half, n, dtype=torch.float64)
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    with torch.no_grad():
        ld = target.log_density(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).double().reshape(n, n)
    ld = torch.nan_to_num(ld, nan=-math.inf)
    return c.numpy(), (ld - ld.max()).clamp_min(-50.0).numpy()


def _draw_samples(ax, x: np.ndarray, target: Target | None, grid, half: float, dropped: int, strong: bool) -> None:
    """Scatter `x` over the target's contours, its mode cells and marked target modes, in the square box."""
    if grid is not None:
        c, rel = grid
        ax.contourf(c, c, rel, levels=[*LEVELS, 0.0], cmap="Oranges", alpha=0.18, zorder=0)
        ax.contour(c, c, rel, levels=LEVELS, colors=TARGET_COLOR, linewidths=0.6, alpha=0.6 if strong else 0.4, zorder=1)
    if target is not None and strong:
        for mu in target.cell_means.tolist():
            ax.add_patch(Circle(mu, target.radius, fill=False, lw=0.5, ls="--", color="0.6", zorder=1))
        if target.target_modes is not None:
            m = target.cell_means[target.target_modes].numpy()
            ax.scatter(m[:, 0], m[:, 1], marker="+", s=40, c="k", lw=0.9, zorder=3)
    ax.scatter(x[:, 0], x[:, 1], s=2.5, alpha=0.35, c=SAMPLE_COLOR, lw=0, rasterized=True, zorder=2)
    if dropped:
        ax.text(0.02, 0.02, f"{dropped} non-finite dropped", transform=ax.transAxes, fontsize=7, color="firebrick")
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    ticks = list(range(-5 * int(half // 5), int(half) + 1, 5))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=8, length=2)


def _fmt(v, pattern: str = "{:.3g}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else pattern.format(v)


def _headline(m: dict) -> str:
    """'coverage 9/9 · mode KL 0.004 · off-target 0.3% · hist KL 0.05' (n/a where unavailable)."""
    cov, k = m.get("mode_coverage"), m.get("n_target_modes")
    off = m.get("off_target")
    return " · ".join([
        f"coverage {_fmt(cov, '{}')}/{_fmt(k, '{}')}" if cov is not None else "coverage n/a",
        f"mode KL {_fmt(m.get('kl_mode'))}",
        f"off-target {_fmt(None if off is None else 100 * off, '{:.1f}%')}",
        f"hist KL {_fmt(m.get('kl_hist'))}",
    ])


def _label(mu: list[float]) -> str:
    return "(" + ",".join(f"{round(v, 2):g}" for v in mu) + ")"


def _draw_weights(ax, target: Target, metrics: dict, x: np.ndarray) -> None:
    """Horizontal grouped bars of target mass vs model frequency per mode cell, then 'elsewhere'."""
    k = target.cell_means.shape[0]
    freq = metrics.get("mode_frequencies")
    if freq is None and len(x):  # fall back to the plotted samples
        from .metrics import per_mode_frequencies
        freq = per_mode_frequencies(torch.from_numpy(x), target).tolist()
    mass = metrics.get("mode_masses")
    if mass is None and target.cell_masses is not None:
        mass = target.cell_masses.tolist()
    if freq is None and mass is None:
        ax.text(0.5, 0.5, "per-mode weights not available", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    q = np.asarray(freq if freq is not None else [0.0] * (k + 1), dtype=float)
    p = np.asarray(mass if mass is not None else [0.0] * (k + 1), dtype=float)
    shown = [i for i in range(k) if p[i] > 0 or q[i] > 0]
    shown.sort(key=lambda i: (-p[i], -q[i], i))  # target modes by mass, then off-target modes by frequency
    rows = shown + [k]
    y = np.arange(len(rows))
    h = 0.4 if mass is not None else 0.6
    if mass is not None:
        ax.barh(y - h / 2, p[rows], h, color=MASS_COLOR, label="target mass")
    ax.barh(y + h / 2 if mass is not None else y, q[rows], h, color=SAMPLE_COLOR, label="model frequency")
    ax.set_yticks(y, [_label(target.cell_means[i].tolist()) if i < k else "elsewhere" for i in rows], fontsize=7)
    if target.target_modes is not None:
        for tick, i in zip(ax.get_yticklabels(), rows):
            if i < k and not bool(target.target_modes[i]):
                tick.set_color("firebrick")
    ax.invert_yaxis()
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("fraction of mass", fontsize=9)
    ax.grid(axis="x", lw=0.4, alpha=0.5)
    ax.spines[["top", "right"]].set_visible(False)
    hidden = k - len(shown)
    note = f"target weights n/a ({target.method} target)" if mass is None else (f"{hidden} empty modes not shown" if hidden else None)
    ax.legend(fontsize=8, loc="lower right", frameon=False, title=note, title_fontsize=7)


def _save(fig: Figure, path: str | Path) -> None:
    """Write `fig` as PNG atomically: on failure the temporary file is removed and `path` untouched."""
    path = check_writable(Path(path), "plot")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def plot_evaluation(path: str | Path, samples: np.ndarray | torch.Tensor, target: Target, metrics: dict,
                    title: str | None = None) -> None:
    """Model samples over the target's contours (left) and per-mode weights (right), with headline metrics."""
    x, dropped = _as_points(samples, target)
    half = _half_width(target)
    fig = Figure(figsize=(11, 5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.05])
    _draw_samples(left, x, target, _density(target, half), half, dropped, strong=True)
    n = len(samples)
    shown = f"{len(x):,} of {n:,} samples" if len(x) < n - dropped else f"{n:,} samples"
    left.set_title(f"{shown} over the target {target.description}", fontsize=9)
    _draw_weights(right, target, metrics, x)
    some_off = target.target_modes is not None and not bool(target.target_modes.all())
    right.set_title("per-mode weights (off-target modes in red)" if some_off else "per-mode weights", fontsize=9)
    if title is None:
        who = " ".join(str(metrics[key]) for key in ("algo", "kind") if metrics.get(key))
        title = f"{who} checkpoint" if who else "evaluation"
    fig.suptitle(f"{title}\n{_headline(metrics)}", fontsize=11)
    _save(fig, path)


def plot_panels(path: str | Path, panels: list[tuple[str, np.ndarray | torch.Tensor]], target: Target | None,
                suptitle: str | None = None, subtitles: list[str] | None = None) -> None:
    """Square scatter panels with identical axes, one per (title, samples), over faint target contours (4 per row)."""
    if not panels:
        raise InputError("plot_panels needs at least one (title, samples) panel")
    if subtitles is not None and len(subtitles) != len(panels):
        raise InputError(f"plot_panels: {len(subtitles)} subtitles for {len(panels)} panels")
    points = [_as_points(s, target) for _, s in panels]
    half = _half_width(target)
    grid = _density(target, half) if target is not None else None
    nrows = math.ceil(len(panels) / 4)
    ncols = math.ceil(len(panels) / nrows)  # balanced rows of at most 4
    fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows + (0.35 if suptitle else 0.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        x, dropped = points[i]
        _draw_samples(ax, x, target, grid, half, dropped, strong=False)
        sub = subtitles[i] if subtitles is not None else ""
        ax.set_title(panels[i][0], fontsize=10, pad=15 if sub else 6)
        if sub:
            ax.text(0.5, 1.015, sub, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="0.35")
        ax.tick_params(labelleft=i % ncols == 0, labelbottom=i + ncols >= len(panels))
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    _save(fig, path)
