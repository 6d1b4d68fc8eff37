"""Metrics (docs/maths.md#metrics) against exact samples, broken samplers, and an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtbcli.metrics import (
    bin_index,
    cell_index,
    effective_sample_size,
    hist_edges,
    histogram_kl,
    log_mean_exp,
    mixture_bin_masses,
    mode_weight_kl,
    sample_metrics,
)
from rtbcli.suites import prior_target, tilted_target
from rtbcli.tasks import GaussianMixture, Task

N = 20_000


@pytest.fixture(scope="module")
def task():
    from rtbcli.presets_loader import load_preset

    return Task(load_preset("reference")[0])


@pytest.fixture(scope="module")
def target(task):
    return tilted_target(task, 1.0)


def draw(target, n=N, seed=0):
    return target.sample(n, torch.Generator().manual_seed(seed))


def independent_metrics(x: np.ndarray, means: np.ndarray, weights: np.ndarray, std: float) -> dict:
    """The definitions of docs/maths.md#metrics (mode cells, mode-weight KL, off-target mass, histogram KL)
    re-implemented with numpy loops and np.histogram2d, for cross-checking."""
    n, k = len(x), len(means)
    m = 1 - math.exp(-(1.5**2) / (2 * std**2))
    counts = np.zeros(k + 1)
    for p in x:
        if not np.all(np.isfinite(p)):
            counts[k] += 1
            continue
        d = np.sqrt(((means - p) ** 2).sum(1))
        j = int(np.argmin(d))
        counts[j if d[j] <= 1.5 else k] += 1
    p_cells = np.append(weights * m, 1 - m)
    q = (counts + 0.5) / (n + 0.5 * (k + 1))
    kl_mode = sum(pc * math.log(pc / qc) for pc, qc in zip(p_cells, q) if pc > 0)
    targets = weights > 0
    off = 1 - counts[:k][targets].sum() / n
    cov = sum(1 for j in range(k) if targets[j] and counts[j] > 0 and counts[j] / n >= p_cells[j] / 4)
    edges = np.linspace(-13, 13, 53)
    h, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[edges, edges])
    h = np.append(h.reshape(-1), n - h.sum())
    from math import erf

    def cdf(z):
        return 0.5 * (1 + erf(z / math.sqrt(2)))

    pb = np.zeros((52, 52))
    for mu, w in zip(means, weights):
        if w == 0:
            continue
        px = np.array([cdf((edges[i + 1] - mu[0]) / std) - cdf((edges[i] - mu[0]) / std) for i in range(52)])
        py = np.array([cdf((edges[i + 1] - mu[1]) / std) - cdf((edges[i] - mu[1]) / std) for i in range(52)])
        pb += w * np.outer(px, py)
    pb = np.append(pb.reshape(-1), 1 - pb.sum())
    qb = (h + 0.01) / (n + 0.01 * len(h))
    kl_hist = sum(pc * math.log(pc / qc) for pc, qc in zip(pb, qb) if pc > 0)
    return {"mode_coverage": cov, "kl_mode": kl_mode, "off_target": off, "kl_hist": kl_hist}


def test_agrees_with_an_independent_implementation(task, target):
    rng = np.random.default_rng(0)
    x = draw(target, 5000).numpy()
    x[:300] = rng.uniform(-14, 14, size=(300, 2))  # some mass off-target and outside the histogram
    x[300:305] = np.nan
    x[305] = [12.99, -13.0]  # bin edges
    ours = sample_metrics(torch.from_numpy(x), target)
    w = target.mode_weights.numpy()
    ref = independent_metrics(x, task.prior_data.means.numpy(), w, task.prior_data.std)
    assert ours["mode_coverage"] == ref["mode_coverage"] and ours["n_target_modes"] == 9
    for key in ("kl_mode", "off_target", "kl_hist"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_exact_samples_sit_at_the_floor(target):
    """Two independent exact samples score the same within noise, at the floor of docs/maths.md#the-exact-sampler-floor
    (mode-weight KL about 0.0005 at n = 20,000)."""
    a, b = sample_metrics(draw(target, seed=1), target), sample_metrics(draw(target, seed=2), target)
    assert a["mode_coverage"] == b["mode_coverage"] == 9
    assert 0 < a["kl_mode"] < 0.0015 and abs(a["kl_mode"] - b["kl_mode"]) < 0.001
    assert 0.015 < a["kl_hist"] < 0.03 and abs(a["kl_hist"] - b["kl_hist"]) < 0.006
    m = 1 - math.exp(-(1.5**2) / 0.6)
    assert a["off_target"] == pytest.approx(1 - m, abs=4 * math.sqrt(m * (1 - m) / N))


def test_prior_target_floor(task):
    t = prior_target(task)
    r = sample_metrics(draw(t, seed=3), t)
    assert r["mode_coverage"] == r["n_target_modes"] == 25 and r["kl_mode"] < 0.0015


def test_dropped_modes_are_caught(task, target):
    keep = target.mode_weights.clone()
    keep[keep.argmax()] = 0  # drop the heaviest mode
    dropped = GaussianMixture(task.prior_data.means, keep / keep.sum(), task.prior_data.variance)
    r = sample_metrics(dropped.sample(N, torch.Generator().manual_seed(4)), target)
    assert r["mode_coverage"] == 8 and r["kl_mode"] > 0.1
    # under-weighting a mode 10x is caught by coverage too (q_k < p_k / 4)
    low = target.mode_weights.clone()
    low[low.argmax()] /= 10
    r = sample_metrics(GaussianMixture(task.prior_data.means, low / low.sum(), 0.3).sample(N, torch.Generator().manual_seed(5)), target)
    assert r["mode_coverage"] == 8


def test_mass_in_masked_modes_is_caught(task, target):
    spread = GaussianMixture(task.prior_data.means, 0.8 * target.mode_weights + 0.2 / 25, 0.3)
    r = sample_metrics(spread.sample(N, torch.Generator().manual_seed(6)), target)
    assert r["mode_coverage"] == 9
    masked_mass = 0.2 * 16 / 25
    assert r["off_target"] == pytest.approx(1 - (1 - masked_mass) * (1 - math.exp(-(1.5**2) / 0.6)), abs=0.01)


def hand_smoothed_kl(p: np.ndarray, counts: np.ndarray, pseudo: float) -> float:
    q = (counts + pseudo) / (counts.sum() + pseudo * len(counts))
    return float(sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0))


def test_kl_by_hand_and_zero_only_when_matched():
    p = torch.tensor([0.5, 0.5, 0.0])
    # q = (0.5, 0.5, 100.5) / 101.5 on the two target cells
    assert mode_weight_kl(torch.tensor([0, 0, 100]), p) == pytest.approx(math.log(0.5 * 101.5 / 0.5), rel=1e-12)
    assert mode_weight_kl(torch.tensor([1_000_000, 1_000_000, 0]), p) == pytest.approx(0, abs=1e-6)
    # the cells with p = 0 do not count, the pseudo-counts do: a hand-written loop over random cases
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(0, 50, (26,), generator=g)
        p = torch.rand(26, generator=g, dtype=torch.float64)
        p[torch.randperm(26, generator=g)[:5]] = 0.0
        p = p / p.sum()
        assert mode_weight_kl(counts, p) == pytest.approx(hand_smoothed_kl(p.numpy(), counts.numpy(), 0.5), rel=1e-12)
        assert histogram_kl(counts, p) == pytest.approx(hand_smoothed_kl(p.numpy(), counts.numpy(), 0.01), rel=1e-12)


def test_histogram_masses(task):
    edges = hist_edges(13, 0.5)
    assert edges.numel() == 53
    masses = mixture_bin_masses(task.prior_data.means, task.prior_data.weights, task.prior_data.std, edges)
    assert masses.numel() == 2705 and masses.sum().item() == pytest.approx(1, abs=1e-12) and (masses >= 0).all()
    assert masses[-1] < 1e-6  # nearly no mass beyond [-13, 13]^2
    wide = mixture_bin_masses(torch.tensor([[12.0, 0.0]], dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1.0, edges)
    assert wide[-1].item() == pytest.approx(1 - 0.5 * (math.erf(1 / math.sqrt(2)) + 1), rel=1e-6)


def test_bin_and_cell_index_edges():
    x = torch.tensor([[-13.0, -13.0], [12.99, 12.99], [13.0, 0.0], [float("nan"), 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = bin_index(x, 13.0, 0.5)
    assert b.tolist() == [0, 52 * 52 - 1, 52 * 52, 52 * 52, 26 * 52 + 26]
    means = torch.tensor([[0.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    c = cell_index(torch.tensor([[1.5, 0.0], [1.51, 0.0], [3.6, 0.0], [float("inf"), 0.0]], dtype=torch.float64), means, 1.5)
    assert c.tolist() == [0, 2, 1, 2]


def test_log_z_estimators_on_a_known_case():
    """Importance weights of a Gaussian proposal q = N(0, 1) for p = 3 N(0.5, 1) (unnormalised): log Z = log 3."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(200_000, generator=g, dtype=torch.float64)
    lw = math.log(3) - 0.5 * (z - 0.5) ** 2 + 0.5 * z**2
    assert log_mean_exp(lw) == pytest.approx(math.log(3), abs=0.01)
    assert lw.mean().item() == pytest.approx(math.log(3) - 0.125, abs=0.01)  # ELBO = log Z - KL(q||p)
    assert effective_sample_size(lw) == pytest.approx(math.exp(-0.25), abs=0.01)  # 1 / E_q[w^2] / Z^2
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(1.0)


@pytest.mark.parametrize("beta,log_z", [(0.5, -0.544), (2.0, 1.287)])
def test_grid_target_log_z_and_mode_weights(task, beta, log_z):
    """The reference task at beta != 1 (docs/maths.md#the-reference-task): the grid's log Z_data is the tabled value,
    and the 9 kept modes weigh w_k^beta / sum_j w_j^beta."""
    t = tilted_target(task, beta)
    assert t.method == "grid" and t.log_z == pytest.approx(log_z, abs=1e-3)
    assert t.cell_masses.sum().item() == pytest.approx(1, abs=1e-9) and t.bin_masses.sum().item() == pytest.approx(1, abs=1e-9)
    w = torch.tensor([4, 10, 4, 5, 10, 5, 4, 15, 4], dtype=torch.float64) ** beta
    got = t.mode_weights[t.target_modes]
    assert int(t.target_modes.sum()) == 9
    torch.testing.assert_close(got.sort().values, (w / w.sum()).sort().values, rtol=0, atol=1e-4)


def test_grid_and_closed_form_agree_at_beta_one(task):
    from rtbcli.targets import _grid_target

    exact, grid = tilted_target(task, 1.0), _grid_target(task, "grid", None, 1.0)
    assert exact.method == "exact" and grid.log_z == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(grid.cell_masses, exact.cell_masses, rtol=0, atol=2e-4)
    torch.testing.assert_close(grid.bin_masses, exact.bin_masses, rtol=0, atol=1e-5)


def test_small_beta_puts_mass_on_masked_modes(task):
    t = tilted_target(task, 0.1)
    masked = ~tilted_target(task, 1.0).target_modes
    assert t.cell_masses[:25][masked].sum().item() == pytest.approx(0.039, abs=0.002)
