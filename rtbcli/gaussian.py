"""The isotropic Gaussian log-density, written once for the whole package.

    log N(x; mean, var I) = -|x - mean|^2 / (2 var) - d/2 (log 2 pi + log var)

summed over the last dimension (d). Every transition, bridge step, mixture component and
residual-based log-probability in rtbcli calls these two functions.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def centred_log_prob(r: torch.Tensor, var: float | torch.Tensor) -> torch.Tensor:
    """log N(r; 0, var I) of residuals r (..., d); var a float or a tensor broadcastable to r.shape[:-1]."""
    d = r.shape[-1]
    log_var = math.log(var) if isinstance(var, (int, float)) else torch.log(torch.as_tensor(var, dtype=r.dtype, device=r.device))
    return -0.5 * r.pow(2).sum(-1) / var - 0.5 * d * (LOG_2PI + log_var)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor | float, var: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var I), summed over the last dimension."""
    return centred_log_prob(x - mean, var)
