"""The "digits" benchmark: scikit-learn's 8x8 handwritten digits, in the sampler's scaled space.

A prior is pretrained on the train split; fine-tuning targets p(x) p(c | x)^beta with the shipped
classifier (`rtbcli.rewards.digits`). At beta = 1 with a calibrated classifier the target is
p(x | c), so the held-out real images of class c are reference samples of it.

Images are 64 pixels with values 0..16; the sampler sees x = pixels * SCALE + SHIFT, in [-1, 1].
The split is fixed (stratified, drawn with torch's generator, not scikit-learn's), and the
classifier was trained on its train part only. scikit-learn is an optional dependency, needed only
to load the images (`pip install "rtbcli[digits]"`); the reward itself does not need it.

This module holds the images, their split and the constants; the metrics on samples are in
`rtbcli.datasets.digits_metrics`, the image-grid figures in `rtbcli.datasets.digits_plots`.

>>> x = digits_data("heldout", digit=3)      # (n, 64) float32 in [-1, 1]
"""

from __future__ import annotations

import functools
import numbers

import numpy as np
import torch

from ..errors import InputError

SCALE = 0.125  # x = pixels * SCALE + SHIFT: pixels 0..16 -> x in [-1, 1]
SHIFT = -1.0
HELDOUT_FRACTION = 1 / 3  # of each class, held out from the prior's and the classifier's training
SPLIT_SEED = 0
N_PIXELS = 64
N_CLASSES = 10
PIXEL_MAX = 16.0
SPLITS = ("train", "heldout", "all")
SKLEARN_MISSING = 'the digits benchmark needs scikit-learn: pip install "rtbcli[digits]"'


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


def digits_data(split: str = "train", digit: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images of `split` ("train", "heldout" or "all"), optionally of one class, as (n, 64) in the scaled space (float32 unless `dtype`)."""
    if split not in SPLITS:
        raise InputError(f"unknown digits split '{split}': use train, heldout or all")
    pixels, labels = _load()
    if split == "all":
        idx = torch.arange(len(labels))
    else:
        idx = _split()[0 if split == "train" else 1]
    if digit is not None:
        idx = idx[labels[idx] == check_digit(digit)]
    return to_scaled(pixels[idx]).to(dtype)


def digits_labels(split: str = "train") -> torch.Tensor:
    """Labels (n,) int64 of `split`, in the order of `digits_data(split)`."""
    if split not in SPLITS:
        raise InputError(f"unknown digits split '{split}': use train, heldout or all")
    _, labels = _load()
    return labels.clone() if split == "all" else labels[_split()[0 if split == "train" else 1]]


def as_images(x: torch.Tensor, what: str = "samples") -> torch.Tensor:
    """`x` checked to be (n, 64) images in the scaled space, as float64 on the CPU; anything else is an InputError."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != N_PIXELS:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be a tensor of shape (n, {N_PIXELS}) (got {shape})")
    return x.detach().to("cpu", torch.float64)
