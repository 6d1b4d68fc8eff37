"""Reward of the 10-D example: keep components 0, 2 and 5 of the data mixture, weighted 1 : 2 : 3.

    log r(x) = log p_keep(x) - log p_data(x)

so that at beta = 1 the target p_data * r is exactly p_keep (see make_data.py).
"""

import math

import numpy as np
import torch

DIM, STD = 10, 0.5
MEANS = np.random.default_rng(0).choice([-3.0, 3.0], size=(8, DIM))  # fixed corners of [-3, 3]^10
KEEP, WEIGHTS = [0, 2, 5], [1.0, 2.0, 3.0]


def _log_mixture(x, means, weights):
    d2 = torch.cdist(x, means).pow(2)
    log_w = torch.log(weights / weights.sum())
    return torch.logsumexp(log_w - 0.5 * d2 / STD**2, dim=1) - 0.5 * DIM * math.log(2 * math.pi * STD**2)


def keep_modes(x):
    x = x.double()
    means = torch.as_tensor(MEANS, dtype=torch.float64, device=x.device)
    keep = _log_mixture(x, means[KEEP], torch.tensor(WEIGHTS, dtype=torch.float64, device=x.device))
    data = _log_mixture(x, means, torch.ones(len(MEANS), dtype=torch.float64, device=x.device))
    return keep - data
