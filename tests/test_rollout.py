"""The fine-tuning rollout: its log-probabilities and its hand-written backward pass against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtbcli.rollout import Workspace, backward, fused_layout, policy_grad, rollout, step_log_probs
from rtbcli.runtime import keep_freed_memory
from rtbcli.sampler import DiffusionSampler, DriftNet
from test_sampler import seeded


@pytest.fixture
def ro(float64):
    s = seeded(1, std=0.5, steps=7)
    return rollout(s, Workspace(s, 11), 0.3, torch.Generator().manual_seed(0))


def test_rollout_is_the_sampler_s_trajectory(ro):
    ref = ro.sampler.sample(11, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(ro.traj, ref)


def test_log_probs_from_residuals_match_the_batched_pass(ro):
    s = ro.sampler
    torch.testing.assert_close(step_log_probs(ro.residual, s.step_var), s.step_log_probs(ro.traj), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(step_log_probs(ro.residual, s.step_var + 0.3), s.step_log_probs(ro.traj, 0.3), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_backward_matches_autograd(float64, layers):
    s = seeded(2, std=0.5, steps=6, layers=layers)
    r = rollout(s, Workspace(s, 9), 0.2, torch.Generator().manual_seed(1))
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(2))
    s.zero_grad()
    (g * s.step_log_probs(r.traj)).sum().backward()
    expected = {n: p.grad.clone() for n, p in s.named_parameters()}
    s.zero_grad()
    backward(r, g)
    for n, p in s.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12, msg=n)
        assert not p.grad.requires_grad, n  # plain tensors: no autograd graph kept alive through the weights
    backward(r, g)  # accumulates, like autograd
    for n, p in s.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[n], rtol=1e-10, atol=1e-12, msg=n)


def grads_of(s, fn) -> dict[str, torch.Tensor]:
    s.zero_grad(set_to_none=True)
    fn()
    return {n: p.grad.clone() for n, p in s.named_parameters()}


@pytest.mark.parametrize("layers", [1, 2])
def test_policy_grad_s_fused_path_equals_its_autograd_path(float64, layers):
    """The one interface: fused for DriftNet, autograd of a batched re-forward otherwise; both the same gradient."""
    s = seeded(4, std=0.5, steps=6, layers=layers)
    r = rollout(s, Workspace(s, 9), 0.2, torch.Generator().manual_seed(1))
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(2))
    assert fused_layout(s.net)
    fused, auto = grads_of(s, lambda: policy_grad(r, g)), grads_of(s, lambda: policy_grad(r, g, fused=False))
    for n in fused:
        torch.testing.assert_close(fused[n], auto[n], rtol=1e-10, atol=1e-12, msg=n)
    assert max(float(v.abs().max()) for v in fused.values()) > 1e-3  # a gradient that can tell


class ScaledDrift(DriftNet):
    """A user's drift network: DriftNet's weights, another forward (the fused backward would be wrong for it)."""

    def forward(self, x, temb):
        return 2.0 * torch.tanh(super().forward(x, temb))


def test_policy_grad_takes_autograd_for_other_networks(float64):
    s = seeded(5, std=0.5, steps=5)
    user = DiffusionSampler(s.dim, s.steps, s.sigma2, hidden=s.net.state.out_features, time_features=s.net.time.freqs.numel())
    user.net.__class__ = ScaledDrift
    user.load_state_dict(s.state_dict())
    r = rollout(user, Workspace(user, 7), 0.1, torch.Generator().manual_seed(3))
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    assert not fused_layout(user.net)
    got = grads_of(user, lambda: policy_grad(r, g))
    expected = grads_of(user, lambda: (g * user.step_log_probs(r.traj)).sum().backward())
    wrong = grads_of(user, lambda: backward(r, g))
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12, msg=n)
    assert any(not torch.allclose(wrong[n], expected[n]) for n in got)  # the fused path would not do


def test_the_fused_backward_s_assumptions_about_driftnet_s_layout():
    """`rollout.backward` and `DiffusionSampler.run` restate DriftNet's layout: the state Linear, the time
    MLP, and a body GELU, [Linear, GELU] * L, Linear. If DriftNet changes, this fails: update the fused code
    (or let `fused_layout` send the new network to autograd) and then this list."""
    net = DriftNet(3, hidden=16, n_freq=8, n_layers=2)
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == [
        ("time.phase", (8,)),
        ("time.mlp.0.weight", (16, 16)),
        ("time.mlp.0.bias", (16,)),
        ("time.mlp.2.weight", (16, 16)),
        ("time.mlp.2.bias", (16,)),
        ("state.weight", (16, 3)),
        ("state.bias", (16,)),
        ("body.1.weight", (16, 16)),
        ("body.1.bias", (16,)),
        ("body.3.weight", (16, 16)),
        ("body.3.bias", (16,)),
        ("body.5.weight", (3, 16)),
        ("body.5.bias", (3,)),
    ]
    assert [type(m) for m in net.body] == [nn.GELU, nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert fused_layout(net)
    net.body[0] = nn.GELU(approximate="tanh")
    assert not fused_layout(net)
    net.body[0] = nn.SiLU()
    assert not fused_layout(net)


def test_workspace_is_reused(float64):
    s = seeded(3, steps=5)
    ws = Workspace(s, 4)
    a = rollout(s, ws, 0.0, torch.Generator().manual_seed(0))
    b = rollout(s, ws, 0.0, torch.Generator().manual_seed(1))
    assert a.traj.data_ptr() == b.traj.data_ptr() == ws.traj.data_ptr() and a.pre.data_ptr() == ws.pre.data_ptr()


def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them():
    """After the call, a 24 MB block (an activation-sized allocation) comes from the heap, not from a
    fresh mapping, and freeing it does not trim the heap: the next step reuses the pages."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc mallinfo2 here")

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
        ]

    info.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    assert keep_freed_memory() is True
    size = 24 << 20
    before = info()
    block = libc.malloc(size)
    assert block
    during = info()
    libc.free(block)
    after = info()
    assert during.hblkhd == before.hblkhd  # not a fresh mapping ...
    assert during.uordblks - before.uordblks >= size  # ... but heap space
    assert after.arena >= during.arena  # and the heap was not trimmed when it was freed
