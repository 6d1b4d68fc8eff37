"""Metrics of digits samples, (n, 64) tensors in the scaled space, each with a real-image reference.

>>> digits_report(samples, digit=3)   # class fraction, diversity, memorisation, beside real images'
"""

from __future__ import annotations

import math

import torch

from ..rewards.digits import classify
from .digits import as_images, check_digit, digits_data


def _subsample(x: torch.Tensor, max_points: int, seed: int) -> torch.Tensor:
    """At most `max_points` rows: a fixed random subset (in the original order) when there are more."""
    if len(x) <= max_points:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:max_points].sort().values]


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the direct difference form, not |a|^2 + |b|^2 - 2ab: identical rows give exactly 0
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def class_fraction(x: torch.Tensor, digit: int, weights: torch.Tensor | None = None) -> float:
    """Fraction of `x` the shipped classifier labels `digit` (argmax); non-finite rows count as misses.
    With `weights` (one per row), the weighted fraction sum_i w_i 1[c_i = digit] / sum_i w_i."""
    digit = check_digit(digit)
    x = as_images(x)
    if len(x) == 0:
        return math.nan
    finite = torch.isfinite(x).all(dim=1)
    hits = torch.zeros(len(x), dtype=torch.bool)
    if finite.any():
        hits[finite] = classify(x[finite].float()) == digit
    if weights is None:
        return hits.double().mean().item()
    return float((weights.double() * hits).sum() / weights.double().sum())


def mean_pairwise_distance(x: torch.Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """Mean Euclidean distance over distinct pairs of rows (a fixed subsample of `max_points` if more); NaN below 2 rows."""
    x = _subsample(as_images(x), max_points, seed)
    n = len(x)
    if n < 2:
        return math.nan
    d = _cdist(x, x)
    return (d.sum() / (n * (n - 1))).item()  # the diagonal is exactly 0; each pair is counted twice


def weighted_mean_pairwise_distance(x: torch.Tensor, weights: torch.Tensor, chunk: int = 2000) -> float:
    """sum_{i != j} w_i w_j |x_i - x_j| / sum_{i != j} w_i w_j over all rows: the mean distance between two independent
    draws of the distribution the weights make of the rows (uniform weights: `mean_pairwise_distance`). Rows of zero
    weight are skipped, so a long run of self-normalised importance weights costs only its rows that carry weight."""
    x, w = as_images(x).double(), weights.double()
    keep = (w > 0) & torch.isfinite(x).all(dim=1)
    x, w = x[keep], w[keep]
    if len(x) < 2:
        return math.nan
    total = sum((w[i : i + chunk] @ _cdist(x[i : i + chunk], x) @ w) for i in range(0, len(x), chunk))
    return float(total / (w.sum() ** 2 - (w**2).sum()))  # the diagonal is exactly 0


def nearest_train_distance(x: torch.Tensor, max_points: int = 2000) -> float:
    """Mean over rows of `x` (a fixed subsample of `max_points` if more) of the distance to the nearest train image.

    Memorised training images show as distances near 0. Needs scikit-learn (the train images).
    """
    x = _subsample(as_images(x), max_points, 0)
    if len(x) == 0:
        return math.nan
    train = digits_data("train", dtype=torch.float64)
    nearest = torch.cat([_cdist(chunk, train).min(dim=1).values for chunk in x.split(500)])
    return nearest.mean().item()


def digits_report(x: torch.Tensor, digit: int, log_weights: torch.Tensor | None = None) -> dict:
    """Metrics of samples `x` for the target class `digit`, each beside its value for real images.

    class_fraction / class_fraction_real: classified as `digit` (real: held-out images of the class);
    class_fraction_target (with `log_weights`, the importance weights of the rows toward the target):
    the target's own class fraction by self-normalised importance sampling: the ceiling that a
    sampler of the target p_prior r^beta reaches, which a prior's ambiguous images keep below 1;
    diversity / diversity_real: mean pairwise distance (real: all images of the class);
    diversity_target (with `log_weights`): the target's own diversity by the same weights, what a sampler
    of the target keeps;
    nearest_train_distance / nearest_train_distance_real: distance to the nearest train image
    (real: held-out images of the class, for scale).
    """
    digit = check_digit(digit)
    held = digits_data("heldout", digit)
    weights = None if log_weights is None else torch.softmax(log_weights.double().nan_to_num(-math.inf), 0)
    target = (
        {}
        if weights is None
        else {
            "class_fraction_target": class_fraction(x, digit, weights),
            "diversity_target": weighted_mean_pairwise_distance(x, weights),
        }
    )
    return {
        "class_fraction": class_fraction(x, digit),
        **target,
        "class_fraction_real": class_fraction(held, digit),
        "diversity": mean_pairwise_distance(x),
        "diversity_real": mean_pairwise_distance(digits_data("all", digit)),
        "nearest_train_distance": nearest_train_distance(x),
        "nearest_train_distance_real": nearest_train_distance(held),
    }
