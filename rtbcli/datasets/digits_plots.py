"""Figures of digits images: panels of 8x8 greyscale pictures, in the sampler's scaled space.

>>> plot_digit_grids("digits.png", [("real", digits_data("heldout", 3)), ("RTB", samples)])
"""

from __future__ import annotations

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
from .digits import PIXEL_MAX, as_images, to_pixels

DPI = 150


def _mosaic(x: torch.Tensor, n: int) -> np.ma.MaskedArray:
    """The first `n` images as pixels clipped to 0..16, tiled in a square grid with 1-pixel gaps (masked)."""
    x = as_images(x, "panel images")[:n]
    side = max(1, math.ceil(math.sqrt(n)))
    cell = 9  # 8 pixels and a gap
    out = np.full((side * cell - 1, side * cell - 1), np.nan)
    pix = to_pixels(x).clamp(0.0, PIXEL_MAX).numpy()  # NaN stays NaN: shown as a gap
    for i, img in enumerate(pix):
        r, c = divmod(i, side)
        out[r * cell : r * cell + 8, c * cell : c * cell + 8] = img.reshape(8, 8)
    return np.ma.masked_invalid(out)


def plot_digit_grids(path: str | Path, panels: list[tuple[str, torch.Tensor]], title: str | None = None, n: int = 64) -> None:
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
