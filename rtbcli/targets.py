"""The target a sampler is compared with, described once per task (design.md §2, §5).

- A prior checkpoint's target is the prior data p_data (an exact mixture; log Z = 0).
- A finetuned checkpoint's target is p_data(x) r(x)^beta / Z, built from the *data*
  distribution, not the learned prior, so that a poor prior shows in the metrics.

How exactly it is known depends on the task:

- `exact`: the target is a Gaussian mixture whose components sit on the prior modes with the
  prior variance (the prior data; the reference task at beta = 1). Cell masses are
  p_k = w_k m with m = P(|N(0, var I)| <= radius), bin masses are products of Gaussian CDF
  differences, samples are exact.
- `grid` (2-D): the unnormalised density is integrated on a fine grid (spacing 0.02 by default)
  aligned with the histogram bins: log Z, every cell and bin mass, and samples (a grid cell by
  its mass, then uniform within it) are exact to the grid's resolution.
- `sir` (otherwise): samples by sampling-importance-resampling of p_data with weights r^beta;
  log Z is the importance estimate and the mode metrics are not available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .metrics import hist_edges, mixture_bin_masses
from .tasks import GaussianMixture, Task

GRID_SPACING = 0.02
MODE_THRESHOLD = 1e-3  # a cell is a target mode when its target mass is at least this


@dataclass
class Target:
    """What `evaluate` compares samples with."""

    description: str  # e.g. "p_data * r^beta (beta = 1)"
    method: str  # "exact", "grid" or "sir"
    cell_means: torch.Tensor  # (K, d): the prior data modes
    radius: float
    cell_masses: torch.Tensor | None  # (K + 1,): target mass of each mode cell, then "elsewhere"
    target_modes: torch.Tensor | None  # (K,) bool: modes with target mass (w_k > 0)
    mode_weights: torch.Tensor | None  # (K,): the target's weight on each mode (sums to ~1)
    bin_masses: torch.Tensor | None  # (nb*nb + 1,) for 2-D tasks
    hist_half_width: float
    hist_bin: float
    log_z: float | None  # log of the normaliser of p_data * r^beta (0 for the prior target)
    log_z_exact: bool
    sample: Callable[[int, torch.Generator], torch.Tensor]  # n target samples (float64, CPU)
    log_density: Callable[[torch.Tensor], torch.Tensor]  # unnormalised: log p_data + beta log r


def _shell_mass(dim: int, variance: float, radius: float) -> float:
    """P(|N(0, variance I_d)| <= radius), the regularised lower incomplete gamma P(d/2, r^2 / 2 var)."""
    a = torch.tensor(dim / 2.0, dtype=torch.float64)
    return float(torch.special.gammainc(a, torch.tensor(radius * radius / (2 * variance), dtype=torch.float64)))


def _on_modes(mix: GaussianMixture, modes: torch.Tensor, variance: float) -> torch.Tensor | None:
    """Index of the prior mode each component sits on, or None if some component does not."""
    if abs(mix.variance - variance) > 1e-12:
        return None
    d = torch.cdist(mix.means, modes)
    dmin, k = d.min(dim=1)
    return k if bool((dmin < 1e-9).all()) else None


def _exact_target(task: Task, mix: GaussianMixture, description: str, log_z: float) -> Target | None:
    modes = task.prior_data.means
    where = _on_modes(mix, modes, task.prior_data.variance)
    if where is None:
        return None
    ev = task.preset.evaluate
    w = torch.zeros(modes.shape[0], dtype=torch.float64).index_add_(0, where, mix.weights)
    m = _shell_mass(task.dim, mix.variance, ev.cell_radius)
    cells = torch.cat([w * m, torch.tensor([1.0 - m], dtype=torch.float64)])
    bins = mixture_bin_masses(mix.means, mix.weights, mix.std, hist_edges(ev.hist_half_width, ev.hist_bin)) if task.dim == 2 else None
    return Target(
        description=description, method="exact", cell_means=modes, radius=ev.cell_radius,
        cell_masses=cells, target_modes=w > 0, mode_weights=w, bin_masses=bins,
        hist_half_width=ev.hist_half_width, hist_bin=ev.hist_bin, log_z=log_z, log_z_exact=True,
        sample=lambda n, g: mix.sample(n, g, dtype=torch.float64),
        log_density=lambda x: mix.log_prob(x.double()) + log_z,
    )


def _grid_target(task: Task, description: str, log_density, beta: float, spacing: float = GRID_SPACING) -> Target:
    ev = task.preset.evaluate
    modes = task.prior_data.means
    # Box: the histogram range and 8 standard deviations beyond every mode, on a multiple of the
    # bin width so that grid cells tile the histogram bins exactly.
    reach = max(ev.hist_half_width, float(modes.abs().max()) + 8 * task.prior_data.std)
    half = math.ceil(reach / ev.hist_bin) * ev.hist_bin
    n = int(round(2 * half / spacing))
    centres = -half + spacing * (torch.arange(n, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(centres, centres, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    lu = task.grid_log_target(centres, beta)
    log_z = float(torch.logsumexp(lu, 0)) + 2 * math.log(spacing)
    mass = torch.exp(lu - torch.logsumexp(lu, 0))  # per grid cell, sums to 1

    from .metrics import bin_index, cell_index  # local: avoid a cycle at import time

    k = modes.shape[0]
    cells = torch.zeros(k + 1, dtype=torch.float64).index_add_(0, cell_index(pts, modes, ev.cell_radius), mass)
    nbins = int(round(2 * ev.hist_half_width / ev.hist_bin)) ** 2 + 1
    bins = torch.zeros(nbins, dtype=torch.float64).index_add_(0, bin_index(pts, ev.hist_half_width, ev.hist_bin), mass)
    m = _shell_mass(2, task.prior_data.variance, ev.cell_radius)
    w = cells[:k] / m
    cdf = torch.cumsum(mass, 0)

    def sample(count: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(count, generator=g, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u * cdf[-1]).clamp_max(pts.shape[0] - 1)
        jitter = (torch.rand(count, 2, generator=g, dtype=torch.float64) - 0.5) * spacing
        return pts[idx] + jitter

    return Target(
        description=description, method="grid", cell_means=modes, radius=ev.cell_radius,
        cell_masses=cells, target_modes=cells[:k] >= MODE_THRESHOLD, mode_weights=w / w.sum(), bin_masses=bins,
        hist_half_width=ev.hist_half_width, hist_bin=ev.hist_bin, log_z=log_z, log_z_exact=True,
        sample=sample, log_density=log_density,
    )


def _sir_target(task: Task, description: str, log_density, beta: float, pool: int = 200_000, seed: int = 12345) -> Target:
    g = torch.Generator().manual_seed(seed)
    xs = task.prior_data.sample(pool, g, dtype=torch.float64)
    lw = beta * task.log_reward(xs)
    log_z = float(torch.logsumexp(lw, 0) - math.log(pool))
    probs = torch.softmax(lw, 0)

    def sample(count: int, gen: torch.Generator) -> torch.Tensor:
        return xs[torch.multinomial(probs, count, replacement=True, generator=gen)]

    ev = task.preset.evaluate
    return Target(
        description=description + f" (SIR from {pool:,} data points)", method="sir", cell_means=task.prior_data.means,
        radius=ev.cell_radius, cell_masses=None, target_modes=None, mode_weights=None, bin_masses=None,
        hist_half_width=ev.hist_half_width, hist_bin=ev.hist_bin, log_z=log_z, log_z_exact=False,
        sample=sample, log_density=log_density,
    )


def prior_target(task: Task) -> Target:
    """The prior data distribution itself (what a prior checkpoint should sample)."""
    t = _exact_target(task, task.prior_data, "p_data (the prior data)", 0.0)
    if t is not None:
        return t
    return _grid_target(task, "p_data (the prior data)", task.data_log_prob, 0.0)  # unreachable for mixtures; kept for safety


def tilted_target(task: Task, beta: float) -> Target:
    """p_data(x) r(x)^beta / Z: exact where it is a mixture on the prior modes, else grid (2-D) or SIR."""
    description = f"p_data * r^beta (beta = {beta:g})"

    def log_density(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return task.data_log_prob(x) + beta * task.log_reward(x)

    if task.reward_type == "mixture_ratio" and abs(beta - 1.0) < 1e-12:
        t = _exact_target(task, task.reward_mixture, description, 0.0)
        if t is not None:
            return t
    if task.dim == 2:
        return _grid_target(task, description, log_density, beta)
    return _sir_target(task, description, log_density, beta)
