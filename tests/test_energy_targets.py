"""Energy targets: densities against hand formulas and independent code, log Z by quadrature,
exact samplers against their laws."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.datasets import manywell as mw
from rtbcli.energy import ENERGY_TARGETS, GMM25, Funnel, ManyWellEnergy, get_target
from rtbcli.errors import InputError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the registry and the interface --------------------------------------------------------
def test_registry_dims_sigma2_and_log_z():
    expected = {"gmm25": (2, 5.0, 0.0), "funnel": (10, 1.0, 0.0), "manywell": (32, 1.0, None)}
    assert set(ENERGY_TARGETS) == set(expected)
    for name, (dim, sigma2, log_z) in expected.items():
        t = get_target(name)
        assert (t.name, t.dim, t.sigma2) == (name, dim, sigma2)
        if log_z is not None:
            assert t.log_z == log_z
    # ManyWell-32's published log Z (Sendera et al. 2024), here from quadrature, not typed in the code
    assert abs(get_target("manywell").log_z - 164.6957) < 1e-4
    with pytest.raises(InputError, match="unknown energy target"):
        get_target("nope")


@pytest.mark.parametrize("name", list(ENERGY_TARGETS))
def test_shapes_dtypes_gradients_and_bad_dimension(name):
    t = get_target(name)
    x = t.sample(7, gen(0), dtype=torch.float32)
    assert x.shape == (7, t.dim) and x.dtype == torch.float32
    lp = t.log_density(x)
    assert lp.shape == (7,) and lp.dtype == torch.float32
    assert t.log_density(x.double().reshape(7, 1, t.dim)).shape == (7, 1)
    # autograd gradient against central finite differences, in float64
    xd = t.sample(3, gen(1), dtype=torch.float64).requires_grad_(True)
    (g,) = torch.autograd.grad(t.log_density(xd).sum(), xd)
    h = 1e-6
    for j in range(t.dim):
        e = torch.zeros_like(xd)
        e[:, j] = h
        fd = (t.log_density(xd.detach() + e) - t.log_density(xd.detach() - e)) / (2 * h)
        assert torch.allclose(g[:, j], fd, rtol=1e-6, atol=1e-5)
    with pytest.raises(InputError, match="dimension"):
        t.log_density(torch.zeros(2, t.dim + 1))


@pytest.mark.parametrize("name", list(ENERGY_TARGETS))
def test_samples_are_reproducible_and_cast(name):
    t = get_target(name)
    a = t.sample(5, gen(3), dtype=torch.float64)
    b = t.sample(5, gen(3), dtype=torch.float32)
    assert torch.equal(a.float(), b)


# --- 25GMM ---------------------------------------------------------------------------------
def test_gmm25_density_by_hand():
    x = [(0.0, 0.0), (4.7, -5.2), (10.3, 9.1), (2.5, 2.5)]
    got = GMM25().log_density(torch.tensor(x, dtype=torch.float64))
    for (a, b), v in zip(x, got.tolist()):
        dens = (
            sum(
                math.exp(-((a - m1) ** 2 + (b - m2) ** 2) / 0.6) / (2 * math.pi * 0.3)
                for m1 in (-10, -5, 0, 5, 10)
                for m2 in (-10, -5, 0, 5, 10)
            )
            / 25
        )
        assert abs(v - math.log(dens)) < 1e-12


def test_gmm25_integrates_to_one():
    h = 0.02
    c = torch.arange(-14.0, 14.0 + h / 2, h, dtype=torch.float64)
    total = 0.0
    for row in c.split(200):  # the grid in blocks of rows
        g = torch.cartesian_prod(row, c)
        total += float(GMM25().log_density(g).exp().sum()) * h * h
    assert abs(math.log(total) - GMM25().log_z) < 1e-8


def _nearest_mode(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), GMM25().means).argmin(1)


def test_gmm25_exact_sampler_mode_weights_and_spread():
    n = 50_000
    x = GMM25().sample(n, gen(11), dtype=torch.float64)
    k = _nearest_mode(x)
    freq = torch.bincount(k, minlength=25).double() / n
    se = math.sqrt(0.04 * 0.96 / n)
    assert float((freq - 0.04).abs().max()) < 5 * se
    resid = x - GMM25().means[k]
    assert float(resid.mean(0).abs().max()) < 5 * math.sqrt(0.3 / n)
    assert float((resid.var(0) - 0.3).abs().max()) < 5 * 0.3 * math.sqrt(2 / n)
    # not stratified: the counts vary like a multinomial's (a stratified draw would give all 2,000)
    assert int(torch.bincount(k, minlength=25).min()) != int(torch.bincount(k, minlength=25).max())


def test_gmm25_stratified_sampler_has_equal_counts():
    t = GMM25()
    x = t.sample_stratified(2000, gen(0), dtype=torch.float64)
    assert torch.equal(torch.bincount(_nearest_mode(x), minlength=25), torch.full((25,), 80))
    counts = torch.bincount(_nearest_mode(t.sample_stratified(2010, gen(1), dtype=torch.float64)), minlength=25)
    assert sorted(counts.tolist()) == [80] * 15 + [81] * 10


# --- Funnel --------------------------------------------------------------------------------
def test_funnel_density_against_torch_distributions():
    x = torch.randn(20, 10, generator=gen(5), dtype=torch.float64) * 2
    lead = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)).log_prob(x[:, 0])
    rest = torch.distributions.Normal(0.0, torch.exp(x[:, :1] / 2)).log_prob(x[:, 1:]).sum(1)
    assert torch.allclose(Funnel().log_density(x), lead + rest, rtol=0, atol=1e-12)


def test_funnel_conditional_integrates_out():
    # integral over x_1 of pi(x_0, x_1, 0, ..., 0) = N(x_0; 0, 9) prod_{i>=2} N(0; 0, e^{x_0}), by hand
    for x0 in (-4.0, 0.0, 3.0):
        s = math.exp(x0 / 2)
        h = s / 200
        g = torch.arange(-12 * s, 12 * s + h / 2, h, dtype=torch.float64)
        x = torch.zeros(len(g), 10, dtype=torch.float64)
        x[:, 0], x[:, 1] = x0, g
        lhs = math.log(float(Funnel().log_density(x).exp().sum()) * h)
        rhs = -0.5 * math.log(2 * math.pi * 9) - x0**2 / 18 + 8 * (-0.5 * math.log(2 * math.pi) - x0 / 2)
        assert abs(lhs - rhs) < 1e-9


def test_funnel_exact_sampler():
    n = 40_000
    x = Funnel().sample(n, gen(2), dtype=torch.float64)
    assert abs(float(x[:, 0].mean())) < 5 * 3 / math.sqrt(n)
    assert abs(float(x[:, 0].var()) - 9) < 5 * 9 * math.sqrt(2 / n)
    z = x[:, 1:] / torch.exp(x[:, :1] / 2)  # standard normal, independent of x_0
    assert float(z.mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float((z.var(0) - 1).abs().max()) < 5 * math.sqrt(2 / n)
    assert abs(float(torch.corrcoef(torch.stack([x[:, 0], z[:, 0].abs()]))[0, 1])) < 5 / math.sqrt(n)


# --- ManyWell ------------------------------------------------------------------------------
def test_manywell_density_by_hand_and_shared_with_the_dataset():
    x = torch.randn(6, 32, generator=gen(7), dtype=torch.float64)
    hand = sum(-(x[:, 2 * j] ** 4) + 6 * x[:, 2 * j] ** 2 + 0.5 * x[:, 2 * j] - 0.5 * x[:, 2 * j + 1] ** 2 for j in range(16))
    t = ManyWellEnergy()
    assert torch.allclose(t.log_density(x), hand, rtol=0, atol=1e-10)
    assert torch.equal(t.log_density(x), mw.log_density(x))  # one function, not a copy
    assert torch.allclose(mw.ManyWell().log_prob(x), t.log_density(x) - t.log_z, rtol=0, atol=1e-10)


def test_manywell_log_z_by_independent_simpson_rule():
    n, a, b = 80_000, -8.0, 8.0
    g = torch.linspace(a, b, n + 1, dtype=torch.float64)
    w = torch.ones(n + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    z1 = float((w * torch.exp(-(g**4) + 6 * g**2 + 0.5 * g)).sum()) * (b - a) / n / 3
    assert abs(ManyWellEnergy().log_z - 16 * (math.log(z1) + 0.5 * math.log(2 * math.pi))) < 1e-8


def test_manywell_exact_sampler():
    n = 4000
    x = ManyWellEnergy().sample(n, gen(4), dtype=torch.float64)
    assert torch.equal(x, mw.ManyWell().sample(n, gen(4), dtype=torch.float64))
    left = float((x[:, 0::2] < 0).double().mean())  # 64,000 pair draws
    p = mw.LEFT_MASS
    assert abs(left - p) < 5 * math.sqrt(p * (1 - p) / (16 * n))
    assert abs(float(x[:, 1::2].var()) - 1) < 5 * math.sqrt(2 / (16 * n))
