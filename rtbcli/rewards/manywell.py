"""The ManyWell-32 reward: tilt the wells of the first pairs.

    log r(x) = -c * sum_{j < pairs} x1_j,    x1_j = x[:, 2j]

With c = 1 and beta = 1 each tilted pair's left-well mass moves from 0.1557 to 0.8443, and the
target p_data r^beta stays a product of 1-D problems whose normaliser, well masses and samples
are exact (`rtbcli.datasets.manywell.tilted_target`).
"""

from __future__ import annotations

import torch

from ..datasets.manywell import tilt_log_reward


def tilt(x: torch.Tensor, pairs: int = 8, c: float = 1.0) -> torch.Tensor:
    """log r(x) = -c * sum_{j < pairs} x[:, 2j], shape (B,)."""
    return tilt_log_reward(x, pairs, c)
