"""The target a sampler is compared with, described once per task (docs/maths.md#metrics).

- A prior checkpoint's target is its prior data p_data (log Z = 0).
- A finetuned checkpoint's target is p_data(x) r(x)^beta / Z, built from the *data*
  distribution, not the learned prior, so that a poor prior shows in the metrics.

How well it is known depends on the task (`Target.method`):

- `exact`: a Gaussian mixture whose components sit on the prior modes with the prior variance
  (mixture prior data; the reference task at beta = 1), or ManyWell-32 and its tilts. Samples
  are exact, and so are the mode-cell and histogram masses of mixtures and log Z.
- `grid` (2-D, data density known): the unnormalised density is integrated on a fine grid
  (spacing 0.02) aligned with the histogram bins: log Z, every cell and bin mass, and samples
  (a grid cell by its mass, then uniform within it) are exact to the grid's resolution.
- `sir` (data density known, d != 2): sampling-importance-resampling of p_data with weights
  r^beta; log Z is the importance estimate and mode metrics are not available.
- `reference` (data from a file or a shipped image set): no density, but reference samples:
  the data rows themselves for a prior; for a finetuned sampler, the rows accepted with
  probability r^beta / max r^beta (exact samples of the target of the empirical data), or what
  a benchmark suite provides (the digits' held-out images of the class).

This module builds the generic targets; a benchmark suite (`rtbcli.suites`) replaces them with
what it knows, and `rtbcli.suites.prior_target` / `tilted_target` are what evaluation uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .data import EmpiricalData, GaussianMixture
from .metrics import bin_index, cell_index, hist_edges, mixture_bin_masses
from .tasks import Task

GRID_SPACING = 0.02
MODE_THRESHOLD = 1e-3  # a cell is a target mode when its target mass is at least this
CELL_MASS = 1.0 - math.exp(-(1.5**2) / (2 * 0.3))  # 0.9765: what radius 1.5 holds of a 2-D component of variance 0.3
MIN_REFERENCE = 20  # fewer accepted rows than this make no reference


@dataclass
class Target:
    """What `evaluate` compares samples with (fields that do not apply are None)."""

    description: str  # e.g. "p_data * r^beta (beta = 1)"
    method: str  # "exact", "grid", "sir" or "reference"
    log_z: float | None = None  # log of the normaliser of p_data * r^beta (0 for the prior target)
    log_z_exact: bool = False
    sample: Callable[[int, torch.Generator], torch.Tensor] | None = None  # n target samples (float64, CPU)
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None  # unnormalised: log p_data + beta log r
    cell_means: torch.Tensor | None = None  # (K, d): the prior data modes (mixtures)
    radius: float | None = None
    cell_masses: torch.Tensor | None = None  # (K + 1,): target mass of each mode cell, then "elsewhere"
    target_modes: torch.Tensor | None = None  # (K,) bool: modes with target mass
    mode_weights: torch.Tensor | None = None  # (K,): the target's weight on each mode (sums to ~1)
    bin_masses: torch.Tensor | None = None  # (nb*nb + 1,) for 2-D tasks
    hist_half_width: float = 13.0
    hist_bin: float = 0.5
    reference: torch.Tensor | None = None  # a fixed set of target samples (reference targets), float64 CPU
    reference_note: str = ""
    extra: dict = field(default_factory=dict)  # what a benchmark suite knows besides (e.g. exact well masses)

    @property
    def has_samples(self) -> bool:
        return self.sample is not None


def shell_mass(dim: int, variance: float, radius: float) -> float:
    """P(|N(0, variance I_d)| <= radius), the regularised lower incomplete gamma P(d/2, r^2 / 2 var)."""
    a = torch.tensor(dim / 2.0, dtype=torch.float64)
    return float(torch.special.gammainc(a, torch.tensor(radius * radius / (2 * variance), dtype=torch.float64)))


def cell_radius(task: Task) -> float:
    """The preset's cell radius, or the radius holding CELL_MASS of a component in d dimensions.

    In 2-D that is 1.5 at variance 0.3 (closed form: sqrt(-2 var log(1 - m))); elsewhere the
    inverse of `shell_mass` by bisection.
    """
    given = task.preset.evaluate.cell_radius
    if given is not None:
        return given
    var, d = _mixture(task).variance, task.dim
    if d == 2:
        return math.sqrt(-2 * var * math.log(1 - CELL_MASS))
    lo, hi = 0.0, math.sqrt(var) * (math.sqrt(d) + 20)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if shell_mass(d, var, mid) < CELL_MASS else (lo, mid)
    return 0.5 * (lo + hi)


def _mixture(task: Task) -> GaussianMixture:
    """The task's prior data, which mode cells need to be a mixture."""
    if not isinstance(task.data, GaussianMixture):
        raise TypeError(f"mode cells need mixture prior data, not {type(task.data).__name__}")
    return task.data


def _on_modes(mix: GaussianMixture, modes: torch.Tensor, variance: float) -> torch.Tensor | None:
    """Index of the prior mode each component sits on, or None if some component does not."""
    if abs(mix.variance - variance) > 1e-12:
        return None
    d = torch.cdist(mix.means, modes)
    dmin, k = d.min(dim=1)
    return k if bool((dmin < 1e-9).all()) else None


def _exact_target(task: Task, mix: GaussianMixture, description: str, log_z: float) -> Target | None:
    data = _mixture(task)
    modes = data.means
    where = _on_modes(mix, modes, data.variance)
    if where is None:
        return None
    ev = task.preset.evaluate
    radius = cell_radius(task)
    w = torch.zeros(modes.shape[0], dtype=torch.float64).index_add_(0, where, mix.weights)
    m = shell_mass(task.dim, mix.variance, radius)
    cells = torch.cat([w * m, torch.tensor([1.0 - m], dtype=torch.float64)])
    bins = mixture_bin_masses(mix.means, mix.weights, mix.std, hist_edges(ev.hist_half_width, ev.hist_bin)) if task.dim == 2 else None
    return Target(
        description=description,
        method="exact",
        cell_means=modes,
        radius=radius,
        cell_masses=cells,
        target_modes=w > 0,
        mode_weights=w,
        bin_masses=bins,
        hist_half_width=ev.hist_half_width,
        hist_bin=ev.hist_bin,
        log_z=log_z,
        log_z_exact=True,
        sample=lambda n, g: mix.sample(n, g, dtype=torch.float64),
        log_density=lambda x: mix.log_prob(x.double()) + log_z,
    )


def _grid_target(task: Task, description: str, log_density, beta: float, spacing: float = GRID_SPACING) -> Target:
    ev = task.preset.evaluate
    mix = task.data if isinstance(task.data, GaussianMixture) else None
    # Box: the histogram range and 8 standard deviations beyond every mode, on a multiple of the
    # bin width so that grid cells tile the histogram bins exactly.
    reach = max(ev.hist_half_width, float(mix.means.abs().max()) + 8 * mix.std) if mix is not None else ev.hist_half_width
    half = math.ceil(reach / ev.hist_bin) * ev.hist_bin
    n = int(round(2 * half / spacing))
    centres = -half + spacing * (torch.arange(n, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(centres, centres, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    lu = task.grid_log_target(centres, beta)
    log_z = float(torch.logsumexp(lu, 0)) + 2 * math.log(spacing)
    mass = torch.exp(lu - torch.logsumexp(lu, 0))  # per grid cell, sums to 1
    nbins = int(round(2 * ev.hist_half_width / ev.hist_bin)) ** 2 + 1
    bins = torch.zeros(nbins, dtype=torch.float64).index_add_(0, bin_index(pts, ev.hist_half_width, ev.hist_bin), mass)
    cells = target_modes = weights = modes = radius = None
    if mix is not None:
        modes, radius = mix.means, cell_radius(task)
        k = modes.shape[0]
        cells = torch.zeros(k + 1, dtype=torch.float64).index_add_(0, cell_index(pts, modes, radius), mass)
        w = cells[:k] / shell_mass(2, mix.variance, radius)
        target_modes, weights = cells[:k] >= MODE_THRESHOLD, w / w.sum()
    cdf = torch.cumsum(mass, 0)

    def sample(count: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(count, generator=g, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u * cdf[-1]).clamp_max(pts.shape[0] - 1)
        jitter = (torch.rand(count, 2, generator=g, dtype=torch.float64) - 0.5) * spacing
        return pts[idx] + jitter

    return Target(
        description=description,
        method="grid",
        cell_means=modes,
        radius=radius,
        cell_masses=cells,
        target_modes=target_modes,
        mode_weights=weights,
        bin_masses=bins,
        hist_half_width=ev.hist_half_width,
        hist_bin=ev.hist_bin,
        log_z=log_z,
        log_z_exact=True,
        sample=sample,
        log_density=log_density,
    )


def _sir_target(task: Task, description: str, log_density, beta: float, pool: int = 200_000, seed: int = 12345) -> Target:
    g = torch.Generator().manual_seed(seed)
    xs = task.data.sample(pool, g, dtype=torch.float64)
    lw = beta * task.log_reward_rows(xs)
    log_z = float(torch.logsumexp(lw, 0) - math.log(pool))
    probs = torch.softmax(lw, 0)

    def sample(count: int, gen: torch.Generator) -> torch.Tensor:
        return xs[torch.multinomial(probs, count, replacement=True, generator=gen)]

    ev = task.preset.evaluate
    mix = task.data if isinstance(task.data, GaussianMixture) else None
    return Target(
        description=description + f" (SIR from {pool:,} data points)",
        method="sir",
        cell_means=mix.means if mix is not None else None,
        radius=cell_radius(task) if mix is not None else None,
        hist_half_width=ev.hist_half_width,
        hist_bin=ev.hist_bin,
        log_z=log_z,
        log_z_exact=False,
        sample=sample,
        log_density=log_density,
    )


def accepted_rows(rows: torch.Tensor, log_w: torch.Tensor, seed: int = 12345) -> torch.Tensor:
    """Rejection sampling from the empirical distribution: keep row i with probability
    exp(log_w_i - max log_w). The kept rows are exact, distinct samples of the tilted empirical
    distribution (no row repeats, so the halves of a floor are disjoint)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.exp(log_w.double() - log_w.max())
    return rows[torch.rand(rows.shape[0], generator=g, dtype=torch.float64) < p]


def _rows_target(task: Task, description: str, beta: float | None) -> Target:
    if not isinstance(task.data, EmpiricalData):
        raise TypeError(f"reference rows need prior data from rows, not {type(task.data).__name__}")
    rows = task.data.rows.cpu()
    if beta is None:
        return Target(description=description, method="reference", reference=rows, reference_note=f"the {rows.shape[0]:,} data rows")
    kept = accepted_rows(rows, beta * task.log_reward_rows(rows))
    if kept.shape[0] < MIN_REFERENCE:
        return Target(
            description=description,
            method="reference",
            reference_note=f"only {kept.shape[0]} data rows accepted with probability r^beta / max r^beta: no reference",
        )
    return Target(
        description=description,
        method="reference",
        reference=kept,
        reference_note=f"{kept.shape[0]:,} of {rows.shape[0]:,} data rows, accepted with probability r^beta / max r^beta",
    )


def generic_prior_target(task: Task) -> Target:
    """The prior data distribution itself (what a prior checkpoint should sample), from what the
    task alone says; a benchmark suite may know more (`rtbcli.suites.prior_target`)."""
    description = "p_data (the prior data)"
    if isinstance(task.data, GaussianMixture):
        target = _exact_target(task, task.data, description, 0.0)
        assert target is not None  # the data's own components sit on its modes
        return target
    if isinstance(task.data, EmpiricalData):
        return _rows_target(task, description, None)
    return Target(
        description=description,
        method="exact",
        log_z=0.0,
        log_z_exact=True,
        sample=lambda n, g: task.data.sample(n, g, dtype=torch.float64),
        log_density=task.data.log_prob,
    )


def generic_tilted_target(task: Task, beta: float) -> Target:
    """p_data(x) r(x)^beta / Z: exact where known, else grid (2-D), SIR, or reference rows; from
    what the task alone says (a benchmark suite may know more: `rtbcli.suites.tilted_target`)."""
    description = f"p_data * r^beta (beta = {beta:g})"
    if not task.data_is_exact:
        return _rows_target(task, description, beta)

    def log_density(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return task.data_log_prob(x) + beta * task.log_reward_rows(x).to(x.device)

    if task.reward_mixture is not None and task.reward_type == "mixture_ratio" and abs(beta - 1.0) < 1e-12:
        t = _exact_target(task, task.reward_mixture, description, 0.0)
        if t is not None:
            return t
    if task.dim == 2:
        return _grid_target(task, description, log_density, beta)
    return _sir_target(task, description, log_density, beta)
