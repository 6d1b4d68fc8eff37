"""A 2-D density with no data, for energy mode:

    rtbcli finetune --prior brownian --target examples/energy/target.py:log_pi --dim 2 --sigma2 5

log pi(x) = -(|x| - 4)^2 / (2 * 0.25): a ring of radius 4 and width 0.5 (unnormalised). A target
takes x of shape (B, d) and returns log pi of shape (B,), differentiable in x (local search and the
Langevin parametrisation use its gradient).
"""

import torch


def log_pi(x: torch.Tensor) -> torch.Tensor:
    return -((x.norm(dim=-1) - 4.0) ** 2) / (2 * 0.25)
