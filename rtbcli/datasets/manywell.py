"""ManyWell-32 and its reward-tilted targets, with exact log Z, well masses and samples.

ManyWell-32 is a product of 16 independent pairs (x1_j, x2_j) = (x[:, 2j], x[:, 2j+1]) with

    p_pair(x1, x2) = exp(-x1^4 + 6 x1^2 + 0.5 x1 - 0.5 x2^2) / (Z1(0) sqrt(2 pi)),
    Z1(t) = integral exp(-x^4 + 6 x^2 + 0.5 x - t x) dx.

Each x1 has two wells; the left one (x1 < 0) holds mass 0.1557. The reward
log r(x) = -c sum_{j in S} x1_j keeps p_data(x) r(x)^beta a product of 1-D problems: pair j in S
gets the tilt t = beta c, every other pair t = 0, and x2 stays N(0, 1). Hence

    log Z_data(beta) = log E_data[r^beta] = sum_{j in S} [log Z1(beta c) - log Z1(0)].

Z1(t), the well masses and the inverse CDF of x1 come from a trapezoid rule in float64 on
[-6, 6] with spacing 1e-4 (the integrand is below exp(-1000) at the ends, so the rule is exact
to rounding for moderate tilts). Samples draw x1 by inverse CDF, interpolating the CDF linearly
within a grid cell (so they are continuous), and x2 from N(0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from ..gaussian import LOG_2PI

PAIRS = 16
DIM = 2 * PAIRS
GRID_HALF_WIDTH = 6.0
GRID_SPACING = 1e-4


def _log_f1(x: torch.Tensor, tilt: float) -> torch.Tensor:
    """Unnormalised 1-D log density of x1: -x^4 + 6 x^2 + (0.5 - tilt) x."""
    return -(x**4) + 6 * x**2 + (0.5 - tilt) * x


def log_density(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised ManyWell log-density, the one definition in rtbcli (the data of the
    `manywell32` preset and the `manywell` energy target of `rtbcli.energy` both call it):

        log pi(x) = sum_j [-x1_j^4 + 6 x1_j^2 + 0.5 x1_j - 0.5 x2_j^2],   x1_j = x[..., 2j], x2_j = x[..., 2j+1]

    x (..., 2 * pairs) -> (...), in x's dtype and on x's device, differentiable. Its normaliser
    is `ManyWell(pairs).log_z_unnormalised()` (164.6957 for 16 pairs).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"ManyWell needs an even number of coordinates, got shape {tuple(x.shape)}")
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return (_log_f1(x1, 0.0) - 0.5 * x2 * x2).sum(-1)


@lru_cache(maxsize=64)
def _table(tilt: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(grid, normalised CDF on the grid, log Z1(tilt)) for one tilt, float64 on the CPU.

    With w_i = exp(log f1(x_i) - m), m = max log f1, the trapezoid rule gives
    CDF(x_k) = sum_{i<k} h (w_i + w_{i+1}) / 2 / total and log Z1 = m + log total.
    """
    if not math.isfinite(tilt):
        raise ValueError(f"tilt must be finite, got {tilt}")
    k = round(GRID_HALF_WIDTH / GRID_SPACING)
    grid = torch.arange(-k, k + 1, dtype=torch.float64) * GRID_SPACING  # contains 0 exactly
    log_f = _log_f1(grid, tilt)
    m = float(log_f.max())
    w = torch.exp(log_f - m)
    if max(float(w[0]), float(w[-1])) > 1e-30:
        raise ValueError(f"tilt {tilt} moves the density to the edge of the grid [-6, 6]")
    cdf = torch.cat([w.new_zeros(1), torch.cumsum(0.5 * GRID_SPACING * (w[1:] + w[:-1]), 0)])
    total = float(cdf[-1])
    return grid, cdf / total, m + math.log(total)


def log_z1(tilt: float = 0.0) -> float:
    """log Z1(tilt) = log integral exp(-x^4 + 6 x^2 + 0.5 x - tilt x) dx (the x1 factor only)."""
    return _table(float(tilt))[2]


def left_mass1(tilt: float = 0.0) -> float:
    """P(x1 < 0) = integral_{x<0} exp(-x^4 + 6 x^2 + 0.5 x - tilt x) dx / Z1(tilt)."""
    grid, cdf, _ = _table(float(tilt))
    return float(cdf[round(GRID_HALF_WIDTH / GRID_SPACING)])  # the grid point x = 0


def mass_below1(cut: float, tilt: float = 0.0) -> float:
    """P(x1 < cut) under exp(-x^4 + 6 x^2 + 0.5 x - tilt x) / Z1(tilt): the CDF table, linear between grid points."""
    grid, cdf, _ = _table(float(tilt))
    i = int(torch.searchsorted(grid, torch.tensor(float(cut), dtype=grid.dtype)).clamp(1, len(grid) - 1))
    w = min(max((cut - float(grid[i - 1])) / GRID_SPACING, 0.0), 1.0)
    return float(cdf[i - 1] + w * (cdf[i] - cdf[i - 1]))


LEFT_MASS = left_mass1(0.0)  # 0.1557...: left-well mass of an untilted pair


def _sample_x1(u: torch.Tensor, tilt: float) -> torch.Tensor:
    """Inverse CDF of x1 at uniforms u in [0, 1): find the cell with CDF(x_{i-1}) <= u < CDF(x_i),
    then x = x_{i-1} + h (u - CDF(x_{i-1})) / (CDF(x_i) - CDF(x_{i-1}))."""
    grid, cdf, _ = _table(tilt)
    grid, cdf = grid.to(u.device), cdf.to(u.device)
    i = torch.searchsorted(cdf, u, right=True).clamp(1, len(cdf) - 1)
    lo, hi = cdf[i - 1], cdf[i]
    return grid[i - 1] + GRID_SPACING * ((u - lo) / (hi - lo)).clamp(0.0, 1.0)


class ManyWell:
    """Product of `pairs` ManyWell pairs; pair j's x1 density tilted by tilts[j] (0 = untilted).

    p(x) = prod_j exp(-x1_j^4 + 6 x1_j^2 + 0.5 x1_j - t_j x1_j) / Z1(t_j) * N(x2_j; 0, 1),
    with x1_j = x[..., 2j] and x2_j = x[..., 2j+1].
    """

    def __init__(self, pairs: int = PAIRS, tilts: Sequence[float] | torch.Tensor | None = None):
        if pairs < 1:
            raise ValueError(f"pairs must be at least 1, got {pairs}")
        if tilts is None:
            tilts = [0.0] * pairs
        elif isinstance(tilts, torch.Tensor):
            tilts = tilts.detach().cpu().reshape(-1).tolist()
        tilts = tuple(float(t) for t in tilts)
        if len(tilts) != pairs:
            raise ValueError(f"got {len(tilts)} tilts for {pairs} pairs")
        for t in tilts:
            _table(t)  # validates the tilt and fills the cache
        self.pairs = pairs
        self.dim = 2 * pairs
        self.tilts = tilts

    def to(self, device) -> ManyWell:
        """Nothing to move: the quadrature tables go to the samples' device when used."""
        return self

    def __repr__(self) -> str:
        return f"ManyWell(pairs={self.pairs}, tilts={list(self.tilts)})"

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected x with last dimension {self.dim}, got shape {tuple(x.shape)}")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised log p(x), x (..., dim) -> (...), in float64:
        log_density(x) - sum_j t_j x1_j - sum_j [log Z1(t_j) + 0.5 log 2 pi]."""
        self._check(x)
        x = x.to(torch.float64)
        t = torch.tensor(self.tilts, dtype=torch.float64, device=x.device)
        return log_density(x) - (t * x[..., 0::2]).sum(-1) - self.log_z_unnormalised()

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """n exact samples (n, dim): x1_j by inverse CDF, x2_j ~ N(0, 1).

        Drawn in float64 on the generator's device (uniforms for every x1, then normals for every
        x2) from `generator`, then cast, so the same seed gives the same values at any dtype.
        """
        g_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(n, self.pairs, generator=generator, dtype=torch.float64, device=g_device)
        x2 = torch.randn(n, self.pairs, generator=generator, dtype=torch.float64, device=g_device)
        x1 = torch.empty_like(u)
        for tilt in set(self.tilts):
            cols = [j for j, t in enumerate(self.tilts) if t == tilt]
            x1[:, cols] = _sample_x1(u[:, cols].contiguous(), tilt)
        x = torch.stack([x1, x2], dim=-1).reshape(n, self.dim)
        return x.to(device=device, dtype=dtype)

    def left_well_masses(self) -> torch.Tensor:
        """(pairs,) float64: P(x1_j < 0) for each pair."""
        return torch.tensor([left_mass1(t) for t in self.tilts], dtype=torch.float64)

    def log_z_unnormalised(self) -> float:
        """log of the normaliser of prod_j exp(-x1^4 + 6 x1^2 + 0.5 x1 - t_j x1 - 0.5 x2^2):
        sum_j [log Z1(t_j) + 0.5 log 2 pi] (0.5 log 2 pi: the normaliser of N(x2_j; 0, 1))."""
        return sum(log_z1(t) + 0.5 * LOG_2PI for t in self.tilts)


def tilt_log_reward(x: torch.Tensor, pairs: int = 8, c: float = 1.0) -> torch.Tensor:
    """log r(x) = -c * sum_{j < pairs} x1_j ; x (B, d) -> (B,). Works in x's dtype/device."""
    if x.shape[-1] < 2 * pairs:
        raise ValueError(f"x has {x.shape[-1]} coordinates, fewer than 2 * pairs = {2 * pairs}")
    return -c * x[..., 0 : 2 * pairs : 2].sum(-1)


def tilted_target(beta: float, pairs: int = 8, c: float = 1.0, total_pairs: int = PAIRS) -> tuple[ManyWell, float]:
    """The exact target p_data * r^beta / Z as a ManyWell with tilts beta*c on the first `pairs`
    pairs, and log Z_data(beta) = log E_data[r^beta] = pairs * [log Z1(beta c) - log Z1(0)].
    """
    if not 0 <= pairs <= total_pairs:
        raise ValueError(f"pairs must be in [0, {total_pairs}], got {pairs}")
    tilt = float(beta) * float(c)
    target = ManyWell(total_pairs, [tilt] * pairs + [0.0] * (total_pairs - pairs))
    return target, pairs * (log_z1(tilt) - log_z1(0.0))


def left_well_fractions(x: torch.Tensor) -> torch.Tensor:
    """(pairs,) float64: the fraction of the rows of x (n, 2 pairs) with x1_j = x[:, 2j] < 0.

    A row with any non-finite coordinate counts as not-left for every pair (it stays in n).
    """
    if x.dim() != 2 or x.shape[-1] % 2:
        raise ValueError(f"expected x of shape (n, 2 * pairs), got {tuple(x.shape)}")
    finite = torch.isfinite(x).all(-1, keepdim=True)
    left = (x[:, 0::2] < 0) & finite
    return left.to(torch.float64).mean(0).cpu()


def well_mass_errors(x: torch.Tensor, exact: torch.Tensor) -> dict:
    """Left-well fractions of samples x against the exact masses:
    max_j |frac_j - exact_j|, mean_j |frac_j - exact_j| and the fractions themselves."""
    frac = left_well_fractions(x)
    exact = torch.as_tensor(exact, dtype=torch.float64).cpu()
    if exact.shape != frac.shape:
        raise ValueError(f"exact masses have shape {tuple(exact.shape)}, samples give {tuple(frac.shape)}")
    err = (frac - exact).abs()
    return {
        "well_mass_max_abs_err": float(err.max()),
        "well_mass_mean_abs_err": float(err.mean()),
        "well_masses": frac.tolist(),
    }
