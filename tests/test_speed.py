"""The fast paths of a fine-tuning step against the plain computations they replace.

- the no-gradient scoring forward of DriftNet (a frozen prior's T*n states: the state layer and
  the time table in one batched product, oneDNN's fused Linear + GELU on the CPU in float32);
- the backward's thin product g_f @ W_out (inner dimension d <= THIN), bit for bit the GEMM's.

Each keeps a float32 run's numbers bit for bit on this machine (tests/test_checkpoint.py resumes a
version-1 run to the checkpoint version 1 finished with).
"""

from __future__ import annotations

import pytest
import torch

from rtbcli import rollout as rollout_mod
from rtbcli import sampler as sampler_mod
from rtbcli.rollout import THIN, Workspace, _rows_times, backward, rollout
from rtbcli.sampler import DiffusionSampler
from test_sampler import seeded


def _sampler(dim: int, dtype: torch.dtype, seed: int = 0) -> DiffusionSampler:
    torch.manual_seed(seed)
    s = DiffusionSampler(dim, steps=9, hidden=32, time_features=16).to(dtype)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_(0.0, 0.4)
    return s


class _LinearSpy:
    """Stands in for torch.ops.mkldnn: records the post-op of each oneDNN Linear call."""

    def __init__(self, calls: list[str]):
        self.calls, self.fused = calls, torch.ops.mkldnn._linear_pointwise

    def _linear_pointwise(self, *a):
        self.calls.append(a[3])
        return self.fused(*a)


@pytest.mark.parametrize("dim", [2, 7])
def test_scoring_forward_is_the_plain_forward_float64(dim):
    """In float64 (no oneDNN fusion) the batched state layer is the plain one to rounding."""
    s = _sampler(dim, torch.float64)
    traj = 2 * torch.randn(10, 13, dim, dtype=torch.float64)
    with torch.no_grad():
        fast = s.step_log_probs(traj)
    with torch.enable_grad():
        plain = s.step_log_probs(traj).detach()
    torch.testing.assert_close(fast, plain, rtol=1e-13, atol=1e-11)


def test_scoring_forward_takes_the_fused_path_and_agrees_float32(monkeypatch):
    """In float32 on the CPU the scoring forward calls oneDNN's Linear + GELU once per hidden
    layer, and agrees with the plain forward within float32 rounding."""
    if not sampler_mod.LINEAR_GELU:
        pytest.skip("this torch build has no oneDNN fused linear")
    s = _sampler(2, torch.float32)
    traj = 3 * torch.randn(10, 200, 2)
    calls: list[str] = []
    with torch.no_grad():
        monkeypatch.setattr(torch.ops, "mkldnn", _LinearSpy(calls))
        fast = s.step_log_probs(traj)
        monkeypatch.undo()
        drift_fast = s.net(traj[:-1], s.time_table()[:, None, :])
    assert calls == ["gelu", "gelu"]  # the two hidden layers
    with torch.enable_grad():
        plain = s.step_log_probs(traj).detach()
        drift_plain = s.net(traj[:-1], s.time_table()[:, None, :]).detach()
    torch.testing.assert_close(drift_fast, drift_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    assert torch.equal(fast, plain)  # in fact bit for bit on this machine's oneDNN and MKL


@pytest.mark.parametrize("d", [1, 2, THIN, THIN + 3])
def test_thin_products_are_the_gemms(float64, d):
    g, w = torch.randn(35, d), torch.randn(d, 6)
    torch.testing.assert_close(_rows_times(g, w), g @ w, rtol=1e-14, atol=1e-13)


@pytest.mark.parametrize("d", [1, 2])
def test_thin_product_is_the_gemm_bit_for_bit_float32(d):
    g, w = torch.randn(5000, d), torch.randn(d, 64)
    assert torch.equal(_rows_times(g, w), g @ w)


def test_backward_uses_the_thin_product(float64, monkeypatch):
    """The backward's g_f @ W_out goes through the helper (so a broken helper fails
    test_rollout.py's autograd comparisons)."""
    s = seeded(5, std=0.5, steps=4)
    ro = rollout(s, Workspace(s, 3), 0.1, torch.Generator().manual_seed(0))
    seen = []
    f = rollout_mod._rows_times
    monkeypatch.setattr(rollout_mod, "_rows_times", lambda *a: (seen.append(1), f(*a))[1])
    backward(ro, torch.ones(4, 3))
    assert seen == [1]


def _grads_float64_autograd(s32: DiffusionSampler, fn) -> dict[str, torch.Tensor]:
    s64 = DiffusionSampler(2, steps=s32.steps, hidden=32, time_features=16, layers=2).double()
    s64.load_state_dict({k: v.double() for k, v in s32.state_dict().items()})
    s64.zero_grad(set_to_none=True)
    fn(s64)
    return {n: p.grad for n, p in s64.named_parameters()}


def _close_float32(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, g in got.items():
        scale = want[name].abs().max().item()
        assert (g.double() - want[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize("estimator", ["pairs", "trajectory"])
def test_pretraining_gradient_takes_onednn_and_agrees_float32(monkeypatch, reference, estimator):
    """In float32 on the CPU the hand-written pretraining gradient runs the hidden layers' forward and their
    input gradients through oneDNN's Linear, and agrees with autograd's gradient to 1e-5."""
    if not sampler_mod.LINEAR_GELU:
        pytest.skip("this torch build has no oneDNN linear")
    from rtbcli.pretrain import pairs_backward, pairs_loss, trajectory_backward, trajectory_loss
    from rtbcli.tasks import Task

    task = Task(reference)
    s = _sampler(2, torch.float32)
    loss_fn, by_hand = (pairs_loss, pairs_backward) if estimator == "pairs" else (trajectory_loss, trajectory_backward)
    calls: list[str] = []
    monkeypatch.setattr(torch.ops, "mkldnn", _LinearSpy(calls))
    s.zero_grad(set_to_none=True)
    by_hand(s, task, 300, torch.Generator().manual_seed(2))
    monkeypatch.undo()
    assert calls == ["none"] * 5  # 2 hidden layers and the output layer forward, 2 input gradients
    got = {n: p.grad.clone() for n, p in s.named_parameters()}
    s.zero_grad(set_to_none=True)
    loss_fn(s, task, 300, torch.Generator().manual_seed(2)).backward()  # the same draws: float32 autograd, MKL's products
    _close_float32(got, {n: p.grad.double() for n, p in s.named_parameters()})


def test_finetuning_backward_takes_onednn_and_agrees_float32(monkeypatch):
    """The fine-tuning backward's input gradients go through oneDNN's Linear in float32 (one per hidden layer), and
    the gradient agrees with float64 autograd to 1e-5; under bf16 autocast (`matmul_dtype`) autocast's products run."""
    if not sampler_mod.LINEAR_GELU:
        pytest.skip("this torch build has no oneDNN linear")
    s = _sampler(2, torch.float32)
    ro = rollout(s, Workspace(s, 200), 0.1, torch.Generator().manual_seed(0))
    g = torch.randn(s.steps, 200, generator=torch.Generator().manual_seed(1))
    calls: list[str] = []
    monkeypatch.setattr(torch.ops, "mkldnn", _LinearSpy(calls))
    s.zero_grad(set_to_none=True)
    backward(ro, g)
    got = {n: p.grad.clone() for n, p in s.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        backward(ro, g)
    monkeypatch.undo()
    assert calls == ["none", "none"]  # the float32 pass only
    traj = ro.traj.double()
    want = _grads_float64_autograd(s, lambda s64: (g.double() * s64.step_log_probs(traj)).sum().backward())
    _close_float32(got, want)
