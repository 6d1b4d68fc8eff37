"""Sample-quality and log-Z metrics, exactly as docs/maths.md#metrics defines them.

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

from .metric_registry import floor_keys


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
    """Mode-weight KL: cells smoothed by +0.5 (docs/maths.md#mode-cells-and-mode-weight-kl)."""
    return smoothed_kl(cell_masses, counts, 0.5)


def histogram_kl(counts: torch.Tensor, bin_masses: torch.Tensor) -> float:
    """Histogram KL: bins smoothed by +0.01 (docs/maths.md#histogram-kl)."""
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
    out = dict.fromkeys(floor_keys())  # the mode metrics: the registry's keys with an exact-sampler floor
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


# ------------------------------------------------------------ distances to reference samples
# Sample-based distances between samples x (n, d) and y (m, d), and the same distances between two
# disjoint halves of a reference sample (the "floor": what a sampler indistinguishable from the
# target scores at the same sample size). Everything is computed on the CPU in float64; every random
# choice (subsamples, projection directions, the reference split) comes from a torch.Generator
# seeded with `seed`, so a number is repeatable for the same inputs and seed.


def _as_samples(x, name: str) -> torch.Tensor:
    """x as a CPU float64 (n, d) tensor; ValueError unless it is 2-D."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array of samples, got shape {tuple(x.shape)}")
    return x


def _check_pair(x, y, require_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has d = {x.shape[1]}, y has d = {y.shape[1]}")
    if require_finite:
        for name, t in (("x", x), ("y", y)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite values; drop those rows first")
    return x, y


def _subsample(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """x itself if it has at most k rows, else k of its rows drawn without replacement."""
    if x.shape[0] <= k:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:k]]


def _median(v: torch.Tensor) -> float:
    """The median of a 1-D tensor, as statistics.median defines it: the middle value, or the mean of the two
    middle values. The one median of this module (torch's `median()` is the lower middle value instead)."""
    k = v.numel()
    lo = v.kthvalue((k + 1) // 2).values
    if k % 2:
        return float(lo)
    # upper middle value = the ((k/2) + 1)-th smallest: lo again if it is tied there, else the next value up
    hi = lo if int((v <= lo).sum()) > k // 2 else v[v > lo].min()
    return float((lo + hi) / 2)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ||a_i - b_j||^2, float64, clamped at 0."""
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _pairs(d2: torch.Tensor) -> torch.Tensor:
    """The entries i < j of a square matrix of one sample's squared distances: its distinct pairs."""
    n = d2.shape[0]
    return d2[torch.ones(n, n, dtype=torch.bool).triu_(1)]


def _median_distance(*sq: torch.Tensor) -> float:
    """The median of the distances whose squares are `sq` (concatenated); where that median is 0 (most pairs
    coincide), the median of the nonzero ones; 0.0 if every distance is 0 (or there is none)."""
    v = torch.cat([t.reshape(-1) for t in sq])
    h = _median(v.sqrt()) if v.numel() else 0.0
    if h == 0:
        nonzero = v[v > 0]
        h = _median(nonzero.sqrt()) if nonzero.numel() else 0.0
    return h


def _mmd_points(x, y, max_points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The points MMD uses: at most max_points of each sample."""
    x, y = _check_pair(x, y)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    gen = torch.Generator().manual_seed(seed)
    return _subsample(x, max_points, gen), _subsample(y, max_points, gen)


MMD_MAX_POINTS = 2000  # rows of each sample MMD^2 uses, and of the reference its bandwidth uses


def median_bandwidth(reference, max_points: int = MMD_MAX_POINTS, seed: int = 0) -> float:
    """The MMD kernel bandwidth h: the median of ||y_i - y_j|| over the distinct pairs i < j of the reference's
    rows (at most `max_points` of them, drawn without replacement by a torch.Generator seeded with `seed`).

    The median is statistics.median's (for an even number of pairs, the mean of the two middle distances).
    Where it is 0 (most reference rows coincide), the median of the nonzero distances; 0.0 when every row is
    the same point (then no bandwidth follows from the reference alone). Needs 2 finite rows.
    """
    y = _as_samples(reference, "reference")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("reference has non-finite values; drop those rows first")
    if max_points < 2 or y.shape[0] < 2:
        raise ValueError("the median bandwidth needs at least 2 reference rows (and max_points >= 2)")
    y = _subsample(y, max_points, torch.Generator().manual_seed(seed))
    return _median_distance(_pairs(_sq_dists(y, y)))


def mmd2_rbf(x, y, max_points: int = MMD_MAX_POINTS, seed: int = 0, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between samples x and reference samples y with the Gaussian kernel
    k(a, b) = exp(-||a - b||^2 / (2 h^2)):

    MMD^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j) - 2/(nm) sum_{i,j} k(x_i, y_j),

    over at most `max_points` rows of each sample (drawn without replacement, seeded). It can be slightly
    negative. h = `bandwidth`, or if None the median distance of the y rows used (`median_bandwidth`'s rule);
    where y is one point repeated, the median of the nonzero pooled distances stands in, and where every point
    is the same point MMD^2 = 0 (k = 1 everywhere). Needs at least 2 points in each sample; ValueError if a
    given bandwidth is not positive and finite.
    """
    x, y = _mmd_points(x, y, max_points, seed)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD^2 needs at least 2 points in each sample, got {n} and {m}")
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    if bandwidth is None:
        h = _median_distance(_pairs(dyy)) or _median_distance(_pairs(dxx), _pairs(dyy), dxy)
        if h == 0:
            return 0.0
    else:
        h = float(bandwidth)
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"the kernel bandwidth must be positive and finite, got {h}")
    c = -1.0 / (2.0 * h * h)

    def off_diagonal_sum(d2: torch.Tensor) -> torch.Tensor:
        k = d2.mul_(c).exp_()
        return k.sum() - k.diagonal().sum()

    kxx = off_diagonal_sum(dxx) / (n * (n - 1))
    kyy = off_diagonal_sum(dyy) / (m * (m - 1))
    kxy = dxy.mul_(c).exp_().sum() / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


def sliced_w2(x, y, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between samples x (n, d) and y (m, d).

    If n != m the larger sample is first subsampled without replacement to the smaller size (seeded).
    Directions theta_p, p = 1..n_proj: standard normal d-vectors, normalised, from a torch.Generator seeded
    with `seed` (the same directions for the same (d, seed)). For each p, sort x @ theta_p and y @ theta_p
    and take the mean squared difference of the sorted values; SW2 = sqrt(mean over p). In 1-D every
    direction is +-1, so SW2 is the W2 distance between the two empirical distributions.
    """
    x, y = _check_pair(x, y)
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("sliced_w2 needs at least 1 point in each sample")
    if n_proj < 1:
        raise ValueError("n_proj must be at least 1")
    k = min(x.shape[0], y.shape[0])
    sub = torch.Generator().manual_seed(seed)
    x, y = _subsample(x, k, sub), _subsample(y, k, sub)
    theta = torch.randn(x.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    return float((px - py).square().mean().sqrt())


def _mmd_beside_floor(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: float, seed: int) -> tuple[float, float, float]:
    """(mmd2, mmd2_floor, h): MMD^2(x, a) and MMD^2(b, a), both with the one bandwidth h of the reference.

    h = 0 means the reference is one point repeated: the floor is then exactly 0 under any kernel, and the
    model's MMD^2 takes the median of its nonzero pooled distances (`mmd2_rbf`'s rule), reported as h.
    """
    if h == 0:
        xs, as_ = _mmd_points(x, a, MMD_MAX_POINTS, seed)
        h = _median_distance(_pairs(_sq_dists(xs, xs)), _pairs(_sq_dists(as_, as_)), _sq_dists(xs, as_))
        if h == 0:  # every point is the same point
            return 0.0, 0.0, 0.0
    return mmd2_rbf(x, a, seed=seed, bandwidth=h), mmd2_rbf(b, a, seed=seed, bandwidth=h), h


def _far_rows(x: torch.Tensor, ref: torch.Tensor) -> int:
    """Rows of x outside the reference's bounding box widened on every side by its largest width."""
    lo, hi = ref.min(dim=0).values, ref.max(dim=0).values
    width = float((hi - lo).max())  # the largest: a coordinate constant in the reference (a blank pixel) has none
    return int(((x < lo - width) | (x > hi + width)).any(dim=1).sum())


def nearest_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> float:
    """mean_i min_j ||x_i - ref_j||: how far the rows of x lie from the reference's support (exact, chunked)."""
    return float(sum(torch.cdist(c, ref).min(dim=1).values.sum() for c in x.split(chunk)) / x.shape[0])


def reference_comparison(samples, reference, seed: int = 0) -> dict:
    """SW2, MMD^2 and the nearest-reference distance of samples against reference samples, each next to its floor.

    Non-finite rows are dropped (model rows counted in n_dropped_nonfinite; n_reference counts the finite
    reference rows, of which there must be at least 4). The reference (r rows) is split by a seeded random
    permutation into disjoint halves A and B of floor(r/2) rows; with m = min(n_model, floor(r/2)) and a
    seeded subsample X of m model rows:

      sw2 = sliced_w2(X, A[:m]),      sw2_floor = sliced_w2(B[:m], A[:m]),
      mmd2 = mmd2_rbf(X, A[:m], h),   mmd2_floor = mmd2_rbf(B[:m], A[:m], h)
      nn_dist = mean_i min_j |X_i - A_j|,   nn_dist_floor = the same for B[:m]

    all with the same seed, so model and floor use the same projection directions, and one kernel bandwidth
    h = median_bandwidth(reference, 2000, seed) (the median pairwise distance of at most 2,000 reference rows)
    for both MMD^2, so that the two compare; h is reported as mmd_bandwidth. A sampler indistinguishable from the
    target scores near its floor. nn_dist is what the other two hardly see: samples spread off a thin reference
    (data near a curve) sit a spread's width from it, the reference's own rows a spacing's. With fewer than 2 finite
    model rows these seven statistics (the bandwidth included) are NaN. n_far counts
    the finite model rows outside the reference's bounding box widened on every side by its largest width:
    diverged trajectories, which weigh on sliced-W2 as their squared distance and hardly on MMD^2. Returns
    {"sw2", "sw2_floor", "mmd2", "mmd2_floor", "mmd_bandwidth", "nn_dist", "nn_dist_floor", "n_compared", "n_reference",
    "n_dropped_nonfinite", "n_far"}.
    """
    x, ref = _check_pair(samples, reference, require_finite=False)
    finite = torch.isfinite(x).all(dim=1)
    n_dropped = int((~finite).sum())
    x, ref = x[finite], ref[torch.isfinite(ref).all(dim=1)]
    r = ref.shape[0]
    if r < 4:
        raise ValueError(f"the reference needs at least 4 finite rows (two halves of at least 2), got {r}")
    gen = torch.Generator().manual_seed(seed)
    half = r // 2
    perm = torch.randperm(r, generator=gen)
    a, b = ref[perm[:half]], ref[perm[half : 2 * half]]
    m = min(x.shape[0], half)
    out = {"n_compared": m, "n_reference": r, "n_dropped_nonfinite": n_dropped, "n_far": _far_rows(x, ref)}
    if m < 2:
        nan = float("nan")
        stats = ("sw2", "sw2_floor", "mmd2", "mmd2_floor", "mmd_bandwidth", "nn_dist", "nn_dist_floor")
        return {**dict.fromkeys(stats, nan), **out}
    x, a, b = _subsample(x, m, gen), a[:m], b[:m]
    mmd2, mmd2_floor, h = _mmd_beside_floor(x, a, b, median_bandwidth(ref, MMD_MAX_POINTS, seed), seed)
    return {
        "sw2": sliced_w2(x, a, seed=seed),
        "sw2_floor": sliced_w2(b, a, seed=seed),
        "mmd2": mmd2,
        "mmd2_floor": mmd2_floor,
        "mmd_bandwidth": h,
        "nn_dist": nearest_distance(x, a),
        "nn_dist_floor": nearest_distance(b, a),
        **out,
    }
