"""The digits reward: log p(c | x) from a small classifier shipped with the package.

Fine-tuning toward p_post(x) ∝ p_prior(x) p(c | x)^beta uses log r(x) = log p(c = digit | x).
The classifier (`rtbcli/data/digits-classifier.safetensors`, written by
`scripts/train_digits_classifier.py`) is an MLP on images in the sampler's scaled space
(x = pixels * 0.125 - 1), trained on the train split with Gaussian-noise augmentation and
calibrated by temperature scaling (folded into its last layer). Only the weights file is needed,
not scikit-learn.

>>> log_r = log_p_class(x, digit=3)   # (B,), <= 0, in x's dtype and on x's device
>>> classify(x)                       # (B,) argmax labels
"""

from __future__ import annotations

import functools
import importlib.resources
import json

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..datasets.digits import N_CLASSES, N_PIXELS, SCALE, SHIFT, check_digit
from ..errors import InputError, RunError

FORMAT = "rtbcli-digits-classifier"
FILE = "digits-classifier.safetensors"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], dict[str, str]]:
    """The classifier's layers ((weight, bias), ...) as float32 CPU tensors, and its metadata."""
    resource = importlib.resources.files("rtbcli") / "data" / FILE
    try:
        with importlib.resources.as_file(resource) as path, safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise RunError(f"the digits classifier ({FILE}) is missing from the installed rtbcli: reinstall it") from None
    if meta.get("format") != FORMAT:
        raise RunError(f"{FILE} in the installed rtbcli is not a digits classifier: reinstall rtbcli")
    if float(meta["scale"]) != SCALE or float(meta["shift"]) != SHIFT:
        raise RunError(
            f"{FILE} was trained for scale {meta['scale']}, shift {meta['shift']}, "
            f"but the digits benchmark uses {SCALE}, {SHIFT}: retrain it"
        )
    layers = []
    i = 1
    while f"fc{i}.weight" in tensors:
        layers.append((tensors[f"fc{i}.weight"].float(), tensors[f"fc{i}.bias"].float()))
        i += 1
    if not layers or layers[0][0].shape[1] != N_PIXELS or layers[-1][0].shape[0] != N_CLASSES:
        raise RunError(f"{FILE} has an unexpected architecture: reinstall rtbcli")
    return tuple(layers), meta


_PARAMS: dict[tuple[torch.device, torch.dtype], tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}


def _params(device: torch.device, dtype: torch.dtype):
    """The layers on `device` in `dtype`, converted once per (device, dtype)."""
    key = (device, dtype)
    if key not in _PARAMS:
        _PARAMS[key] = tuple((w.to(device, dtype), b.to(device, dtype)) for w, b in _load()[0])
    return _PARAMS[key]


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != N_PIXELS:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"digits images must be a tensor of shape (B, {N_PIXELS}) (got {shape})")
    if not x.is_floating_point():
        raise InputError(f"digits images must be a floating-point tensor (got {x.dtype})")


def class_log_probs(x: torch.Tensor) -> torch.Tensor:
    """log p(c | x) for all 10 classes: (B, 10) in x's dtype and on x's device (calibrated); differentiable in x, so
    that the Langevin parametrisation can use its gradient (classifier guidance)."""
    _check(x)
    h = x
    layers = _params(x.device, x.dtype)
    for i, (w, b) in enumerate(layers):
        h = F.linear(h, w, b)
        if i < len(layers) - 1:
            h = F.gelu(h)
    return torch.log_softmax(h, dim=-1)


def log_p_class(x: torch.Tensor, digit: int) -> torch.Tensor:
    """The reward log r(x) = log p(c = digit | x): (B,) in x's dtype and on x's device, differentiable in x.

    Non-finite rows give NaN.
    """
    digit = check_digit(digit)
    return class_log_probs(x)[:, digit]


def classify(x: torch.Tensor) -> torch.Tensor:
    """The classifier's labels (B,) int64: the most probable class of each row."""
    with torch.no_grad():
        return class_log_probs(x).argmax(dim=-1)


def classifier_metadata() -> dict:
    """The classifier file's metadata (provenance, calibration, accuracies).

    Values that are JSON written by `json.dumps` (numbers, booleans, objects) are decoded; the
    others (and any that would not read back identically, such as a version "1.10") stay strings.
    """
    out = {}
    for k, v in sorted(_load()[1].items()):
        try:
            decoded = json.loads(v)
        except json.JSONDecodeError:
            decoded = v
        out[k] = decoded if not isinstance(decoded, str) and json.dumps(decoded) == v else v
    return out
