"""Tasks: the prior data distribution, the reward, and the target they define.

Everything here is exact and analytic: the prior data are an isotropic Gaussian mixture and
the reward is given through log r, so `Task.log_reward` and `Task.data_log_prob` can be
evaluated anywhere, and the target p_data(x) * r(x)^beta can be described exactly (see
`rtbcli.targets`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .config import MixtureSpec, Preset


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k w_k N(mu_k, variance * I) in R^d, with normalised weights."""

    means: torch.Tensor  # (K, d), float64
    weights: torch.Tensor  # (K,), sums to 1
    variance: float

    @classmethod
    def from_spec(cls, spec: MixtureSpec) -> GaussianMixture:
        means = torch.tensor(spec.means, dtype=torch.float64)
        w = torch.ones(len(spec.means), dtype=torch.float64) if spec.weights is None else torch.tensor(spec.weights, dtype=torch.float64)
        return cls(means, w / w.sum(), float(spec.variance))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, device) -> GaussianMixture:
        """The same mixture with its parameters on `device` (float64), so that evaluating it there
        copies nothing from the host."""
        return dataclasses.replace(self, means=self.means.to(device), weights=self.weights.to(device))

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density at x (..., d), computed in x's dtype on x's device."""
        mu = self.means.to(x)
        logw = self.weights.to(x).log()
        d2 = (x[..., None, :] - mu).pow(2).sum(-1)  # (..., K)
        comp = -0.5 * d2 / self.variance - 0.5 * self.dim * math.log(2 * math.pi * self.variance)
        return torch.logsumexp(comp + logw, dim=-1)

    def grid_density(self, centres: torch.Tensor) -> torch.Tensor:
        """Density on the 2-D grid centres x centres, (n, n), by separability: A diag(w) B^T.

        Each isotropic component factorises over the two coordinates, so the whole grid costs
        one (n, K) x (K, n) matrix product instead of n^2 K exponentials.
        """
        if self.dim != 2:
            raise ValueError("grid_density is for 2-D mixtures")
        c = centres.to(torch.float64)[:, None]
        norm = 1.0 / math.sqrt(2 * math.pi * self.variance)
        a = norm * torch.exp(-0.5 * (c - self.means[:, 0]).pow(2) / self.variance)  # (n, K)
        b = norm * torch.exp(-0.5 * (c - self.means[:, 1]).pow(2) / self.variance)
        return (a * self.weights) @ b.T

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """n exact samples, (n, d)."""
        g_device = generator.device if generator is not None else torch.device("cpu")
        k = torch.multinomial(self.weights.to(g_device), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=g_device)
        x = self.means.to(g_device)[k] + self.std * eps
        return x.to(device=device, dtype=dtype)


class Task:
    """Prior data p_data, reward log r, and beta, as a preset defines them."""

    def __init__(self, preset: Preset, beta: float | None = None):
        self.preset = preset
        self.beta = float(preset.beta if beta is None else beta)
        self.prior_data = GaussianMixture.from_spec(preset.prior_data)
        self.reward_mixture = GaussianMixture.from_spec(preset.reward.mixture)
        self.reward_type = preset.reward.type

    @property
    def dim(self) -> int:
        return self.prior_data.dim

    def to(self, device) -> Task:
        """Move the mixtures' parameters to `device` once, before a training loop."""
        self.prior_data, self.reward_mixture = self.prior_data.to(device), self.reward_mixture.to(device)
        return self

    def data_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_data(x), the prior data density."""
        return self.prior_data.log_prob(x)

    def log_reward(self, x: torch.Tensor) -> torch.Tensor:
        """log r(x); for `mixture_ratio` rewards, log q(x) - log p_data(x).

        Evaluated in float64 and returned in x's dtype: far from every mode both log-densities
        are large negative numbers whose difference float32 would lose.
        """
        x64 = x.double()
        lr = self.reward_mixture.log_prob(x64)
        if self.reward_type == "mixture_ratio":
            lr = lr - self.prior_data.log_prob(x64)
        return lr.to(x.dtype)

    def grid_log_target(self, centres: torch.Tensor, beta: float) -> torch.Tensor:
        """log p_data + beta log r on the 2-D grid centres x centres, flattened row-major.

        Computed from the separable grid densities; densities below 1e-300 (far outside every
        mode) are clamped there, which changes no mass that float64 can represent.
        """
        tiny = 1e-300
        log_p = self.prior_data.grid_density(centres).clamp_min(tiny).log()
        log_q = self.reward_mixture.grid_density(centres).clamp_min(tiny).log()
        log_r = log_q - log_p if self.reward_type == "mixture_ratio" else log_q
        return (log_p + beta * log_r).reshape(-1)
