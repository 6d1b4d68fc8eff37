"""Figures read at a glance: samples over the target's contours, and per-mode weights.

Drawn with matplotlib's Agg canvas on standalone `Figure`s (no pyplot state, safe headless and
in tests) and written atomically as PNG: a failed save leaves any earlier file untouched.

>>> plot_evaluation("eval.png", ev.samples, ev.target, ev.metrics)
>>> plot_panels("fig1.png", [("prior", xp), ("target", xt), ("RTB", xr)], target)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .errors import InputError
from .metric_registry import HEADLINE, METRICS, floor_of, format_value
from .runtime import atomic_path, check_writable
from .targets import Target

DPI = 120
MAX_POINTS = 4000  # scatter at most this many points (a fixed subsample)
LEVELS = (-9.0, -6.0, -3.0, -1.0)  # contour levels of log density relative to its maximum
SAMPLE_COLOR, TARGET_COLOR, MASS_COLOR = "#1f5fa8", "#d9822b", "#9a9a9a"


def _as_points(samples: np.ndarray | torch.Tensor, target: Target | None, dims: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, int]:
    """Finite rows of `samples` as float64 (n, 2), the coordinates `dims` of (n, d) samples (or
    (n, 1) for 1-D samples), subsampled to MAX_POINTS, and the number dropped as non-finite."""
    x = samples.detach().cpu().double().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"plots need samples of shape (n, d): got {tuple(x.shape)}")
    d = x.shape[1]
    if target is not None and target.cell_means is not None and target.cell_means.shape[1] != d:
        raise InputError(f"samples of dimension {d} for a {target.cell_means.shape[1]}-D task")
    if d > 1:
        if not all(0 <= i < d for i in dims) or dims[0] == dims[1]:
            raise InputError(f"--dims {dims[0]},{dims[1]}: give two different coordinates between 0 and {d - 1}")
        x = x[:, list(dims)]
    finite = np.isfinite(x).all(axis=1)
    x = x[finite]
    if len(x) > MAX_POINTS:
        x = x[np.sort(np.random.default_rng(0).choice(len(x), MAX_POINTS, replace=False))]
    return x, int((~finite).sum())


def _half_width(target: Target | None) -> float:
    """Half-width of the square plotting box: 13 for the reference grid, wider if modes lie farther out."""
    return 13.0 if target is None or target.cell_means is None else max(13.0, float(target.cell_means.abs().max()) + 3.0)


def _density(target: Target, half: float, n: int = 241) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates (n,) and log density relative to its maximum, (n, n) indexed [y, x]."""
    if target.log_density is None:
        raise InputError(f"the target {target.description} has no density to draw contours of")
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
    if target is not None and strong and target.cell_means is not None:
        radius = target.radius
        if radius is not None:  # the mode cells, where the target has a radius for them
            for mu in target.cell_means.tolist():
                ax.add_patch(Circle(mu, radius, fill=False, lw=0.5, ls="--", color="0.6", zorder=1))
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
    """'modes 9/9 · mode KL 0.004 · off-target 0.3% · hist KL 0.05', then the reference distances beside their floor
    (the registry's headline metrics present in the report), or nothing."""
    parts = []
    for key in HEADLINE:
        x = METRICS[key]
        if m.get(key) is None and not (key in m and x.floor is not None and x.floor.startswith("floor.")):
            continue  # a mode metric the task has but could not compute shows as n/a, others only where present
        v = "n/a" if m.get(key) is None else format_value(key, m[key], report=m)
        floor = "" if x.floor is None or x.floor.startswith("floor.") else f" (floor {_fmt(floor_of(m, key))})"
        parts.append(f"{x.short} {v}{floor}")
    return " · ".join(parts).replace("MMD^2", "MMD²")


def _label(mu: list[float], k: int) -> str:
    return "(" + ",".join(f"{round(v, 2):g}" for v in mu) + ")" if len(mu) <= 3 else f"mode {k}"


def _draw_weights(ax, target: Target, metrics: dict, x: np.ndarray) -> None:
    """Horizontal grouped bars of target mass vs model frequency per mode cell, then 'elsewhere'."""
    means = target.cell_means
    if means is None:
        raise InputError(f"the target {target.description} has no modes to weigh")
    k = means.shape[0]
    cells = metrics.get("cells")
    freq = mass = None
    if cells:
        freq = [c["frequency"] for c in cells["modes"]] + [cells["elsewhere"]["frequency"]]
        mass = [c["target_mass"] for c in cells["modes"]] + [cells["elsewhere"]["target_mass"]]
    if freq is None and len(x) and x.shape[1] == means.shape[1]:  # fall back to the plotted samples
        from .metrics import per_mode_frequencies

        counted = per_mode_frequencies(torch.from_numpy(x), target)
        freq = None if counted is None else counted.tolist()
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
    ax.set_yticks(y, [_label(means[i].tolist(), i) if i < k else "elsewhere" for i in rows], fontsize=7)
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


def _is_plane(target: Target | None, samples, dims: tuple[int, int]) -> bool:
    """Samples of a 2-D task, shown in their plane with the target's contours."""
    d = samples.shape[1] if hasattr(samples, "shape") and len(samples.shape) == 2 else None
    return d == 2 and tuple(dims) == (0, 1) and target is not None and target.log_density is not None


def _box(*arrays: np.ndarray | None) -> tuple[float, float]:
    """A common range for all the arrays (None ones left out) (1st and 99th percentiles, widened by 10%)."""
    v = np.concatenate([a.reshape(-1) for a in arrays if a is not None and a.size])
    if not v.size:
        return -1.0, 1.0
    lo, hi = np.percentile(v, [0.5, 99.5])
    pad = 0.1 * (hi - lo) + 1e-9
    return float(lo - pad), float(hi + pad)


def _draw_projection(ax, x: np.ndarray, ref: np.ndarray | None, dims: tuple[int, int], dropped: int, marginals: bool, lims=None) -> None:
    """Samples (and reference samples, behind) in the plane of two coordinates, with marginal histograms;
    for 1-D samples, their histogram over the reference's."""
    if x.shape[1] == 1:
        lo, hi = lims or _box(x, ref)
        bins = np.linspace(lo, hi, 61)
        if ref is not None:
            ax.hist(ref[:, 0], bins=bins, density=True, color=TARGET_COLOR, alpha=0.35, label="reference")
        ax.hist(x[:, 0], bins=bins, density=True, histtype="step", color=SAMPLE_COLOR, lw=1.4, label="model")
        ax.set_xlabel("x0", fontsize=9)
        ax.legend(fontsize=8, frameon=False)
    else:
        (lo0, hi0), (lo1, hi1) = lims or (
            _box(x[:, 0], None if ref is None else ref[:, 0]),
            _box(x[:, 1], None if ref is None else ref[:, 1]),
        )
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=2.5, alpha=0.3, c=TARGET_COLOR, lw=0, rasterized=True, zorder=1, label="reference")
        ax.scatter(x[:, 0], x[:, 1], s=2.5, alpha=0.35, c=SAMPLE_COLOR, lw=0, rasterized=True, zorder=2, label="model")
        ax.set_xlim(lo0, hi0)
        ax.set_ylim(lo1, hi1)
        ax.set_xlabel(f"x{dims[0]}", fontsize=9)
        ax.set_ylabel(f"x{dims[1]}", fontsize=9)
        if marginals:
            top, right = ax.inset_axes([0, 1.02, 1, 0.18], sharex=ax), ax.inset_axes([1.02, 0, 0.18, 1], sharey=ax)
            for k, (axm, orient) in enumerate(((top, "vertical"), (right, "horizontal"))):
                bins = np.linspace(*((lo0, hi0) if k == 0 else (lo1, hi1)), 51)
                if ref is not None:
                    axm.hist(ref[:, k], bins=bins, density=True, color=TARGET_COLOR, alpha=0.35, orientation=orient)
                axm.hist(x[:, k], bins=bins, density=True, histtype="step", color=SAMPLE_COLOR, orientation=orient)
                axm.set_axis_off()
        if ref is not None:
            ax.legend(fontsize=8, loc="lower right", frameon=False, markerscale=4)
    if dropped:
        ax.text(0.02, 0.02, f"{dropped} non-finite dropped", transform=ax.transAxes, fontsize=7, color="firebrick")
    ax.tick_params(labelsize=8, length=2)


def _draw_coordinates(ax, samples, reference) -> None:
    """Mean and standard deviation of every coordinate (at most 64), model beside reference."""
    x = samples.detach().cpu().double() if isinstance(samples, torch.Tensor) else torch.as_tensor(samples, dtype=torch.float64)
    x = x[torch.isfinite(x).all(1)]
    d = min(x.shape[1], 64)
    idx = np.arange(d)
    if reference is not None:
        r = reference.double()
        ax.errorbar(
            idx - 0.15, r[:, :d].mean(0).numpy(), yerr=r[:, :d].std(0).numpy(), fmt="o", ms=3, color=TARGET_COLOR, lw=0.8, label="reference"
        )
    if len(x):
        ax.errorbar(
            idx + 0.15, x[:, :d].mean(0).numpy(), yerr=x[:, :d].std(0).numpy(), fmt="o", ms=3, color=SAMPLE_COLOR, lw=0.8, label="model"
        )
    ax.set_xlabel("coordinate" + (" (first 64)" if x.shape[1] > 64 else ""), fontsize=9)
    ax.set_ylabel("mean ± std", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", lw=0.4, alpha=0.5)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the bars fill the axes


def plot_evaluation(
    path: str | Path,
    samples: np.ndarray | torch.Tensor,
    target: Target,
    metrics: dict,
    title: str | None = None,
    dims: tuple[int, int] = (0, 1),
    reference: torch.Tensor | None = None,
) -> None:
    """Left: model samples over the target's contours (2-D tasks), or in the plane of coordinates `dims`
    with the marginals and the reference samples behind (other d). Right: per-mode weights where the
    target has modes, else every coordinate's mean and spread. Headline metrics on top."""
    x, dropped = _as_points(samples, target, dims)
    ref = None if reference is None else _as_points(reference, None, dims)[0]
    fig = Figure(figsize=(11, 5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.05])
    n = len(samples)
    shown = f"{len(x):,} of {n:,} samples" if len(x) < n - dropped else f"{n:,} samples"
    if _is_plane(target, samples, dims):
        half = _half_width(target)
        _draw_samples(left, x, target, _density(target, half), half, dropped, strong=True)
        left.set_title(f"{shown} over the target {target.description}", fontsize=9)
    else:
        _draw_projection(left, x, ref, dims, dropped, marginals=True)
        where = "" if x.shape[1] == 1 else f", coordinates {dims[0]} and {dims[1]}"
        left.set_title(f"{shown}{where}" + (" (reference behind)" if ref is not None else ""), fontsize=9, pad=40 if x.shape[1] > 1 else 6)
    if target.cell_means is not None:
        _draw_weights(right, target, metrics, x if x.shape[1] == target.cell_means.shape[1] else np.empty((0, 2)))
        some_off = target.target_modes is not None and not bool(target.target_modes.all())
        right.set_title("per-mode weights (off-target modes in red)" if some_off else "per-mode weights", fontsize=9)
    else:
        _draw_coordinates(right, samples, reference)
        right.set_title("every coordinate: mean ± std", fontsize=9)
    if title is None:
        who = " ".join(str(metrics[key]) for key in ("algo", "kind") if metrics.get(key))
        title = f"{who} checkpoint" if who else "evaluation"
    fig.suptitle(f"{title}\n{_headline(metrics)}", fontsize=11)
    _save(fig, path)


def plot_panels(
    path: str | Path,
    panels: Sequence[tuple[str, np.ndarray | torch.Tensor]],
    target: Target | None,
    suptitle: str | None = None,
    subtitles: list[str] | None = None,
    dims: tuple[int, int] = (0, 1),
    reference: torch.Tensor | None = None,
) -> None:
    """Square scatter panels with identical axes, one per (title, samples), over faint target contours
    (2-D tasks) or reference samples in the plane of coordinates `dims` (other d); 4 per row."""
    if not panels:
        raise InputError("plot_panels needs at least one (title, samples) panel")
    if subtitles is not None and len(subtitles) != len(panels):
        raise InputError(f"plot_panels: {len(subtitles)} subtitles for {len(panels)} panels")
    points = [_as_points(s, target, dims) for _, s in panels]
    plane = all(_is_plane(target, s, dims) for _, s in panels)
    ref = None if reference is None or plane else _as_points(reference, None, dims)[0]
    lims: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] | None = None
    if plane and target is not None:  # (a plane has a target)
        half = _half_width(target)
        grid = _density(target, half)
    else:
        every = [p for p, _ in points] + ([ref] if ref is not None else [])
        lims = _box(*every) if every[0].shape[1] == 1 else (_box(*[a[:, 0] for a in every]), _box(*[a[:, 1] for a in every]))
    nrows = math.ceil(len(panels) / 4)
    ncols = math.ceil(len(panels) / nrows)  # balanced rows of at most 4
    fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows + (0.35 if suptitle else 0.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        x, dropped = points[i]
        if plane:
            _draw_samples(ax, x, target, grid, half, dropped, strong=False)
        else:
            _draw_projection(ax, x, ref, dims, dropped, marginals=False, lims=lims)
        sub = subtitles[i] if subtitles is not None else ""
        ax.set_title(panels[i][0], fontsize=10, pad=15 if sub else 6)
        if sub:
            ax.text(0.5, 1.015, sub, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="0.35")
        if plane:
            ax.tick_params(labelleft=i % ncols == 0, labelbottom=i + ncols >= len(panels))
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    _save(fig, path)


def image_shape(ck) -> tuple[int, int, int] | None:
    """(C, H, W) of a checkpoint whose samples are images, in [-1, 1]: a diffusers model's (its UNet's config), or the
    digits dataset's (1, 8, 8) at its standard scaling; None for other checkpoints."""
    from .lora import image_shape as unet_image_shape
    from .lora import model_folders

    spec = ck.preset.sampler
    if spec.model is not None:
        return unet_image_shape(json.loads((model_folders(Path(spec.model))[0] / "config.json").read_text()))
    data = ck.preset.prior_data
    if getattr(data, "dataset", None) == "digits" and data.scale in (None, 0.125) and data.shift in (None, -1.0):
        return 1, 8, 8
    return None


def write_image_grid(path: str | Path, x: np.ndarray | torch.Tensor, shape: tuple[int, int, int], n: int = 64) -> None:
    """The first `n` samples (rows of C * H * W values in [-1, 1], C order) as a PNG grid of images, 1-pixel gaps,
    greyscale (C = 1) or RGB (C = 3), scaled up for viewing; written atomically."""
    c, h, w = shape
    if c not in (1, 3):
        raise InputError(f"an image grid shows 1 or 3 channels (the model has {c}): save the samples as .npy instead")
    imgs = np.clip((np.asarray(x, dtype=np.float64)[:n].reshape(-1, c, h, w) + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    side = max(1, math.ceil(math.sqrt(len(imgs))))
    grid = np.ones((side * (h + 1) - 1, side * (w + 1) - 1, c))
    for k, img in enumerate(imgs):
        i, j = divmod(k, side)
        grid[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = img
    fig = Figure(figsize=(min(8.0, 0.3 * grid.shape[1] / (w + 1) + 1), min(8.0, 0.3 * grid.shape[0] / (h + 1) + 1)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    _save(fig, path)
