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

The backward itself (`network_backward`) serves any loss of the drift at given states:
`rows_backward` runs the network over them keeping its activations (`forward_rows`) and takes the
gradient the same way; pretraining's estimators use it (`rtbcli.pretrain.pairs_backward`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .gaussian import centred_log_prob
from .sampler import DiffusionSampler, DriftNet, linear


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
    if g.shape[1] > THIN:
        return g @ w
    return _add_rows_times(torch.mul(g[:, :1], w[0]), g[:, 1:], w[1:])


def _add_rows_times(out: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out += g @ w in place (g (N, d), w (d, H)): column by row for small d (`_rows_times`), else one GEMM."""
    if g.shape[1] > THIN:
        return out.addmm_(g, w)
    for j in range(g.shape[1]):
        out.addcmul_(g[:, j : j + 1], w[j])
    return out


@torch.no_grad()
def forward_rows(net: DriftNet, x: torch.Tensor, a0: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The drift f at N states x (N, d), with the activations that `network_backward` needs.

    On entry a0 (N, H) holds each row's time embedding plus the state layer's bias; it is completed
    in place to a_0 = W_s x + b_s + time(t). Returns f (N, d) and the lists [a_0, ..., a_L] and
    [h_0, ..., h_L], h_l = GELU(a_l), of the GELU layers."""
    linears = [m for m in net.body if isinstance(m, nn.Linear)]
    pre = [_add_rows_times(a0, x, net.state.weight.t().contiguous())]
    post = [F.gelu(pre[0])]
    for layer in linears[:-1]:
        pre.append(linear(post[-1], layer.weight, layer.bias))
        post.append(F.gelu(pre[-1]))
    return linear(post[-1], linears[-1].weight, linears[-1].bias), pre, post


@torch.no_grad()  # by hand: no autograd graph through the weights
def network_backward(
    net: DriftNet,
    x: torch.Tensor,
    pre: torch.Tensor | list[torch.Tensor],
    post: torch.Tensor | list[torch.Tensor],
    g_f: torch.Tensor,
    rowsum: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Accumulate into .grad the gradient of sum_rows g_f . f(x) through every weight but the time MLP's.

    x (N, d) the states, pre and post (L + 1, N, H) their activations (`forward_rows`'s lists, or the
    sampling loop's), g_f (N, d) = dL/df. With

        f = Out(h_L),  h_l = GELU(a_l),  a_l = W_l h_{l-1} + b_l  (l >= 1),  a_0 = W_s x + b_s + time(t),

    each weight's gradient is one product over the N rows and each bias's a `rowsum` over them.
    Returns dL/da_0 (N, H), which is also dL/d time(t) of each row: the caller takes the time MLP's part.
    """
    linears = [m for m in net.body if isinstance(m, nn.Linear)]
    hidden, out = linears[:-1], linears[-1]
    grads: dict[torch.Tensor, torch.Tensor] = {out.weight: g_f.t() @ post[-1], out.bias: rowsum(g_f)}
    g_h = _rows_times(g_f, out.weight)
    for k in range(len(hidden), -1, -1):
        g_a = torch.ops.aten.gelu_backward(g_h, pre[k])
        if k == 0:
            break
        layer = hidden[k - 1]
        grads[layer.weight] = g_a.t() @ post[k - 1]
        grads[layer.bias] = rowsum(g_a)
        g_h = linear(g_a, layer.weight.t().contiguous())  # g_a @ W_k
    grads[net.state.weight] = (x.t() @ g_a).t().contiguous()  # x.T @ g: the fast layout for small d; a (d, H) copy
    grads[net.state.bias] = rowsum(g_a)
    for p, g in grads.items():
        g = g.to(p.dtype)  # products under bf16 autocast (`matmul_dtype`) return bf16; a no-op otherwise
        p.grad = g if p.grad is None else p.grad + g
    return g_a


def rows_backward(
    sampler: DiffusionSampler,
    x: torch.Tensor,
    i: torch.Tensor | None,
    loss_and_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """A loss of the drift at N states, with its gradient accumulated into the DriftNet's .grad by hand.

    The network runs once over the states x (N, d) at step indices i (N,) (None: T blocks of N / T
    rows, block t at step t, as trajectories (T, n, d) reshape), keeping its activations
    (`forward_rows`); `loss_and_grad(f)` gives the loss and dL/df (N, d) from the drift f (N, d)
    (it may overwrite f); dL/df goes back through the network in one pass (`network_backward`), and
    through the time MLP as the gradient of its T rows, each the sum over the states of its step.
    Autograd forms the same products, but the thin (d-wide) ones in slow layouts, the middle ones
    through MKL rather than oneDNN (`linear`), and with separate passes for the time table's
    gather and scatter. Returns the loss, detached.
    """
    net = sampler.net
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # float32 under bf16 products too
        table = sampler.time_table()  # (T, H), kept with its graph for the time MLP's gradient
    first = table.detach() + net.state.bias.detach()
    T, H = first.shape
    # (N, H) blocks, one per activation: under glibc's 32 MB mmap threshold they are reused, not faulted in again
    a0 = first[:, None, :].expand(T, x.shape[0] // T, H).reshape(-1, H) if i is None else first.index_select(0, i)
    with torch.no_grad():
        drift, pre, post = forward_rows(net, x, a0)
        loss, g_f = loss_and_grad(drift)
    g_a = network_backward(net, x, pre, post, g_f, lambda g: g.sum(0))
    table.backward(g_a.view(T, -1, H).sum(1) if i is None else torch.zeros_like(first).index_add_(0, i, g_a))
    return loss


@torch.no_grad()  # by hand: no autograd graph through the weights (only the time MLP's, below)
def backward(ro: Rollout, grad_step_lpf: torch.Tensor) -> None:
    """Accumulate into the sampler's .grad the gradient of sum_{i,b} g[i, b] * log p(x_{i+1} | x_i).

    With mean_i = x_i + dt f(x_i, t_i) and variance v = sigma2 dt (the un-inflated policy),
    d log p / d f_i = dt (x_{i+1} - mean_i) / v; backpropagated through the network by hand
    (`network_backward`) and through the time MLP (T rows) by autograd.

    The biases' gradients are sums over trajectories of per-trajectory sums, accumulated in
    float64 (`_sum_over_trajectories`): a bias of a unit that is nearly off gets a gradient of
    order Adam's eps from the cancellation of many terms, where a float32 sum's rounding, which
    depends on how the batch is split over processes, would change Adam's step by up to
    lr * rounding / (4 eps).
    """
    s = ro.sampler
    assert ro.pre is not None and ro.post is not None, "the fused backward needs the rollout's activations"
    L, T, n, H = ro.pre.shape
    d = s.dim
    dt, var = s.dt, s.step_var  # floats, or one value per step ((T, 1, 1) and (T, 1)) on a non-uniform grid
    scale = dt / var if isinstance(dt, float) or isinstance(var, float) else (dt[..., 0] / var)[..., None]
    g_f = (grad_step_lpf[..., None] * ro.residual * scale).reshape(-1, d)  # dL/df, (T*n, d)
    x = ro.traj[:-1].reshape(-1, d)
    g_a = network_backward(
        s.net, x, ro.pre.reshape(L, T * n, H), ro.post.reshape(L, T * n, H), g_f, lambda g: _sum_over_trajectories(g, T, n)
    )
    g_temb = g_a.reshape(T, n, H).sum(1)
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
