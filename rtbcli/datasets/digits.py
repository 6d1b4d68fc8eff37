"""The "digits" benchmark: scikit-learn's 8x8 handwritten digits, in the sampler's scaled space.

A prior is pretrained on the train split; fine-tuning targets p(x) p(c | x)^beta with the shipped
classifier (`rtbcli.rewards.digits`). At beta = 1 with a calibrated classifier the target is
p(x | c), so the held-out real images of class c are reference samples of it.

Images are 64 pixels with values 0..16; the sampler sees x = pixels * SCALE + SHIFT, in [-1, 1].
The split is fixed (stratified, drawn with torch's generator, not scikit-learn's), and the
classifier was trained on its train part only. scikit-learn is an optional dependency, needed only
to load the images (`pip install "rtbcli[digits]"`); the reward itself does not need it.

>>> x = digits_data("heldout", digit=3)      # (n, 64) float32 in [-1, 1]
>>> digits_report(samples, digit=3)          # class fraction, diversity, memorisation, with real references
>>> plot_digit_grids("digits.png", [("real", x), ("RTB", samples)])
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..runtime import atomic_path, check_writable

SCALE = 0.125  # x = pixels * SCALE + SHIFT: pixels 0..16 -> x in [-1, 1]
SHIFT = -1.0
HELDOUT_FRACTION = 1 / 3  # of each class, held out from the prior's and the classifier's training
SPLIT_SEED = 0
N_PIXELS = 64
N_CLASSES = 10
PIXEL_MAX = 16.0
SPLITS = ("train", "heldout", "all")
SKLEARN_MISSING = 'the digits benchmark needs scikit-learn: pip install "rtbcli[digits]"'

DPI = 150


def check_digit(digit) -> int:
    """`digit` as an int from 0 to 9; anything else (a bool, a float with a fraction, a string) is an InputError.

    Integral floats (3.0, as a config file may give) are accepted.
    """
    ok = False
    if isinstance(digit, numbers.Integral) and not isinstance(digit, (bool, np.bool_)):
        ok = True
    elif isinstance(digit, float) and digit.is_integer():
        ok = True
    if ok and 0 <= int(digit) <= 9:
        return int(digit)
    raise InputError(f"digit must be an integer from 0 to 9 (got {digit!r})")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(SKLEARN_MISSING) from None
    bunch = load_digits()
    pixels = torch.from_numpy(np.asarray(bunch.data, dtype=np.float64).copy())
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64).copy())
    if pixels.shape != (1797, N_PIXELS) or labels.shape != (1797,):
        raise InputError(f"scikit-learn's digits have an unexpected shape {tuple(pixels.shape)}: this rtbcli expects (1797, 64)")
    return pixels, labels


def load_digits_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as float64 pixels (1797, 64) in 0..16, and their int64 labels (1797,).

    Loaded once (needs scikit-learn); each call returns fresh copies.
    """
    pixels, labels = _load()
    return pixels.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = _load()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, held = [], []
    for c in range(N_CLASSES):  # classes in order, one generator: the split is a fixed function of SPLIT_SEED
        idx = torch.nonzero(labels == c).flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * HELDOUT_FRACTION)
        held.append(perm[:k])
        train.append(perm[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, heldout_idx): sorted int64 indices into the 1,797 images.

    Stratified: of each class, round(n_c / 3) images are held out, chosen by a torch.Generator
    seeded SPLIT_SEED (never scikit-learn's random state), so the split is the same everywhere.
    """
    train, held = _split()
    return train.clone(), held.clone()


def to_scaled(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels 0..16 -> the sampler's space [-1, 1]."""
    return pixels * SCALE + SHIFT


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """The sampler's space -> pixels (not clipped)."""
    return (x - SHIFT) / SCALE


def digits_data(split: str = "train", digit: int | None = None) -> torch.Tensor:
    """Images of `split` ("train", "heldout" or "all"), optionally of one class, as (n, 64) float32 in the scaled space."""
    if split not in SPLITS:
        raise InputError(f"unknown digits split '{split}': use train, heldout or all")
    pixels, labels = _load()
    if split == "all":
        idx = torch.arange(len(labels))
    else:
        idx = _split()[0 if split == "train" else 1]
    if digit is not None:
        idx = idx[labels[idx] == check_digit(digit)]
    return to_scaled(pixels[idx]).to(torch.float32)


def digits_labels(split: str = "train") -> torch.Tensor:
    """Labels (n,) int64 of `split`, in the order of `digits_data(split)`."""
    if split not in SPLITS:
        raise InputError(f"unknown digits split '{split}': use train, heldout or all")
    _, labels = _load()
    return labels.clone() if split == "all" else labels[_split()[0 if split == "train" else 1]]


# --- metrics, on (n, 64) tensors in the scaled space ---------------------------------------------


def _as_images(x: torch.Tensor, what: str = "samples") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != N_PIXELS:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be a tensor of shape (n, {N_PIXELS}) (got {shape})")
    return x.detach().to("cpu", torch.float64)


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
    from ..rewards.digits import classify

    digit = check_digit(digit)
    x = _as_images(x)
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
    x = _subsample(_as_images(x), max_points, seed)
    n = len(x)
    if n < 2:
        return math.nan
    d = _cdist(x, x)
    return (d.sum() / (n * (n - 1))).item()  # the diagonal is exactly 0; each pair is counted twice


def nearest_train_distance(x: torch.Tensor, max_points: int = 2000) -> float:
    """Mean over rows of `x` (a fixed subsample of `max_points` if more) of the distance to the nearest train image.

    Memorised training images show as distances near 0. Needs scikit-learn (the train images).
    """
    x = _subsample(_as_images(x), max_points, 0)
    if len(x) == 0:
        return math.nan
    train = to_scaled(_load()[0][_split()[0]])
    nearest = torch.cat([_cdist(chunk, train).min(dim=1).values for chunk in x.split(500)])
    return nearest.mean().item()


def digits_report(x: torch.Tensor, digit: int, log_weights: torch.Tensor | None = None) -> dict:
    """Metrics of samples `x` for the target class `digit`, each beside its value for real images.

    class_fraction / class_fraction_real: classified as `digit` (real: held-out images of the class);
    class_fraction_target (with `log_weights`, the importance weights of the rows toward the target):
    the target's own class fraction by self-normalised importance sampling: the ceiling that a
    sampler of the target p_prior r^beta reaches, which a prior's ambiguous images keep below 1;
    diversity / diversity_real: mean pairwise distance (real: all images of the class);
    nearest_train_distance / nearest_train_distance_real: distance to the nearest train image
    (real: held-out images of the class, for scale).
    """
    digit = check_digit(digit)
    held = digits_data("heldout", digit)
    target = {} if log_weights is None else {
        "class_fraction_target": class_fraction(x, digit, torch.softmax(log_weights.double().nan_to_num(-math.inf), 0))}
    return {
        "class_fraction": class_fraction(x, digit),
        **target,
        "class_fraction_real": class_fraction(held, digit),
        "diversity": mean_pairwise_distance(x),
        "diversity_real": mean_pairwise_distance(digits_data("all", digit)),
        "nearest_train_distance": nearest_train_distance(x),
        "nearest_train_distance_real": nearest_train_distance(held),
    }


# --- figures --------------------------------------------------------------------------------------


def _mosaic(x: torch.Tensor, n: int) -> np.ma.MaskedArray:
    """The first `n` images as pixels clipped to 0..16, tiled in a square grid with 1-pixel gaps (masked)."""
    x = _as_images(x, "panel images")[:n]
    side = max(1, math.ceil(math.sqrt(n)))
    cell = 9  # 8 pixels and a gap
    out = np.full((side * cell - 1, side * cell - 1), np.nan)
    pix = to_pixels(x).clamp(0.0, PIXEL_MAX).numpy()  # NaN stays NaN: shown as a gap
    for i, img in enumerate(pix):
        r, c = divmod(i, side)
        out[r * cell:r * cell + 8, c * cell:c * cell + 8] = img.reshape(8, 8)
    return np.ma.masked_invalid(out)


def plot_digit_grids(path: str | Path, panels: list[tuple[str, torch.Tensor]], title: str | None = None,
                     n: int = 64) -> None:
    """One panel per (title, images (m, 64) in the scaled space): the first `n` images as 8x8 greyscale pictures.

    Ink is dark on white, pixels clipped to 0..16; missing or non-finite images are left blank.
    Written atomically as PNG (4 panels per row at most).
    """
    if not panels:
        raise InputError("plot_digit_grids needs at least one (title, images) panel")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError(f"plot_digit_grids: n must be a positive integer (got {n!r})")
    mosaics = [_mosaic(images, int(n)) for _, images in panels]
    path = check_writable(Path(path), "plot")
    nrows = math.ceil(len(panels) / 4)
    ncols = math.ceil(len(panels) / nrows)
    fig = Figure(figsize=(3.0 * ncols, 3.15 * nrows + (0.35 if title else 0.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#dfe6ee")
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(panels):
            continue
        ax.imshow(mosaics[i], cmap=cmap, vmin=0.0, vmax=PIXEL_MAX, interpolation="nearest")
        ax.set_title(panels[i][0], fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
