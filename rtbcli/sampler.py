"""The diffusion sampler (docs/maths.md#the-sampler): network, transitions, trajectories, log-probabilities.

A sampler draws x_T in R^d from x_0 = 0 through T Gaussian steps

    p(x_{i+1} | x_i) = N(x_i + dt_i * f(x_i, t_i), sigma2 * dt_i * I),   dt_i = t_{i+1} - t_i,

on the time grid t_i = 1 - (1 - i / T)^p (`time_grid`; p = 1, the default, is the uniform grid
t_i = i / T, dt = 1 / T; p > 1 shrinks the steps toward the end, so the last step's noise
sigma2 * T^-p is smaller), so the log-probability of a whole trajectory is an exact sum of T
Gaussian log-densities. The reference backward process is the Brownian bridge pinned at 0,

    p_B(x_i | x_{i+1}) = N(t_i / t_{i+1} * x_{i+1}, sigma2 * dt_i * t_i / t_{i+1} * I),

used to draw training trajectories from data (pretraining) and for the EUBO.

Speed, by design:
- trajectories are sampled without gradient, in a loop whose every step is a handful of fused
  kernels (`sample`);
- trajectories are scored in one batched pass over all T*B transitions (`log_prob`), never step
  by step;
- the time features take only T distinct values, so they are computed once per time step (a
  (T, hidden) table) and broadcast, never once per sample.
A trajectory tensor has shape (T + 1, B, d): traj[i] holds x_i for the whole batch.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .gaussian import LOG_2PI, centred_log_prob, gaussian_log_prob  # noqa: F401  (re-exported)


def _linear_gelu_fused() -> bool:
    """Whether oneDNN's fused Linear + exact GELU (`torch.ops.mkldnn._linear_pointwise`) is here."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


LINEAR_GELU = _linear_gelu_fused()


def onednn(x: torch.Tensor) -> bool:
    """Whether `linear` takes oneDNN's kernel for x: on the CPU in float32 outside autocast (oneDNN has no
    float64, and autocast chooses its own kernels)."""
    return LINEAR_GELU and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def matmul_context(matmul_dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a step's network products run (`[pretrain]` / `[finetune] matmul_dtype`): under bf16 autocast for
    "bfloat16" (bf16 inputs, float32 accumulation), else as they are."""
    if matmul_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias (`F.linear`), through oneDNN's Linear where `onednn(x)`: for the tall products of a step
    (50,000 rows of 64 by 64 x 64) the faster kernel on the CPUs measured (AVX-512, and AVX2 emulated), part of the
    pretraining step's 20-29% gain (benchmarks/bench_peer.py, README "Speed")."""
    if onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class TimeEncoding(nn.Module):
    """PIS-style time features: sin/cos(t * k + phase), k = linspace(0.1, 100, n), then an MLP."""

    freqs: torch.Tensor  # a registered buffer

    def __init__(self, n_freq: int = 64, hidden: int = 64):
        super().__init__()
        self.register_buffer("freqs", torch.linspace(0.1, 100.0, n_freq))
        self.phase = nn.Parameter(torch.randn(n_freq))
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (T,) times -> (T, hidden) embeddings."""
        arg = t[:, None] * self.freqs + self.phase
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))


class DriftNet(nn.Module):
    """The drift f(x, t) (docs/maths.md#the-sampler) (21,122 parameters at d = 2, hidden 64).

    f(x, t) = Out(GELU(Lin(GELU(Lin(GELU(state(x) + time(t))))))), with `Out` zero-initialised
    so that a fresh network is the pure Brownian motion f = 0.
    """

    def __init__(self, dim: int, hidden: int = 64, n_freq: int = 64, n_layers: int = 2):
        super().__init__()
        self.time = TimeEncoding(n_freq, hidden)
        self.state = nn.Linear(dim, hidden)
        layers: list[nn.Module] = [nn.GELU()]
        for _ in range(n_layers):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        out = nn.Linear(hidden, dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (..., d) states; temb: time embeddings broadcastable to (..., hidden)."""
        if not torch.is_grad_enabled() and x.dim() == 3 and temb.dim() == 3 and temb.shape[1] == 1:
            return self._score(x, temb)
        # x @ W.T rather than F.linear: autograd then forms the weight gradient as x.T @ grad
        # (d x N times N x hidden), which is ~9x faster on CPU than grad.T @ x for d = 2.
        return self.body(x @ self.state.weight.t() + (temb + self.state.bias))

    def _score(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """`forward` without gradient over (T, n, d) states and a (T, 1, hidden) time table (a
        frozen prior scoring trajectories): the same function in fewer passes over the T*n rows.
        The state layer and the time table in one batched product (a GEMM of inner dimension d
        and a broadcast add are two slow passes), and on the CPU in float32 each Linear that a
        GELU follows as one oneDNN call with the GELU fused (no separate GELU pass)."""
        T, n, d = x.shape
        w = self.state.weight
        h = torch.baddbmm(temb + self.state.bias, x, w.t().expand(T, d, w.shape[0])).reshape(T * n, -1)
        fuse = onednn(h)
        mods, i = list(self.body), 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if fuse and type(m) is nn.Linear and type(nxt) is nn.GELU and nxt.approximate == "none":
                h = torch.ops.mkldnn._linear_pointwise(h, m.weight, m.bias, "gelu", [], "none")
                i += 2
            else:
                h = m(h)
                i += 1
        return h.reshape(T, n, -1)


def time_grid(steps: int, power: float = 1.0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The T + 1 times t_i = 1 - (1 - i / T)^power, from t_0 = 0 to t_T = 1 (power 1: i / T exactly)."""
    u = torch.arange(steps + 1, dtype=torch.float64, device=device) / steps
    t = u if power == 1.0 else 1.0 - (1.0 - u) ** power
    return t.to(dtype)


class TimeGrid:
    """The time grid of a sampler with `steps` (T), `sigma2`, `time_power` and an `anchor` tensor (its
    dtype and device), and the reference backward process on it: the Brownian bridge pinned at 0.

    On the uniform grid (`time_power` 1) `dt` and `step_var` are floats; on another they are
    tensors of one value per step, shaped (T, 1, 1) and (T, 1) to broadcast over (T, B, d) states
    and (T, B) log-probabilities."""

    steps: int
    sigma2: float
    time_power = 1.0  # the grid t_i = 1 - (1 - i / T)^p (`time_grid`); subclasses that keep the uniform grid inherit 1

    @property
    def uniform(self) -> bool:
        """Whether the time grid is the uniform t_i = i / T."""
        return self.time_power == 1.0

    def times(self) -> torch.Tensor:
        """The grid's T + 1 times t_0 = 0, ..., t_T = 1 (`time_grid`), in the anchor's dtype and device.

        Step lengths and 1 - t_i are not to be taken from these rounded values: near t = 1 a steep grid's last
        steps are below float32's resolution (T = 100, time_power 4: t_99 = 1 - 1e-8 rounds to 1). `grid64`
        keeps them; `dt` and the bridge take their differences there."""
        w = self.anchor  # type: ignore[attr-defined]  # the subclass's: a parameter, or a buffer
        return time_grid(self.steps, self.time_power, w.dtype, w.device)

    def grid64(self) -> torch.Tensor:
        """The T + 1 times in float64 on the anchor's device: the grid to take differences of."""
        w = self.anchor  # type: ignore[attr-defined]
        return time_grid(self.steps, self.time_power, torch.float64, w.device)

    def step_times(self) -> torch.Tensor:
        """The T step times t_0, ..., t_{T-1} at which the drift is evaluated (`times()` without t_T = 1)."""
        if self.uniform:
            w = self.anchor  # type: ignore[attr-defined]
            return torch.arange(self.steps, dtype=w.dtype, device=w.device) / self.steps
        return self.times()[:-1]

    def host_dts(self) -> list[float]:
        """The T step lengths dt_i as Python floats (float64 on the host: a sampling loop's scalars, no device copy)."""
        if self.uniform:
            return [1.0 / self.steps] * self.steps
        return time_grid(self.steps, self.time_power).diff().tolist()

    @property
    def dt(self) -> float | torch.Tensor:
        """dt_i = t_{i+1} - t_i: the float 1 / T on the uniform grid, else a (T, 1, 1) tensor."""
        if self.uniform:
            return 1.0 / self.steps
        return self.grid64().diff().to(self.anchor.dtype)[:, None, None]  # type: ignore[attr-defined]

    @property
    def step_var(self) -> float | torch.Tensor:
        """Variance of one forward step's noise, sigma2 * dt_i: a float on the uniform grid, else a (T, 1) tensor."""
        dt = self.dt
        return self.sigma2 * dt if isinstance(dt, float) else self.sigma2 * dt[..., 0]

    def noise_std(self, extra_var: float = 0.0) -> float | torch.Tensor:
        """sqrt(sigma2 dt_i + extra_var), the std of each step's noise: a float on the uniform grid, else (T, 1, 1)."""
        var = self.step_var
        return math.sqrt(var + extra_var) if isinstance(var, float) else (var + extra_var).sqrt()[:, :, None]

    def backward_sample(self, x_end: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Trajectories (T + 1, B, d) of the reference backward process ending at x_end: the pinned bridge here."""
        return bridge_sample(x_end, self.steps, self.sigma2, generator, None if self.uniform else self.grid64())

    def backward_log_prob(self, traj: torch.Tensor) -> torch.Tensor:
        """log p_B(tau | x_T) of the reference backward process: the pinned bridge's (`bridge_log_prob`) here."""
        return bridge_log_prob(traj, self.sigma2, None if self.uniform else self.grid64())


class DiffusionSampler(TimeGrid, nn.Module):
    """A drift network with its fixed Gaussian transition kernel on its time grid (`TimeGrid`;
    docs/maths.md#the-sampler)."""

    def __init__(
        self,
        dim: int,
        steps: int = 100,
        sigma2: float = 5.0,
        hidden: int = 64,
        time_features: int = 64,
        layers: int = 2,
        time_power: float = 1.0,
    ):
        super().__init__()
        self.dim, self.steps, self.sigma2, self.time_power = dim, steps, float(sigma2), float(time_power)
        self.net = DriftNet(dim, hidden, time_features, layers)

    @classmethod
    def from_spec(cls, dim: int, spec) -> DiffusionSampler:
        """Build from a `config.SamplerSpec`."""
        return cls(dim, spec.steps, spec.sigma2, spec.hidden, spec.time_features, spec.layers, spec.time_power)

    @property
    def anchor(self) -> torch.Tensor:
        """A parameter of the network: its dtype and device are the sampler's."""
        return self.net.state.weight

    def drift(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """f(x, t_i) for states x (N, d) at step indices i (N,) (a gather of the time table)."""
        return self.net(x, self.time_table()[i])

    def time_table(self) -> torch.Tensor:
        """(T, hidden) time embeddings, one row per step time t_i (in the network's dtype)."""
        return self.net.time(self.step_times())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, extra_var: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n trajectories, (T + 1, n, d), without gradient.

        Each step is x_{i+1} = x_i + dt * f(x_i, t_i) + sqrt(sigma2 * dt + extra_var) * eps, so a
        positive `extra_var` (s_e^2) gives the exploratory behaviour policy: same mean, inflated
        variance.
        """
        w = self.net.state.weight
        traj = torch.empty(self.steps + 1, n, self.dim, dtype=w.dtype, device=w.device)
        return self.run(traj, extra_var, generator)

    @torch.no_grad()
    def run(
        self,
        traj: torch.Tensor,
        extra_var: float = 0.0,
        generator: torch.Generator | None = None,
        pre: torch.Tensor | None = None,
        post: torch.Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """The sampling loop, into `traj` (T + 1, n, d); optionally keeping every activation.

        Written in fused kernels: dt is folded into the output layer (per step on a non-uniform grid), the time table (with the
        state bias) is computed once, and x_{i+1} is written in place over its pre-scaled noise.
        `pre` and `post`, (L, T, n, hidden), receive the pre-activations and GELU outputs of the
        L hidden layers at every step (see `rtbcli.rollout`). With `shard` = (rank, world) the
        noise is drawn for the global batch of world * n trajectories and this rank keeps
        trajectories [rank * n, (rank + 1) * n): the same trajectories a single process draws.
        """
        w = self.net.state.weight
        layers = [m for m in self.net.body if isinstance(m, nn.Linear)]
        weights = [(self.time_table() + self.net.state.bias, w.t())] + [(m.bias, m.weight.t()) for m in layers[:-1]]
        if self.uniform:
            outs = None
            w_out, b_out = self.dt * layers[-1].weight.t(), self.dt * layers[-1].bias
        else:
            outs = [(dt * layers[-1].weight.t(), dt * layers[-1].bias) for dt in self.host_dts()]
        traj[0].zero_()
        rank, world = shard
        if world == 1:
            torch.randn(traj[1:].shape, generator=generator, dtype=w.dtype, device=w.device, out=traj[1:])
        else:
            n = traj.shape[1]
            noise = torch.randn(self.steps, n * world, self.dim, generator=generator, dtype=w.dtype, device=w.device)
            traj[1:].copy_(noise[:, rank * n : (rank + 1) * n])
        traj[1:].mul_(self.noise_std(extra_var))
        # every step's views made up front, each by one unbind: indexing in the loop costs a Python call per view
        states, first = traj.unbind(0), weights[0][0].unbind(0)
        keep = pre is not None and post is not None
        pre_at = [layer.unbind(0) for layer in pre.unbind(0)] if pre is not None else []  # pre_at[k][i]: a_k at step i
        post_at = [layer.unbind(0) for layer in post.unbind(0)] if post is not None else []
        for i in range(self.steps):
            x = h = states[i]
            for k, (bias, weight) in enumerate(weights):
                bias = first[i] if k == 0 else bias
                if keep:
                    a = torch.addmm(bias, h, weight, out=pre_at[k][i])
                    h = torch.ops.aten.gelu.out(a, out=post_at[k][i])
                else:
                    h = F.gelu(torch.addmm(bias, h, weight))
            if outs is not None:
                w_out, b_out = outs[i]
            states[i + 1].add_(x).add_(b_out).addmm_(h, w_out)
        return traj

    # ------------------------------------------------------------------ scoring
    def means(self, traj: torch.Tensor) -> torch.Tensor:
        """Means x_i + dt_i * f(x_i, t_i) of all T*B transitions in one batched pass: (T, B, d)."""
        x = traj[:-1]
        return x + self.dt * self.net(x, self.time_table()[:, None, :])

    def step_log_probs(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        """log N(x_{i+1}; mean_i, (sigma2 * dt_i + extra_var) I) for every transition: shape (T, B)."""
        return gaussian_log_prob(traj[1:], self.means(traj), self.step_var + extra_var)

    def log_prob(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        """Trajectory log-probability, the sum of `step_log_probs` over the T steps: shape (B,)."""
        return self.step_log_probs(traj, extra_var).sum(0)


# ---------------------------------------------------------------------- the bridge
def bridge_sample(
    x_end: torch.Tensor, steps: int, sigma2: float, generator: torch.Generator | None = None, times: torch.Tensor | None = None
) -> torch.Tensor:
    """Trajectories (T + 1, B, d) from the Brownian bridge pinned at x_0 = 0 and x_T = x_end.

    Drawn in one vectorised pass: x_i = t_i * x_end + W_i - t_i * W_T with W a Brownian motion
    of variance sigma2 * t. This is exactly the backward chain p_B(x_i | x_{i+1}) =
    N(t_i/t_{i+1} x_{i+1}, sigma2 dt_i t_i/t_{i+1} I) run from x_T = x_end down to x_0 = 0;
    `times` (T + 1,) is the grid (`time_grid`), none: the uniform t_i = i / T.
    """
    n, d = x_end.shape
    inc = torch.randn(steps, n, d, generator=generator, dtype=x_end.dtype, device=x_end.device)
    if times is None:
        w = torch.cumsum(inc.mul_(math.sqrt(sigma2 * (1.0 / steps))), dim=0)
        t = torch.arange(1, steps + 1, dtype=x_end.dtype, device=x_end.device)[:, None, None] / steps
    else:
        t = times.to(device=x_end.device, dtype=torch.float64)  # step lengths from the float64 grid (`TimeGrid.times`)
        w = torch.cumsum(inc.mul_((sigma2 * t.diff()).sqrt().to(x_end.dtype)[:, None, None]), dim=0)
        t = t[1:, None, None].to(x_end.dtype)
    traj = torch.empty(steps + 1, n, d, dtype=x_end.dtype, device=x_end.device)
    traj[0].zero_()
    traj[1:] = t * (x_end - w[-1]) + w
    traj[-1] = x_end  # exact endpoint, free of rounding
    return traj


def bridge_log_prob(traj: torch.Tensor, sigma2: float, times: torch.Tensor | None = None) -> torch.Tensor:
    """Sum_{i=1}^{T-1} log p_B(x_i | x_{i+1}): shape (B,); `times` the grid as in `bridge_sample`.

    The step to x_0 is a point mass at 0 and is left out (docs/maths.md#log-z-and-its-bounds).
    """
    steps = traj.shape[0] - 1
    if times is None:
        i = torch.arange(1, steps, dtype=traj.dtype, device=traj.device)[:, None, None]
        ratio = i / (i + 1)
        var = (sigma2 * (1.0 / steps)) * ratio  # (T-1, 1, 1)
    else:
        t = times.to(device=traj.device, dtype=torch.float64)  # ratios and step lengths in float64 (`TimeGrid.times`)
        ratio = (t[1:-1] / t[2:])[:, None, None]
        var = (sigma2 * t.diff()[1:, None, None] * ratio).to(traj.dtype)
        ratio = ratio.to(traj.dtype)
    mean = ratio * traj[2:]
    return gaussian_log_prob(traj[1:-1], mean, var[..., 0]).sum(0)
