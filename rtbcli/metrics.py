"""Sample-quality and log-Z metrics, exactly as design.md §5 defines them.

All functions take plain tensors, so they can be called on any samples:

>>> from rtbcli.metrics import cell_index, mode_weight_kl
>>> idx = cell_index(samples, means, radius=1.5)          # which cell each sample is in
>>> counts = torch.bincount(idx, minlength=len(means) + 1)
>>> mode_weight_kl(counts, target_cell_masses)

Cells: a sample belongs to mode k if mu_k is its nearest mode mean and it lies within `radius`
of it; otherwise (and if it is not finite) to the last cell, "elsewhere".
"""

from __future__ import annotations

import math

import torch


def cell_index(x: torch.Tensor, means: torch.Tensor, radius: float) -> torch.Tensor:
    """Cell of each sample: k in [0, K) for mode k, K for "elsewhere" (also non-finite samples)."""
    x = x.to(torch.float64)
    means = means.to(x)
    d2 = torch.cdist(x.nan_to_num(nan=1e30, posinf=1e30, neginf=-1e30), means).pow(2)
    dmin, k = d2.min(dim=1)
    finite = torch.isfinite(x).all(dim=1)
    inside = finite & (dmin <= radius * radius)
    return torch.where(inside, k, torch.full_like(k, means.shape[0]))


def smoothed_kl(p: torch.Tensor, counts: torch.Tensor, pseudo: float) -> float:
    """sum_{c: p_c > 0} p_c log(p_c / q_c) with q_c = (count_c + pseudo) / (N + pseudo * C).

    Never negative: p and q are both probability vectors over the same C cells.
    """
    p = p.to(torch.float64)
    counts = counts.to(torch.float64)
    q = (counts + pseudo) / (counts.sum() + pseudo * counts.numel())
    pos = p > 0
    return float((p[pos] * (p[pos].log() - q[pos].log())).sum().clamp_min(0.0))


def mode_weight_kl(counts: torch.Tensor, cell_masses: torch.Tensor) -> float:
    """Mode-weight KL: cells smoothed by +0.5 (design.md §5)."""
    return smoothed_kl(cell_masses, counts, 0.5)


def histogram_kl(counts: torch.Tensor, bin_masses: torch.Tensor) -> float:
    """Histogram KL: bins smoothed by +0.01 (design.md §5)."""
    return smoothed_kl(bin_masses, counts, 0.01)


def mode_coverage(counts: torch.Tensor, cell_masses: torch.Tensor, target_modes: torch.Tensor) -> int:
    """Number of target modes with at least one sample and frequency q_k >= p_k / 4."""
    n = counts.sum()
    k = target_modes.numel()
    q = counts[:k].to(torch.float64) / n
    ok = target_modes & (counts[:k] > 0) & (q >= cell_masses[:k].to(torch.float64) / 4)
    return int(ok.sum())


def off_target_mass(counts: torch.Tensor, target_modes: torch.Tensor) -> float:
    """1 - sum of the sample frequencies of the target modes."""
    k = target_modes.numel()
    return float(1.0 - counts[:k][target_modes].sum().double() / counts.sum())


def hist_edges(half_width: float, bin_width: float) -> torch.Tensor:
    """Bin edges over [-w, w] (float64)."""
    nb = int(round(2 * half_width / bin_width))
    if abs(nb * bin_width - 2 * half_width) > 1e-9:
        raise ValueError("hist_bin must divide 2 * hist_half_width")
    return torch.linspace(-half_width, half_width, nb + 1, dtype=torch.float64)


def bin_index(x: torch.Tensor, half_width: float, bin_width: float) -> torch.Tensor:
    """Bin of each 2-D sample: row-major index over the nb x nb grid, nb*nb for "outside"."""
    nb = int(round(2 * half_width / bin_width))
    x = x.to(torch.float64)
    finite = torch.isfinite(x).all(dim=1)
    inside = finite & ((x >= -half_width) & (x < half_width)).all(dim=1)
    ij = ((x.nan_to_num(0.0) + half_width) / bin_width).floor().long().clamp(0, nb - 1)
    idx = ij[:, 0] * nb + ij[:, 1]
    return torch.where(inside, idx, torch.full_like(idx, nb * nb))


def mixture_bin_masses(means: torch.Tensor, weights: torch.Tensor, std: float, edges: torch.Tensor) -> torch.Tensor:
    """Exact bin masses of an isotropic 2-D Gaussian mixture: products of CDF differences.

    Returns nb*nb + 1 masses (row-major bins, then "outside"), summing to 1.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    z = (edges[None, :, None] - means.to(torch.float64).T[:, None, :]) / std  # (2, nb+1, K)
    cdf = normal.cdf(z)
    px, py = cdf[0, 1:] - cdf[0, :-1], cdf[1, 1:] - cdf[1, :-1]  # (nb, K)
    bins = torch.einsum("ik,jk,k->ij", px, py, weights.to(torch.float64)).reshape(-1)
    return torch.cat([bins, (1.0 - bins.sum()).clamp_min(0.0).reshape(1)])


def sample_metrics(x: torch.Tensor, target) -> dict:
    """mode_coverage, n_target_modes, kl_mode, off_target, kl_hist of samples x against a Target.

    Values a target cannot support (no exact cells, or not 2-D for the histogram) are None.
    """
    out = {"mode_coverage": None, "n_target_modes": None, "kl_mode": None, "off_target": None, "kl_hist": None}
    if target.cell_masses is not None:
        k = target.cell_means.shape[0]
        counts = torch.bincount(cell_index(x, target.cell_means, target.radius), minlength=k + 1)
        out.update(
            mode_coverage=mode_coverage(counts, target.cell_masses, target.target_modes),
            n_target_modes=int(target.target_modes.sum()),
            kl_mode=mode_weight_kl(counts, target.cell_masses),
            off_target=off_target_mass(counts, target.target_modes),
        )
    if target.bin_masses is not None:
        counts = torch.bincount(bin_index(x, target.hist_half_width, target.hist_bin), minlength=target.bin_masses.numel())
        out["kl_hist"] = histogram_kl(counts, target.bin_masses)
    return out


def per_mode_frequencies(x: torch.Tensor, target) -> torch.Tensor | None:
    """Sample frequency of each cell (K modes, then "elsewhere")."""
    if target.cell_means is None:
        return None
    k = target.cell_means.shape[0]
    counts = torch.bincount(cell_index(x, target.cell_means, target.radius), minlength=k + 1)
    return counts.double() / counts.sum()


# ---------------------------------------------------------------------------- log Z
def log_mean_exp(lw: torch.Tensor) -> float:
    """log mean exp(lw), stable."""
    lw = lw.to(torch.float64)
    return float(torch.logsumexp(lw, 0) - math.log(lw.numel()))


def effective_sample_size(lw: torch.Tensor) -> float:
    """(sum e^lw)^2 / (N sum e^{2 lw}), in (0, 1]."""
    lw = lw.to(torch.float64)
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.numel())
