"""Sample-based distances to reference samples: sliced W2, unbiased MMD^2 and their floors.

Small cases are checked against direct computations written out here (sorted 1-D values, explicit double
loops, statistics.median), larger ones against known behaviour (zero for equal samples, growth with a
mean shift, independent samples of one distribution scoring near the floor).
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from rtbcli.metrics import median_bandwidth, mmd2_rbf, reference_comparison, sliced_w2

KEYS = {"sw2", "sw2_floor", "mmd2", "mmd2_floor", "mmd_bandwidth", "nn_dist", "nn_dist_floor"}
KEYS |= {"n_compared", "n_reference", "n_dropped_nonfinite", "n_far"}


def gaussian(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift * u


# ------------------------------------------------------------ direct computations, independent of rtbcli
def w2_1d(a: list[float], b: list[float]) -> float:
    """W2 between two equal-size 1-D empirical distributions: match sorted values."""
    a, b = sorted(a), sorted(b)
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)) / len(a))


def dist(p, q) -> float:
    return math.sqrt(sum((s - t) ** 2 for s, t in zip(p, q)))


def mmd2_loops(xs, ys, h: float) -> float:
    def k(p, q):
        return math.exp(-(dist(p, q) ** 2) / (2 * h * h))

    n, m = len(xs), len(ys)
    sxx = sum(k(xs[i], xs[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(p, q) for p in xs for q in ys)
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def median_loops(*samples) -> float:
    """statistics.median of the distances over the distinct pairs of the pooled points."""
    z = [p for sample in samples for p in sample]
    return statistics.median(dist(z[i], z[j]) for i in range(len(z)) for j in range(i + 1, len(z)))


X5 = [(0.0, 0.0), (1.0, 0.5), (-0.5, 2.0), (2.0, -1.0), (0.3, 0.7)]
Y4 = [(1.5, 1.5), (2.5, 0.0), (0.0, 3.0), (3.0, 2.0)]


# ------------------------------------------------------------ sliced W2
def test_sw2_exactly_zero_for_same_rows_in_any_order():
    x = gaussian(300, 4, 0)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert sliced_w2(x, x) == 0.0
    assert sliced_w2(x, x[perm]) == 0.0
    assert sliced_w2(x, x[perm].to(torch.float32)) < 1e-6  # only float32 rounding
    assert sliced_w2(x, x + 1e-3 * gaussian(300, 4, 2)) > 0.0


def test_sw2_in_1d_is_w2_of_sorted_values():
    x, y = [3.0, 0.0, 2.0, 1.0], [7.0, 1.0, 5.0, 3.0]  # sorted differences 1, 2, 3, 4
    expected = math.sqrt((1 + 4 + 9 + 16) / 4)
    for n_proj, seed in [(256, 0), (1, 5), (17, 3)]:
        got = sliced_w2(torch.tensor(x)[:, None], torch.tensor(y)[:, None], n_proj=n_proj, seed=seed)
        assert got == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), 2 + 3 * torch.rand(50, generator=g)
    assert sliced_w2(a[:, None], b[:, None]) == pytest.approx(w2_1d(a.tolist(), b.tolist()), rel=1e-6)


def test_sw2_of_a_translate():
    # y = x + v keeps the order of every projection, so SW2^2 = mean_p (v . theta_p)^2 -> |v|^2 / d
    d, v = 5, torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    x = gaussian(200, d, 0)
    got = sliced_w2(x, x + v, n_proj=4096) ** 2
    assert got == pytest.approx(float(v.square().sum()) / d, rel=0.1)


def test_sw2_unequal_sizes_subsample_without_replacement():
    # x has one row fewer than y, so y loses exactly one row: the value is one of 8 candidates
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, generator=g).tolist(), (torch.randn(8, generator=g) * 2 + 1).tolist()
    candidates = [w2_1d(x, y[:i] + y[i + 1 :]) for i in range(8)]
    hit = set()
    for seed in range(20):
        got = sliced_w2(torch.tensor(x)[:, None], torch.tensor(y)[:, None], seed=seed)
        assert sliced_w2(torch.tensor(y)[:, None], torch.tensor(x)[:, None], seed=seed) == got
        matches = [i for i, c in enumerate(candidates) if math.isclose(got, c, rel_tol=1e-9)]
        assert matches, (got, candidates)
        hit.add(matches[0])
    assert len(hit) > 1  # a random row is dropped, not always the same one


def test_sw2_unequal_sizes_same_distribution_is_small():
    small, big = gaussian(300, 3, 0), gaussian(3000, 3, 1)
    assert sliced_w2(small, big) < 0.25 * sliced_w2(small, gaussian(3000, 3, 1, shift=1.0))


# ------------------------------------------------------------ MMD^2 and its bandwidth
def test_mmd2_matches_double_loops_with_a_given_bandwidth():
    x, y = torch.tensor(X5, dtype=torch.float64), torch.tensor(Y4, dtype=torch.float64)
    for h in (0.7, 1.3, 4.0):
        assert mmd2_rbf(x, y, bandwidth=h) == pytest.approx(mmd2_loops(X5, Y4, h), rel=1e-12, abs=1e-15)
    assert mmd2_rbf(x, x, bandwidth=1.0) == pytest.approx(mmd2_loops(X5, X5, 1.0), abs=1e-15)
    assert mmd2_loops(X5, X5, 1.0) < 0  # the unbiased estimate of identical samples is negative


def test_median_bandwidth_and_default_mmd2_match_loops():
    """h is the median distance over the reference's own pairs (y), not the pooled points."""
    x, y = torch.tensor(X5, dtype=torch.float64), torch.tensor(Y4, dtype=torch.float64)
    # 5 reference points, 10 pairs: the median is the mean of the two middle distances
    h = median_loops(X5)
    assert median_bandwidth(x) == pytest.approx(h, rel=1e-12)
    assert mmd2_rbf(y, x) == pytest.approx(mmd2_loops(Y4, X5, h), rel=1e-12)
    assert h != pytest.approx(median_loops(X5, Y4), rel=1e-3)  # the pooled median would be another number
    # 4 reference points, 6 pairs; 3 points, 3 pairs: the middle distance
    assert median_bandwidth(y) == pytest.approx(median_loops(Y4), rel=1e-12)
    assert mmd2_rbf(x, y) == pytest.approx(mmd2_loops(X5, Y4, median_loops(Y4)), rel=1e-12)
    assert median_bandwidth(y[:3]) == pytest.approx(median_loops(Y4[:3]), rel=1e-12)


def test_mmd2_subsamples_to_max_points():
    x, y = torch.tensor(X5, dtype=torch.float64), torch.tensor(Y4, dtype=torch.float64)
    candidates = [mmd2_loops(xs, ys, 1.0) for xs in itertools.combinations(X5, 3) for ys in itertools.combinations(Y4, 3)]
    got = mmd2_rbf(x, y, max_points=3, bandwidth=1.0)
    assert any(math.isclose(got, c, rel_tol=1e-12) for c in candidates)
    assert not math.isclose(got, mmd2_loops(X5, Y4, 1.0), rel_tol=1e-6)
    # the default bandwidth is the median over the reference rows the MMD uses
    got = mmd2_rbf(x, y, max_points=3, seed=4)
    assert any(
        math.isclose(got, mmd2_loops(xs, ys, median_loops(ys)), rel_tol=1e-12)
        for xs in itertools.combinations(X5, 3)
        for ys in itertools.combinations(Y4, 3)
    )
    h3 = median_bandwidth(y, max_points=3, seed=4)
    assert any(math.isclose(h3, median_loops(ys), rel_tol=1e-12) for ys in itertools.combinations(Y4, 3))


def test_one_median_definition_the_mean_of_the_two_middle_values():
    """statistics.median's median everywhere (torch's `median()` would give the lower middle value), also where most
    distances are 0 and the median of the nonzero ones stands in."""
    u = torch.zeros(4, 2, dtype=torch.float64)
    u[:, 0] = torch.tensor([0.0, 0.0, 1.0, 3.0])  # pair distances 0, 1, 1, 3, 3, 2: sorted 0 1 1 2 3 3 -> (1 + 2) / 2
    assert median_bandwidth(u) == 1.5 == median_loops(u.tolist())
    z = torch.zeros(8, 2, dtype=torch.float64)
    z[6, 0], z[7, 0] = 1.0, 4.0  # 15 zero pairs of 28: median 0; the 13 nonzero: 6 of 1, one of 3, 6 of 4 -> 3
    assert median_bandwidth(z) == 3.0


def test_mmd2_degenerate_median_bandwidth():
    """A point-mass reference has no bandwidth of its own: the median of the nonzero pooled distances (here all 1)
    stands in; every point the same point: MMD^2 = 0 whatever h; a given bandwidth of 0 is an error."""
    x = torch.zeros(4, 2, dtype=torch.float64)
    assert median_bandwidth(x) == 0.0
    assert mmd2_rbf(x, x) == 0.0
    y = x.clone()
    y[0, 0] = 1.0
    assert mmd2_rbf(y, x) == pytest.approx(mmd2_rbf(y, x, bandwidth=1.0), abs=0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2_rbf(x, y, bandwidth=0.0)


# ------------------------------------------------------------ behaviour on Gaussian samples
def test_both_grow_with_a_mean_shift():
    x = gaussian(1000, 5, 0)
    sw = [sliced_w2(x, gaussian(1000, 5, 1, shift=s)) for s in (0.0, 0.5, 1.0, 2.0)]
    mmd = [mmd2_rbf(x, gaussian(1000, 5, 1, shift=s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(sw, sw[1:])), sw
    assert all(a < b for a, b in zip(mmd, mmd[1:])), mmd
    assert sw[3] == pytest.approx(2.0 / math.sqrt(5), rel=0.25)  # about |shift| / sqrt(d)


def test_independent_samples_sit_near_the_floor():
    ref = gaussian(2000, 5, 0)
    same = reference_comparison(gaussian(1000, 5, 1), ref)
    off = reference_comparison(gaussian(1000, 5, 1, shift=1.0), ref)
    assert same.keys() == KEYS and same["n_compared"] == 1000 and same["n_reference"] == 2000
    assert same["sw2"] < 2.0 * same["sw2_floor"]
    assert same["sw2"] < 0.25 * off["sw2"] and same["sw2_floor"] < 0.25 * off["sw2"]
    assert abs(same["mmd2"]) < 0.05 * off["mmd2"] and abs(same["mmd2_floor"]) < 0.05 * off["mmd2"]
    assert abs(same["mmd2"] - same["mmd2_floor"]) < 0.05 * off["mmd2"]
    # the floor depends on the reference, the seed and the sample size only
    assert (off["sw2_floor"], off["mmd2_floor"]) == (same["sw2_floor"], same["mmd2_floor"])


def test_reference_comparison_on_an_enumerable_case():
    # 1-D, r = 6 (halves of 3), 5 model rows -> m = 3: one split (A, B) and one model subset X explain all four numbers
    g = torch.Generator().manual_seed(3)
    ref, model = torch.randn(6, generator=g).tolist(), (torch.randn(5, generator=g) + 0.5).tolist()
    out = reference_comparison(torch.tensor(model)[:, None], torch.tensor(ref)[:, None], seed=2)
    assert (out["n_compared"], out["n_reference"], out["n_dropped_nonfinite"]) == (3, 6, 0)

    def pt(v):
        return [(t,) for t in v]

    h = median_loops(pt(ref))  # one bandwidth, the median over the 15 pairs of the whole reference, for both MMD^2
    assert out["mmd_bandwidth"] == pytest.approx(h, rel=1e-12)
    found = False
    for ia in itertools.combinations(range(6), 3):
        a = [ref[i] for i in ia]
        b = [ref[i] for i in range(6) if i not in ia]
        for xs in itertools.combinations(model, 3):
            xs = list(xs)
            if all(
                math.isclose(out[k], v, rel_tol=1e-9)
                for k, v in [
                    ("sw2", w2_1d(xs, a)),
                    ("sw2_floor", w2_1d(b, a)),
                    ("mmd2", mmd2_loops(pt(xs), pt(a), h)),
                    ("mmd2_floor", mmd2_loops(pt(b), pt(a), h)),
                    ("nn_dist", sum(min(abs(u - v) for v in a) for u in xs) / 3),
                    ("nn_dist_floor", sum(min(abs(u - v) for v in a) for u in b) / 3),
                ]
            ):
                found = True
    assert found, out


def test_nn_dist_sees_samples_spread_across_a_thin_reference():
    """Reference rows on a segment of the x-axis (spacing ~1e-3), samples on it lifted by 0.1: each is 0.1 from its nearest
    reference row (to the spacing's square over 0.2), while the other half of the reference is a spacing away. Sliced W2
    of the same samples is under 0.1: it averages over directions, most of them along the segment."""
    g = torch.Generator().manual_seed(0)
    ref = torch.stack([torch.rand(4000, generator=g, dtype=torch.float64), torch.zeros(4000, dtype=torch.float64)], 1)
    lifted = torch.stack([0.1 + 0.8 * torch.rand(2000, generator=g, dtype=torch.float64), torch.full((2000,), 0.1)], 1)
    out = reference_comparison(lifted, ref, seed=1)
    assert out["nn_dist"] == pytest.approx(0.1, rel=1e-3)
    assert out["nn_dist_floor"] < 2e-3
    assert out["sw2"] < 0.1


def test_model_and_floor_share_the_reference_bandwidth():
    """A model far from the reference would widen a pooled median bandwidth: MMD^2 and its floor must both use the
    median distance of the reference rows (at most 2,000 of them), so that the two numbers compare."""
    ref, far = gaussian(600, 3, 0), gaussian(300, 3, 1, shift=6.0)
    out = reference_comparison(far, ref, seed=3)
    h = median_bandwidth(ref, seed=3)
    assert out["mmd_bandwidth"] == h
    assert h == pytest.approx(statistics.median(torch.pdist(ref).tolist()), rel=1e-12)  # 600 rows: all of them
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(600, generator=gen)
    a, b = ref[perm[:300]], ref[perm[300:600]]
    x = far[torch.randperm(300, generator=gen)]  # m = 300 = n: the subsample is a permutation, which MMD ignores
    assert out["mmd2"] == pytest.approx(mmd2_rbf(x, a, bandwidth=h, seed=3), rel=1e-12)
    assert out["mmd2_floor"] == pytest.approx(mmd2_rbf(b, a, bandwidth=h, seed=3), rel=1e-12)
    assert out["mmd2"] != pytest.approx(mmd2_rbf(x, a, bandwidth=median_bandwidth(torch.cat([x, a])), seed=3), rel=1e-3)
    # more than 2,000 reference rows: the median is over a seeded subsample of 2,000
    big = gaussian(2500, 2, 4)
    sub = big[torch.randperm(2500, generator=torch.Generator().manual_seed(0))[:2000]]
    assert median_bandwidth(big) == pytest.approx(statistics.median(torch.pdist(sub).tolist()), rel=1e-12)


def test_sizes_compared():
    ref = gaussian(101, 2, 0)
    assert reference_comparison(gaussian(30, 2, 1), ref)["n_compared"] == 30
    assert reference_comparison(gaussian(500, 2, 1), ref)["n_compared"] == 50


# ------------------------------------------------------------ determinism
def test_fixed_seed_is_repeatable_and_independent_of_the_global_rng():
    x, ref = gaussian(700, 3, 0), gaussian(900, 3, 1, shift=0.3)
    torch.manual_seed(123)
    first = reference_comparison(x, ref, seed=5)
    torch.manual_seed(456)
    torch.rand(10)
    assert reference_comparison(x, ref, seed=5) == first
    assert reference_comparison(x, ref, seed=6)["sw2"] != first["sw2"]
    torch.manual_seed(7)
    a = (sliced_w2(x, ref, seed=1), mmd2_rbf(x, ref, max_points=300, seed=1))
    torch.manual_seed(8)
    assert (sliced_w2(x, ref, seed=1), mmd2_rbf(x, ref, max_points=300, seed=1)) == a
    assert sliced_w2(x[:5], ref[:5], seed=1) != sliced_w2(x[:5], ref[:5], seed=2)  # directions follow the seed


def test_far_rows_are_counted_and_weigh_on_sliced_w2_not_mmd():
    """Reference in about [0, 1] x [0, 0.5]: the box is widened on every side by its largest width (about 1), also in
    the narrow coordinate, and a coordinate constant in the reference widens by that too (a blank pixel: no false
    alarms). One diverged row in 300 moves SW2 by far more than MMD^2."""
    ref = torch.rand(400, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * torch.tensor(
        [1.0, 0.5], dtype=torch.float64
    )
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.5
    lo, hi = ref.min(0).values, ref.max(0).values
    w = float(hi[0] - lo[0])  # the largest width
    edge = x.clone()
    edge[0] = hi + 0.9 * w  # inside in both coordinates (the narrow one widens by w too)
    edge[1, 0] = float(hi[0]) + 1.1 * w
    edge[2, 1] = float(lo[1]) - 1.1 * w
    assert reference_comparison(x, ref)["n_far"] == 0 and reference_comparison(edge, ref)["n_far"] == 2
    blank = torch.cat([ref, torch.zeros(400, 1, dtype=torch.float64)], 1)  # a coordinate constant in the reference
    assert reference_comparison(torch.cat([x, torch.full((300, 1), 0.3, dtype=torch.float64)], 1), blank)["n_far"] == 0
    far = x.clone()
    far[7] = torch.tensor([1e3, -1e3], dtype=torch.float64)
    clean, dirty = reference_comparison(x, ref, seed=2), reference_comparison(far, ref, seed=2)
    assert dirty["n_far"] == 1
    assert dirty["sw2"] > 10 * clean["sw2"] and abs(dirty["mmd2"] - clean["mmd2"]) < 0.01


# ------------------------------------------------------------ non-finite rows and errors
def test_nonfinite_model_rows_are_dropped_and_counted():
    x, ref = gaussian(300, 3, 0), gaussian(400, 3, 1)
    bad = x.clone()
    bad[[4, 50, 299], [0, 2, 1]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    out = reference_comparison(bad, ref)
    keep = torch.ones(300, dtype=torch.bool)
    keep[[4, 50, 299]] = False
    clean = reference_comparison(x[keep], ref)
    assert out["n_dropped_nonfinite"] == 3 and clean["n_dropped_nonfinite"] == 0
    assert out == {**clean, "n_dropped_nonfinite": 3}
    assert all(math.isfinite(out[k]) for k in ("sw2", "sw2_floor", "mmd2", "mmd2_floor"))
    # non-finite reference rows are left out of the reference
    ref_bad = torch.cat([ref, torch.full((2, 3), math.nan, dtype=torch.float64)])
    assert reference_comparison(x, ref_bad)["n_reference"] == 400
    # all model rows non-finite: counts, NaN statistics
    dead = reference_comparison(torch.full((10, 3), math.nan), ref)
    assert (dead["n_compared"], dead["n_dropped_nonfinite"]) == (0, 10) and math.isnan(dead["sw2"])
    # the plain functions refuse non-finite input rather than guess
    with pytest.raises(ValueError, match="non-finite"):
        sliced_w2(bad, ref)
    with pytest.raises(ValueError, match="non-finite"):
        mmd2_rbf(ref, bad)


def test_reference_too_small():
    x = gaussian(20, 2, 0)
    with pytest.raises(ValueError, match="at least 4 finite"):
        reference_comparison(x, gaussian(3, 2, 1))
    ref = gaussian(5, 2, 1)
    ref[1:3, 0] = math.nan  # 3 finite rows left
    with pytest.raises(ValueError, match="at least 4 finite"):
        reference_comparison(x, ref)
    assert reference_comparison(x, gaussian(4, 2, 1))["n_compared"] == 2


def test_dimension_mismatch_and_bad_shapes():
    x, y = gaussian(20, 2, 0), gaussian(20, 3, 1)
    for f in (sliced_w2, mmd2_rbf, reference_comparison):
        with pytest.raises(ValueError, match="dimension mismatch"):
            f(x, y)
    with pytest.raises(ValueError, match="2-D"):
        sliced_w2(torch.zeros(20), torch.zeros(20))
