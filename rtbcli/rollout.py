"""Rollouts for fine-tuning: sample without gradient, keep what the policy gradient needs.

The behaviour policy has the learned policy's mean (only its variance is inflated), so the
sampling loop already evaluates the policy network at every state it visits. A `Rollout` keeps
those activations, and then

- the policy's and the behaviour's per-step log-probabilities come free from the residuals
  x_{i+1} - mean_i = sqrt(sigma2 dt + s_e^2) eps (`step_log_probs`), exactly;
- the gradient of any loss L(lpf, ...) is one batched backward pass over all T*B transitions
  (`backward`), given dL/d(step lpf) from autograd on the loss alone.

This replaces the batched forward pass with gradient that would recompute the same activations.
The tests check both against autograd through `DiffusionSampler.step_log_probs` in float64.

`policy_grad` is the one interface: the fused backward (`backward`, which restates DriftNet's
layout and calls aten's GELU backward) for the network it was written for (`fused_layout`), and
autograd of one batched re-forward of all T*B transitions for any other drift network.
benchmarks/bench_backward.py times the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gaussian import centred_log_prob
from .sampler import DiffusionSampler, DriftNet


class Workspace:
    """Buffers reused from step to step: the activations of a rollout (~80 MB at the reference
    size) would otherwise be mapped afresh, and page-faulted in, at every step."""

    def __init__(self, sampler: DiffusionSampler, n: int):
        w = sampler.anchor
        self.n = n
        self.traj = torch.empty(sampler.steps + 1, n, sampler.dim, dtype=w.dtype, device=w.device)
        self.pre = self.post = None  # a network other than DriftNet: `rollout` keeps no activations
        if isinstance(sampler.net, DriftNet):
            hidden = sampler.net.state.out_features
            layers = sum(isinstance(m, nn.Linear) for m in sampler.net.body)  # hidden Linears + the output
            self.pre = torch.empty(layers, sampler.steps, n, hidden, dtype=w.dtype, device=w.device)
            self.post = torch.empty_like(self.pre)


@dataclass
class Rollout:
    """n trajectories of a sampler and the activations of its network along them."""

    sampler: DiffusionSampler
    traj: torch.Tensor  # (T + 1, n, d)
    residual: torch.Tensor  # (T, n, d): x_{i+1} - (x_i + dt f(x_i, t_i))
    pre: torch.Tensor | None  # (L, T, n, hidden): pre-activations of the GELU layers (None: a network `backward` does not know)
    post: torch.Tensor | None  # (L, T, n, hidden): their outputs


@torch.no_grad()
def rollout(
    sampler: DiffusionSampler,
    ws: Workspace,
    extra_var: float = 0.0,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Rollout:
    """Sample ws.n trajectories of the behaviour policy (variance sigma2 dt + extra_var), keeping activations.

    `shard` = (rank, world): this rank's share of a global batch of world * ws.n (see `DiffusionSampler.run`).
    A sampler that replaces the fused loop `run` (`rtbcli.energy.LangevinSampler`) samples with its
    own plain loop (`sample`; one process) and keeps no activations: `policy_grad` then takes
    autograd of a batched re-forward.
    """
    if type(sampler).run is not DiffusionSampler.run:
        traj = sampler.sample(ws.n, extra_var, generator)
        return Rollout(sampler, traj, traj[1:] - sampler.means(traj), None, None)
    assert ws.post is not None, "the fused loop keeps DriftNet's activations (`Workspace`)"
    traj = sampler.run(ws.traj, extra_var, generator, ws.pre, ws.post, shard)
    out = [m for m in sampler.net.body if isinstance(m, nn.Linear)][-1]
    drift = torch.nn.functional.linear(ws.post[-1], out.weight, out.bias)  # f at every (t_i, x_i)
    residual = traj[1:] - traj[:-1] - sampler.dt * drift
    return Rollout(sampler, traj, residual, ws.pre, ws.post)


def step_log_probs(residual: torch.Tensor, var: float | torch.Tensor) -> torch.Tensor:
    """log N(x_{i+1}; mean_i, var I) of every transition, (T, n), from the residuals x_{i+1} - mean_i."""
    return centred_log_prob(residual, var)


def _sum_over_trajectories(g: torch.Tensor, T: int, n: int) -> torch.Tensor:
    """sum over all T*n rows of g: per trajectory in g's dtype, then over trajectories in float64.

    Each trajectory's partial sum is the same whichever process holds it, and the float64 sum of
    the partials is exact to float32 precision, so the split of the batch over processes changes
    the result by one float32 rounding of each process's share at most.
    """
    return g.reshape(T, n, -1).sum(0).sum(0, dtype=torch.float64).to(g.dtype)


THIN = 4  # state dimensions d up to which `_rows_times` beats a GEMM call


def _rows_times(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g @ w for g (N, d), w (d, H): for small d as d fused multiply-adds of columns by rows, a
    single pass over the (N, H) result, where a GEMM call with inner dimension d is ~2x slower."""
    d = g.shape[1]
    if d > THIN:
        return g @ w
    out = torch.mul(g[:, :1], w[0])
    for j in range(1, d):
        out.addcmul_(g[:, j : j + 1], w[j])
    return out


@torch.no_grad()  # by hand: no autograd graph through the weights (only the time MLP's, below)
def backward(ro: Rollout, grad_step_lpf: torch.Tensor) -> None:
    """Accumulate into the sampler's .grad the gradient of sum_{i,b} g[i, b] * log p(x_{i+1} | x_i).

    With mean_i = x_i + dt f(x_i, t_i) and variance v = sigma2 dt (the un-inflated policy),
    d log p / d f_i = dt (x_{i+1} - mean_i) / v; backpropagated through the network by hand:

        f = Out(h_L),  h_l = GELU(a_l),  a_l = W_l h_{l-1} + b_l  (l >= 1),
        a_0 = W_s x + b_s + time(t)

    and through the time MLP (T rows) by autograd.

    The biases' gradients are sums over trajectories of per-trajectory sums, accumulated in
    float64 (`_sum_over_trajectories`): a bias of a unit that is nearly off gets a gradient of
    order Adam's eps from the cancellation of many terms, where a float32 sum's rounding, which
    depends on how the batch is split over processes, would change Adam's step by up to
    lr * rounding / (4 eps).
    """
    s = ro.sampler
    net = s.net
    linears = [m for m in net.body if isinstance(m, nn.Linear)]
    hidden, out = linears[:-1], linears[-1]
    assert ro.pre is not None and ro.post is not None, "the fused backward needs the rollout's activations"
    T, n, H = ro.pre.shape[1:]
    d = s.dim
    dt, var = s.dt, s.step_var  # floats, or one value per step ((T, 1, 1) and (T, 1)) on a non-uniform grid
    scale = dt / var if isinstance(dt, float) or isinstance(var, float) else (dt[..., 0] / var)[..., None]
    g_f = (grad_step_lpf[..., None] * ro.residual * scale).reshape(-1, d)  # dL/df, (T*n, d)
    post = ro.post.reshape(len(hidden) + 1, T * n, H)
    pre = ro.pre.reshape(len(hidden) + 1, T * n, H)
    grads: dict[torch.Tensor, torch.Tensor] = {out.weight: g_f.t() @ post[-1], out.bias: _sum_over_trajectories(g_f, T, n)}
    g_h = _rows_times(g_f, out.weight)
    for k in range(len(hidden), -1, -1):
        g_a = torch.ops.aten.gelu_backward(g_h, pre[k])
        if k == 0:
            break
        layer = hidden[k - 1]
        grads[layer.weight] = g_a.t() @ post[k - 1]
        grads[layer.bias] = _sum_over_trajectories(g_a, T, n)
        g_h = g_a @ layer.weight
    x = ro.traj[:-1].reshape(-1, d)
    grads[net.state.weight] = (x.t() @ g_a).t()  # x.T @ g: the fast layout for small d
    g_temb = g_a.reshape(T, n, H).sum(1)
    grads[net.state.bias] = _sum_over_trajectories(g_a, T, n)
    for p, g in grads.items():
        g = g.to(p.dtype)  # products under bf16 autocast (`matmul_dtype`) return bf16; a no-op otherwise
        p.grad = g if p.grad is None else p.grad + g
    with torch.enable_grad():
        table = s.time_table()
        table.backward(g_temb.to(table.dtype))  # the time MLP and the phases, T rows


def fused_layout(net: nn.Module) -> bool:
    """Whether `backward` knows `net`'s layout: a DriftNet (not a subclass, which may change
    forward) whose body is GELU, then [Linear, GELU] * L, then the output Linear."""
    if type(net) is not DriftNet:
        return False
    kinds = [type(m) for m in net.body]
    n = (len(kinds) - 2) // 2
    return (
        len(kinds) >= 2
        and kinds == [nn.GELU] + [nn.Linear, nn.GELU] * n + [nn.Linear]
        and all(m.approximate == "none" for m in net.body if isinstance(m, nn.GELU))
    )


def autograd_backward(ro: Rollout, grad_step_lpf: torch.Tensor) -> None:
    """`backward` by autograd: one batched re-forward of all T*n transitions with gradient, for
    any drift network."""
    s = ro.sampler
    with torch.enable_grad():
        step_lpf = centred_log_prob(ro.traj[1:] - s.means(ro.traj), s.step_var)
        step_lpf.backward(grad_step_lpf)


def policy_grad(ro: Rollout, grad_step_lpf: torch.Tensor, fused: bool | None = None) -> None:
    """Accumulate into the sampler's .grad the gradient of sum_{i,b} g[i, b] * log p(x_{i+1} | x_i)
    (the un-inflated policy): the fused `backward` where the layout allows it (`fused=None`), else
    autograd of a batched re-forward (`autograd_backward`); `fused` forces one."""
    if fused is None:
        fused = fused_layout(ro.sampler.net) and ro.pre is not None
    (backward if fused else autograd_backward)(ro, grad_step_lpf)
