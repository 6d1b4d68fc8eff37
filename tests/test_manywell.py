"""ManyWell-32: exact quantities checked against an independent Simpson rule and exact samples."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.datasets.manywell import (
    DIM,
    LEFT_MASS,
    PAIRS,
    ManyWell,
    left_mass1,
    left_well_fractions,
    log_z1,
    tilt_log_reward,
    tilted_target,
    well_mass_errors,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def simpson(tilt: float, a: float, b: float, h: float = 2e-4) -> float:
    """Composite Simpson rule for integral_a^b exp(-x^4 + 6 x^2 + 0.5 x - tilt x) dx."""
    n = round((b - a) / h)
    assert n % 2 == 0
    x = torch.linspace(a, b, n + 1, dtype=torch.float64)
    f = torch.exp(-x.pow(4) + 6 * x.pow(2) + (0.5 - tilt) * x)
    w = torch.ones(n + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float((w * f).sum()) * (b - a) / n / 3


def simpson_log_z1(tilt: float) -> float:
    return math.log(simpson(tilt, -8.0, 8.0))


def simpson_cdf(tilt: float, t: float) -> float:
    """P(x1 < t) under the tilted 1-D density, by Simpson on [-8, t] and [-8, 8]."""
    return simpson(tilt, -8.0, t, h=1e-3) / simpson(tilt, -8.0, 8.0, h=1e-3)


def unnormalised(x: torch.Tensor, tilts: list[float]) -> torch.Tensor:
    """sum_j -x1^4 + 6 x1^2 + 0.5 x1 - t_j x1 - 0.5 x2^2, written out pair by pair."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for j, t in enumerate(tilts):
        a, b = x[:, 2 * j].double(), x[:, 2 * j + 1].double()
        total += -(a**4) + 6 * a**2 + 0.5 * a - t * a - 0.5 * b**2
    return total


# --- 1-D quadrature -----------------------------------------------------------------------


@pytest.mark.parametrize("tilt", [0.0, 0.5, 1.0, -0.75, 2.5])
def test_log_z1_matches_simpson(tilt):
    assert abs(log_z1(tilt) - simpson_log_z1(tilt)) < 1e-6


@pytest.mark.parametrize("tilt", [0.0, 0.5, 1.0, -0.75, 2.5])
def test_left_mass1_matches_simpson(tilt):
    expected = simpson(tilt, -8.0, 0.0) / simpson(tilt, -8.0, 8.0)
    assert abs(left_mass1(tilt) - expected) < 1e-6


def test_published_constants():
    assert abs(LEFT_MASS - 0.1557) < 1e-4
    assert abs(left_mass1(1.0) - 0.8443) < 1e-4
    # ManyWell-32's published log Z is 164.6957 (16 pairs, x2 included).
    assert abs(ManyWell().log_z_unnormalised() - 164.6957) < 1e-4
    assert (PAIRS, DIM) == (16, 32)


def test_tilt_one_mirrors_the_pair():
    # 0.5 x - x = -0.5 x: the tilted density is the untilted one reflected about 0.
    assert abs(left_mass1(1.0) - (1.0 - LEFT_MASS)) < 1e-12
    assert abs(log_z1(1.0) - log_z1(0.0)) < 1e-12


def test_bad_tilt_is_refused():
    with pytest.raises(ValueError, match="edge of the grid"):
        log_z1(5000.0)
    with pytest.raises(ValueError, match="finite"):
        left_mass1(float("nan"))


# --- ManyWell ----------------------------------------------------------------------------


@pytest.mark.parametrize("tilt", [0.0, 1.0, -2.0])
def test_log_prob_is_normalised_on_a_2d_grid(tilt):
    h1, h2 = 0.005, 0.01
    a = torch.arange(-800, 801, dtype=torch.float64) * h1  # x1 in [-4, 4]
    b = torch.arange(-800, 801, dtype=torch.float64) * h2  # x2 in [-8, 8]
    x = torch.stack(torch.meshgrid(a, b, indexing="ij"), dim=-1)  # (na, nb, 2)
    mass = float(ManyWell(1, [tilt]).log_prob(x).exp().sum()) * h1 * h2
    assert abs(mass - 1.0) < 1e-4


def test_log_prob_is_the_sum_over_pairs_and_float64():
    g = torch.Generator().manual_seed(3)
    tilts = (torch.rand(PAIRS, generator=g, dtype=torch.float64) * 3 - 1).tolist()
    x = torch.randn(50, DIM, generator=g) * 2
    full = ManyWell(PAIRS, torch.tensor(tilts, dtype=torch.float64)).log_prob(x)
    per_pair = sum(ManyWell(1, [t]).log_prob(x[:, 2 * j : 2 * j + 2]) for j, t in enumerate(tilts))
    assert full.dtype == torch.float64 and full.shape == (50,)
    assert torch.allclose(full, per_pair, rtol=0, atol=1e-9)
    assert ManyWell().log_prob(x.reshape(5, 10, DIM)).shape == (5, 10)


def test_log_prob_plus_log_z_is_the_unnormalised_density():
    g = torch.Generator().manual_seed(4)
    tilts = [0.0] * 8 + [1.0, -0.5, 2.0, 0.25, 0.0, 1.0, 3.0, -1.0]
    mw = ManyWell(PAIRS, tilts)
    x = torch.randn(100, DIM, generator=g, dtype=torch.float64) * 1.5
    assert torch.allclose(mw.log_prob(x) + mw.log_z_unnormalised(), unnormalised(x, tilts), rtol=0, atol=1e-9)
    expected = sum(simpson_log_z1(t) + HALF_LOG_2PI for t in tilts)
    assert abs(mw.log_z_unnormalised() - expected) < 1e-5


def test_left_well_masses_match_simpson():
    tilts = [0.0, 1.0, -0.5, 2.0]
    masses = ManyWell(4, tilts).left_well_masses()
    assert masses.dtype == torch.float64 and masses.shape == (4,)
    for m, t in zip(masses.tolist(), tilts):
        assert abs(m - simpson_cdf(t, 0.0)) < 1e-6


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="3 tilts for 2 pairs"):
        ManyWell(2, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="last dimension 32"):
        ManyWell().log_prob(torch.zeros(4, 30))
    with pytest.raises(ValueError):
        ManyWell(0)


# --- exact samples -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tilted_samples():
    target, _ = tilted_target(1.0)
    x = target.sample(200_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    return target, x


def test_sample_left_fractions_within_four_standard_errors(tilted_samples):
    target, x = tilted_samples
    n = x.shape[0]
    frac = left_well_fractions(x)
    for p_hat, t in zip(frac.tolist(), target.tilts):
        p = simpson_cdf(t, 0.0)
        assert abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert frac[:8].min() > 0.83 and frac[8:].max() < 0.17  # 8 tilted pairs, then 8 untilted


@pytest.mark.parametrize("t", [-2.0, -1.5, -1.0, 0.5, 1.0, 1.7, 2.5])
def test_sample_x1_cdf_matches_quadrature(tilted_samples, t):
    _, x = tilted_samples
    for cols, tilt in ((slice(0, 16, 2), 1.0), (slice(16, 32, 2), 0.0)):
        x1 = x[:, cols].reshape(-1)
        p = simpson_cdf(tilt, t)
        p_hat = float((x1 < t).double().mean())
        assert abs(p_hat - p) < 5 * math.sqrt(p * (1 - p) / x1.numel())


def test_sample_x2_is_standard_normal(tilted_samples):
    _, x = tilted_samples
    x2 = x[:, 1::2].reshape(-1)
    n = x2.numel()
    assert abs(float(x2.mean())) < 4 / math.sqrt(n)
    assert abs(float(x2.var()) - 1.0) < 4 * math.sqrt(2 / n)


def test_samples_are_continuous(tilted_samples):
    _, x = tilted_samples
    # Grid-snapped samples would take at most 120,001 distinct values.
    assert torch.unique(x[:, 0]).numel() > 0.99 * x.shape[0]


def test_sampling_is_reproducible_and_casts():
    mw = ManyWell(PAIRS, [0.5] * 4 + [0.0] * 12)
    a = mw.sample(1000, torch.Generator().manual_seed(7))
    b = mw.sample(1000, torch.Generator().manual_seed(7))
    c = mw.sample(1000, torch.Generator().manual_seed(8))
    d = mw.sample(1000, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert a.shape == (1000, DIM) and a.dtype == torch.float32 and d.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a, d.float())


# --- reward and tilted target ------------------------------------------------------------


def test_tilt_log_reward_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-1.0, 0.0, 0.5, 9.0, -2.0, 9.0]])
    assert torch.equal(tilt_log_reward(x, pairs=2, c=0.5), torch.tensor([-2.0, 0.25]))
    assert torch.equal(tilt_log_reward(x, pairs=3), torch.tensor([-9.0, 2.5]))
    assert tilt_log_reward(x.double(), pairs=1).dtype == torch.float64
    with pytest.raises(ValueError):
        tilt_log_reward(x, pairs=4)


@pytest.mark.parametrize("beta,pairs,c", [(0.5, 8, 1.0), (1.0, 8, 1.0), (2.0, 3, 0.7), (1.0, 16, -1.0)])
def test_tilted_target_log_z_matches_simpson(beta, pairs, c):
    target, log_z = tilted_target(beta, pairs=pairs, c=c)
    expected = pairs * (simpson_log_z1(beta * c) - simpson_log_z1(0.0))
    assert abs(log_z - expected) < 1e-5
    assert target.tilts == (beta * c,) * pairs + (0.0,) * (PAIRS - pairs)


def test_tilted_target_is_data_times_reward_over_z():
    beta, pairs, c = 0.7, 5, 1.3
    target, log_z = tilted_target(beta, pairs=pairs, c=c)
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = ManyWell().log_prob(x) + beta * tilt_log_reward(x, pairs=pairs, c=c) - log_z
    assert torch.allclose(target.log_prob(x), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("beta,pairs,tol", [(0.25, 8, 0.02), (1.0, 2, 0.06)])
def test_tilted_target_log_z_matches_monte_carlo(beta, pairs, tol):
    # tol is about 6 standard errors of log mean r^beta at n = 200,000.
    x = ManyWell().sample(200_000, torch.Generator().manual_seed(1), dtype=torch.float64)
    log_r = beta * tilt_log_reward(x, pairs=pairs)
    mc = float(torch.logsumexp(log_r, 0)) - math.log(x.shape[0])
    _, log_z = tilted_target(beta, pairs=pairs)
    assert abs(mc - log_z) < tol


def test_tilted_target_at_beta_zero_is_the_data():
    target, log_z = tilted_target(0.0)
    assert log_z == 0.0
    assert torch.equal(target.left_well_masses(), torch.full((PAIRS,), LEFT_MASS, dtype=torch.float64))
    x = torch.randn(10, DIM, generator=torch.Generator().manual_seed(6))
    assert torch.equal(target.log_prob(x), ManyWell().log_prob(x))


# --- well-mass metrics -------------------------------------------------------------------


def test_left_well_fractions_and_errors_hand_example():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor(
        [
            [-1.0, 5.0, 2.0, 0.0],  # pair 0 left
            [0.5, -3.0, -0.1, 1.0],  # pair 1 left (a negative x2 does not count)
            [-2.0, nan, -3.0, 0.0],  # non-finite: not left anywhere
            [-4.0, 0.0, -1.0, inf],  # non-finite: not left anywhere
            [-0.5, 0.0, 0.0, 0.0],  # pair 0 left; x1 = 0 is not left
        ]
    )
    frac = left_well_fractions(x)
    assert frac.dtype == torch.float64
    assert torch.allclose(frac, torch.tensor([0.4, 0.2], dtype=torch.float64))
    err = well_mass_errors(x, torch.tensor([0.45, 0.5]))
    assert err["well_mass_max_abs_err"] == pytest.approx(0.3)
    assert err["well_mass_mean_abs_err"] == pytest.approx(0.175)
    assert err["well_masses"] == pytest.approx([0.4, 0.2])
    with pytest.raises(ValueError):
        well_mass_errors(x, torch.tensor([0.1, 0.2, 0.3]))
