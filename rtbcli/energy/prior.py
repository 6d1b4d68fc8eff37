"""The drift-free (Brownian) prior and the reward it derives from an energy target.

Energy mode is RTB with this prior (Sendera et al. 2024; docs/maths.md#energy-mode). The
Brownian prior is the sampler with drift f = 0: from x_0 = 0, T steps

    p(x_{i+1} | x_i) = N(x_i, sigma2 * dt_i * I),   dt_i = t_{i+1} - t_i

on the sampler's time grid (`rtbcli.sampler.time_grid`; uniform, dt = 1 / T, by default), so
x_T ~ N(0, sigma2 * sum_i dt_i * I) = N(0, sigma2 I) exactly on any grid, and a trajectory factorises as
p(tau) = N(x_T; 0, sigma2 I) * p_B(tau | x_T) with p_B the Brownian bridge pinned at 0
(`rtbcli.sampler.bridge_log_prob`). With the derived reward

    log r(x) = log pi(x) - log N(x; 0, sigma2 I)

and beta = 1, p_prior(x) r(x) = pi(x): the tilted target of RTB is the energy's density, its
normaliser is log Z = log integral pi, and RTB's loss is TB's with the bridge as backward process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError
from ..gaussian import centred_log_prob, gaussian_log_prob
from ..sampler import DiffusionSampler, TimeGrid


class BrownianPrior(TimeGrid, nn.Module):
    """The sampler with drift 0 and no network, with `DiffusionSampler`'s interface as a prior.

    Attributes as `DiffusionSampler`: `dim`, `steps` (T), `sigma2`, `time_power` and its grid
    (`TimeGrid`: `dt`, `step_var` = sigma2 dt_i, the bridge as backward process). On any grid the
    steps' variances sum to sigma2, so x_T ~ N(0, sigma2 I) exactly. It has no parameters and an
    empty `state_dict()`; `.to(device, dtype)` moves the (empty) buffer that fixes the dtype and
    device of `sample`.
    """

    anchor: torch.Tensor  # a registered buffer (nn.Module's __getattr__ is typed Tensor | Module)

    def __init__(self, dim: int, steps: int = 100, sigma2: float = 1.0, time_power: float = 1.0):
        super().__init__()
        if dim < 1 or steps < 1 or not sigma2 > 0 or not time_power >= 1:
            raise InputError(
                f"the Brownian prior needs dim >= 1, steps >= 1, sigma2 > 0 and time_power >= 1, got {dim}, {steps}, {sigma2}, {time_power}"
            )
        self.dim, self.steps, self.sigma2, self.time_power = int(dim), int(steps), float(sigma2), float(time_power)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # carries dtype and device only

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, extra_var: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n trajectories (T + 1, n, d): x_0 = 0, x_{i+1} = x_i + sqrt(sigma2 dt_i + extra_var) eps_i.

        Draws the noise as `DiffusionSampler.sample` does (one (T, n, d) normal tensor), so that a
        fresh zero-drift `DiffusionSampler` with the same generator state draws the same paths.
        """
        a = self.anchor
        traj = torch.zeros(self.steps + 1, n, self.dim, dtype=a.dtype, device=a.device)
        noise = torch.randn(self.steps, n, self.dim, generator=generator, dtype=a.dtype, device=a.device)
        torch.cumsum(noise.mul_(self.noise_std(extra_var)), dim=0, out=traj[1:])
        return traj

    # ------------------------------------------------------------------ scoring
    def means(self, traj: torch.Tensor) -> torch.Tensor:
        """Means of all T transitions, (T, B, d): x_i (the drift is 0)."""
        return traj[:-1]

    def step_log_probs(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        """log N(x_{i+1}; x_i, (sigma2 dt_i + extra_var) I) for every transition: shape (T, B)."""
        return gaussian_log_prob(traj[1:], traj[:-1], self.step_var + extra_var)

    def log_prob(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        """Trajectory log-probability, the sum of `step_log_probs`: shape (B,)."""
        return self.step_log_probs(traj, extra_var).sum(0)

    def terminal_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """The exact marginal of x_T: log N(x; 0, sigma2 I), x (..., d) -> (...)."""
        return centred_log_prob(x, self.sigma2)

    # ------------------------------------------------------------------ a policy to start from
    def fresh_policy(self, hidden: int = 64, time_features: int = 64, layers: int = 2) -> DiffusionSampler:
        """A `DiffusionSampler` with this prior's dim, T, sigma2 and time grid whose drift is exactly 0 (the
        network's output layer is zero-initialised): the same law as the prior, to fine-tune from.
        On the prior's device and dtype."""
        a = self.anchor
        return DiffusionSampler(self.dim, self.steps, self.sigma2, hidden, time_features, layers, self.time_power).to(a.device, a.dtype)


class EnergyReward:
    """The reward derived from an energy target for the Brownian prior of variance sigma2:

        log r(x) = log pi(x) - log N(x; 0, sigma2 I),

    so that N(x; 0, sigma2 I) r(x) = pi(x), and RTB at beta = 1 targets pi / Z with Z = integral pi.
    `log_density` is any callable x (B, d) -> (B,) (an `EnergyTarget` works). Callable: x -> (B,),
    in x's dtype, differentiable when log pi is.
    """

    def __init__(self, log_density: Callable[[torch.Tensor], torch.Tensor], sigma2: float):
        if not sigma2 > 0:
            raise InputError(f"sigma2 must be > 0, got {sigma2}")
        self.log_density, self.sigma2 = log_density, float(sigma2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_density(x) - centred_log_prob(x, self.sigma2)


def energy_log_reward(log_density: Callable[[torch.Tensor], torch.Tensor], prior: BrownianPrior) -> EnergyReward:
    """The derived reward for `prior` (see `EnergyReward`): uses the prior's own sigma2."""
    return EnergyReward(log_density, prior.sigma2)
