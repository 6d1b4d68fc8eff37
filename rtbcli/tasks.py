"""Tasks: the prior data, the reward, and beta, as a preset defines them.

`Task(preset)` builds the data distribution (`rtbcli.data`) and the reward (`rtbcli.rewards`):

- mixture rewards are analytic: `mixture_ratio` is log q - log p_data (at beta = 1 the target
  p_data * r is exactly q), `mixture` is log q;
- Python rewards call the user's function. A task built from a checkpoint's stored config
  (`allow_import=False`) does not import it: the first call asks the user to name it again.

Energy mode (a preset with [target], no [prior_data]): the prior is the drift-free Brownian
sampler, whose terminal law N(0, sigma2 I) plays the data's part (`data`, exact), and the reward
is derived, log r = log pi - log N(0, sigma2 I) (`rtbcli.energy.EnergyReward`), so that at beta = 1
the tilted target p_data r is pi / Z. A user's target follows the rewards' rule: not imported from
a checkpoint's config (`allow_import=False`) until named again (`--target`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import MixtureRewardSpec, Preset, PythonRewardSpec
from .data import EmpiricalData, GaussianMixture, data_source  # noqa: F401  (GaussianMixture: part of the public API here)
from .errors import InputError
from .rewards import UnnamedReward, load_python_reward

if TYPE_CHECKING:
    from .energy.loading import LoadedTarget, UnnamedTarget


@dataclass
class MixtureReward:
    """log r(x) = log q(x) - log p_data(x) (`mixture_ratio`) or log q(x) (`mixture`)."""

    mixture: GaussianMixture
    data: GaussianMixture | None  # the divisor of a ratio reward

    @property
    def reference(self) -> str:
        return "mixture_ratio" if self.data is not None else "mixture"

    def to(self, device) -> MixtureReward:
        return MixtureReward(self.mixture.to(device), None if self.data is None else self.data.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluated in float64 and returned in x's dtype: far from every mode both log-densities
        are large negative numbers whose difference float32 would lose."""
        x64 = x.double()
        lr = self.mixture.log_prob(x64)
        if self.data is not None:
            lr = lr - self.data.log_prob(x64)
        return lr.to(x.dtype)


def build_reward(spec, data, allow_import: bool = True):
    if spec is None:
        return None
    if isinstance(spec, MixtureRewardSpec):
        return MixtureReward(GaussianMixture.from_spec(spec.mixture), data if spec.type == "mixture_ratio" else None)
    if isinstance(spec, PythonRewardSpec):
        return load_python_reward(spec, allow_import=allow_import)
    raise TypeError(f"unknown reward {spec!r}")


class Task:
    """Prior data p_data, reward log r, and beta, as a preset defines them."""

    def __init__(self, preset: Preset, beta: float | None = None, *, allow_import: bool = True):
        self.preset = preset
        self.beta = float(preset.beta if beta is None else beta)
        self.energy: LoadedTarget | UnnamedTarget | None = None  # energy mode: the target (`rtbcli.energy.loading`)
        if preset.target is not None:
            self.data, self.reward = self._energy(preset, allow_import)
        else:
            assert preset.prior_data is not None  # a preset has one of prior_data and target
            self.data = data_source(preset.prior_data)
            self.reward = build_reward(preset.reward, self.data, allow_import)
        self.device = torch.device("cpu")  # where the reward is called (`to`, or evaluate's --device)

    def _energy(self, preset: Preset, allow_import: bool):
        """Energy mode: the Brownian prior's terminal law N(0, sigma2 I) as the data, and the derived reward."""
        from .energy.loading import UnnamedTarget, load_target
        from .energy.prior import EnergyReward

        energy = self.energy = load_target(preset.target, allow_import=allow_import)
        d, s2 = energy.dim, preset.sampler.sigma2
        data = GaussianMixture(torch.zeros(1, d, dtype=torch.float64), torch.ones(1, dtype=torch.float64), s2)
        reward = energy if isinstance(energy, UnnamedTarget) else EnergyReward(energy.log_density, s2)
        return data, reward

    @property
    def reward_unnamed(self) -> bool:
        """The checkpoint's own Python reward or target, not imported until the user names it again."""
        from .energy.loading import UnnamedTarget

        return isinstance(self.reward, (UnnamedReward, UnnamedTarget))

    @property
    def dim(self) -> int:
        return self.data.dim

    # kept names: the data distribution and the reward's mixture
    @property
    def prior_data(self):
        return self.data

    @property
    def reward_mixture(self) -> GaussianMixture | None:
        return self.reward.mixture if isinstance(self.reward, MixtureReward) else None

    @property
    def reward_type(self) -> str | None:
        return None if self.preset.reward is None else self.preset.reward.type

    @property
    def has_reward(self) -> bool:
        return self.reward is not None

    @property
    def data_is_exact(self) -> bool:
        """The data density is known (a mixture or ManyWell), so exact targets can be built on it."""
        return self.data.log_prob is not None

    def to(self, device) -> Task:
        """Move the data and a mixture reward to `device` once, before a training loop."""
        self.data = self.data.to(device)
        if isinstance(self.reward, MixtureReward):
            self.reward = self.reward.to(device)
        self.device = torch.device(device)
        return self

    def data_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_data(x), the prior data density (only where it is known)."""
        if self.data.log_prob is None:
            raise InputError("the prior data come from a file: their density is not known")
        return self.data.log_prob(x)

    def log_reward(self, x: torch.Tensor) -> torch.Tensor:
        """log r(x), shape x.shape[:-1]."""
        if self.reward is None:
            raise InputError(
                f"preset '{self.preset.name}' names no reward: give --reward path/to/rewards.py:function, or a preset with a [reward] table"
            )
        return self.reward(x)

    def log_reward_rows(self, rows: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
        """log r on many points (data rows, a grid), called as a run calls it: in chunks, in float32
        on the task's device; returned as CPU float64."""
        return torch.cat([self.log_reward(p.to(self.device, torch.float32)).double().cpu() for p in rows.split(chunk)])

    def grid_log_target(self, centres: torch.Tensor, beta: float, chunk: int = 250_000) -> torch.Tensor:
        """log p_data + beta log r on the 2-D grid centres x centres, flattened row-major.

        Mixture data with a mixture reward use the separable grid densities (densities below
        1e-300, far outside every mode, are clamped there, which changes no mass that float64
        can represent); any other reward is evaluated on the grid points in chunks.
        """
        if isinstance(self.data, GaussianMixture) and (isinstance(self.reward, MixtureReward) or self.reward is None or beta == 0):
            tiny = 1e-300
            log_p = self.data.grid_density(centres).clamp_min(tiny).log()
            if self.reward is None or beta == 0:
                return log_p.reshape(-1)
            log_q = self.reward.mixture.grid_density(centres).clamp_min(tiny).log()
            log_r = log_q - log_p if self.reward.data is not None else log_q
            return (log_p + beta * log_r).reshape(-1)
        gx, gy = torch.meshgrid(centres.double(), centres.double(), indexing="ij")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        parts = [self.data_log_prob(p) + beta * self.log_reward_rows(p) for p in pts.split(chunk)]
        return torch.cat(parts)
