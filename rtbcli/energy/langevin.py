"""The Langevin parametrisation (LP) of the drift (Zhang & Chen 2022; Sendera et al. 2024):

    f(x, t) = NN1(x, t) + NN2(t) * clip(grad log pi(x), -c, c),      c = 1e2,

NN1 the PIS-style `DriftNet` (last layer zero-initialised), NN2(t) a scalar (or per-dimension)
function of time with its own time features sin/cos(t k + phase), k = linspace(0.1, 100, n),
then `scale_layers` linear layers with GELU between. As in the paper's code
(LangevinScalingModelPIS with zero_init): NN2's last layer has weight 0 and bias 0.01, so a fresh
LP drift is 0.01 * clip(grad log pi); the gradient is detached, NaNs set to 0, and clipped
elementwise. (In fine-tuning mode grad log r plays the role of grad log pi.)

`LangevinDriftNet` is a `DriftNet` (same `time`, `state`, `body`, so `DiffusionSampler.time_table`
works) whose forward takes the times as well: forward(x, temb, t). `LangevinSampler` is a
`DiffusionSampler` with this drift; its sampling loop is plain (not the fused `run` of
`DiffusionSampler`, which assumes an MLP drift) and its scoring is one batched pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..gaussian import gaussian_log_prob
from ..sampler import DiffusionSampler, DriftNet

GRAD_CLIP = 1e2


def clipped_grad(log_density: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, clip: float = GRAD_CLIP) -> torch.Tensor:
    """clip(grad log pi(x), -clip, clip), detached, NaN -> 0; x (..., d) -> (..., d).

    log_density is called on x flattened to (N, d)."""
    shape = x.shape
    with torch.enable_grad():
        xg = x.detach().reshape(-1, shape[-1]).requires_grad_(True)
        (g,) = torch.autograd.grad(log_density(xg).sum(), xg)
    return torch.nan_to_num(g, nan=0.0).clamp_(-clip, clip).reshape(shape)


class LangevinScale(nn.Module):
    """NN2(t): sin/cos(t k + phase) (k = linspace(0.1, 100, n_freq)) -> Linear(2 n_freq, h)
    -> [GELU, Linear(h, h)] x (layers - 1) -> GELU -> Linear(h, out); last layer weight 0, bias `init`."""

    freqs: torch.Tensor  # a registered buffer (nn.Module's __getattr__ is typed Tensor | Module)

    def __init__(self, out: int = 1, hidden: int = 64, n_freq: int = 64, layers: int = 3, init: float = 0.01):
        super().__init__()
        self.register_buffer("freqs", torch.linspace(0.1, 100.0, n_freq))
        self.phase = nn.Parameter(torch.randn(n_freq))
        mods: list[nn.Module] = [nn.Linear(2 * n_freq, hidden)]
        for _ in range(layers - 1):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        last = nn.Linear(hidden, out)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, init)
        mods += [nn.GELU(), last]
        self.mlp = nn.Sequential(*mods)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (...) -> (..., out)."""
        arg = t[..., None] * self.freqs + self.phase
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))


class LangevinDriftNet(DriftNet):
    """f(x, t) = NN1(x, t) + NN2(t) * clip(grad log pi(x)); see the module docstring.

    `log_density` (x (N, d) -> (N,), differentiable) is not a parameter and is not saved.
    per_dimension: NN2 outputs d scales instead of one (the paper's default for Table 1 is one).
    """

    def __init__(
        self,
        dim: int,
        log_density: Callable[[torch.Tensor], torch.Tensor],
        hidden: int = 64,
        n_freq: int = 64,
        n_layers: int = 2,
        scale_layers: int = 3,
        clip: float = GRAD_CLIP,
        per_dimension: bool = False,
        scale_init: float = 0.01,
    ):
        super().__init__(dim, hidden, n_freq, n_layers)
        self.log_density, self.clip = log_density, float(clip)
        self.scale = LangevinScale(dim if per_dimension else 1, hidden, n_freq, scale_layers, scale_init)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (..., d); temb: NN1's time embeddings broadcastable to (..., hidden); t: times
        broadcastable to x.shape[:-1] (e.g. (T, 1) for x (T, B, d), or a 0-d tensor)."""
        return super().forward(x, temb) + self.scale(t) * clipped_grad(self.log_density, x, self.clip)


class LangevinSampler(DiffusionSampler):
    """A `DiffusionSampler` whose drift is a `LangevinDriftNet`: same transitions, same scoring API
    (`means`, `step_log_probs`, `log_prob`, `sample`)."""

    def __init__(
        self,
        dim: int,
        log_density: Callable[[torch.Tensor], torch.Tensor],
        steps: int = 100,
        sigma2: float = 1.0,
        hidden: int = 64,
        time_features: int = 64,
        layers: int = 2,
        scale_layers: int = 3,
        clip: float = GRAD_CLIP,
        per_dimension: bool = False,
        time_power: float = 1.0,
    ):
        super().__init__(dim, steps, sigma2, hidden, time_features, layers, time_power)
        self.net = LangevinDriftNet(dim, log_density, hidden, time_features, layers, scale_layers, clip, per_dimension)

    def means(self, traj: torch.Tensor) -> torch.Tensor:
        """x_i + dt_i f(x_i, t_i) for all T*B transitions in one batched pass: (T, B, d)."""
        x = traj[:-1]
        return x + self.dt * self.net(x, self.time_table()[:, None, :], self.step_times()[:, None])

    @torch.no_grad()
    def sample(self, n: int, extra_var: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n trajectories (T + 1, n, d): x_{i+1} = x_i + dt_i f(x_i, t_i) + sqrt(sigma2 dt_i + extra_var) eps_i."""
        w = self.net.state.weight
        traj = torch.zeros(self.steps + 1, n, self.dim, dtype=w.dtype, device=w.device)
        noise = torch.randn(self.steps, n, self.dim, generator=generator, dtype=w.dtype, device=w.device)
        noise.mul_(self.noise_std(extra_var))
        temb, ts = self.time_table(), self.step_times()
        dts = self.host_dts()
        for i in range(self.steps):
            x = traj[i]
            traj[i + 1] = x + dts[i] * self.net(x, temb[i], ts[i]) + noise[i]
        return traj

    def run(self, *args, **kwargs):  # the fused loop assumes an MLP drift
        raise NotImplementedError("LangevinSampler has no fused run(); use sample()")

    def step_log_probs(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        return gaussian_log_prob(traj[1:], self.means(traj), self.step_var + extra_var)
