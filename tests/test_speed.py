"""The fast paths of a fine-tuning step against the plain computations they replace.

- the no-gradient scoring forward of DriftNet (a frozen prior's T*n states: the state layer and
  the time table in one batched product, oneDNN's fused Linear + GELU on the CPU in float32);
- the rollout's residuals, which are the scaled noise the sampling loop drew;
- the backward's thin products (inner or outer dimension d <= THIN).
"""

from __future__ import annotations

import pytest
import torch

from rtbcli import rollout as rollout_mod
from rtbcli import sampler as sampler_mod
from rtbcli.rollout import Workspace, _rows_times, _thin_t_mm, backward, rollout
from rtbcli.sampler import THIN, DiffusionSampler
from test_sampler import seeded


def _sampler(dim: int, dtype: torch.dtype, seed: int = 0) -> DiffusionSampler:
    torch.manual_seed(seed)
    s = DiffusionSampler(dim, steps=9, hidden=32, time_features=16).to(dtype)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_(0.0, 0.4)
    return s


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
    calls = []
    fused = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def _linear_pointwise(self, *a):
            calls.append(a[3])
            return fused(*a)

    with torch.no_grad():
        monkeypatch.setattr(torch.ops, "mkldnn", Spy())
        fast = s.step_log_probs(traj)
        monkeypatch.undo()
        drift_fast = s.net(traj[:-1], s.time_table()[:, None, :])
    assert calls == ["gelu", "gelu"]  # the two hidden layers
    with torch.enable_grad():
        plain = s.step_log_probs(traj).detach()
        drift_plain = s.net(traj[:-1], s.time_table()[:, None, :]).detach()
    torch.testing.assert_close(drift_fast, drift_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)


def test_rollout_residuals_are_x_next_minus_the_mean(float64):
    """The residuals a rollout returns (its noise) are x_{i+1} - (x_i + dt f(x_i, t_i)) to rounding,
    behaviour policy inflated or not, on one process or a shard of two."""
    s = seeded(4, std=0.5, steps=8)
    for extra, shard in ((0.0, (0, 1)), (0.3, (0, 1)), (0.3, (1, 2))):
        ro = rollout(s, Workspace(s, 5), extra, torch.Generator().manual_seed(2), shard)
        torch.testing.assert_close(ro.residual, ro.traj[1:] - s.means(ro.traj), rtol=0, atol=1e-13)


@pytest.mark.parametrize("d", [1, 2, THIN, THIN + 3])
def test_thin_products_are_the_gemms(float64, d):
    T, n, H = 5, 7, 6
    g, h, w = torch.randn(T * n, d), torch.randn(T * n, H), torch.randn(d, H)
    torch.testing.assert_close(_rows_times(g, w), g @ w, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(_thin_t_mm(g, h, T), g.t() @ h, rtol=1e-14, atol=1e-13)


def test_backward_uses_the_thin_products(float64, monkeypatch):
    """The backward's d-wide products go through the helpers (so a broken helper fails
    test_rollout.py's autograd comparisons): both are called, twice for the weight gradients."""
    s = seeded(5, std=0.5, steps=4)
    ro = rollout(s, Workspace(s, 3), 0.1, torch.Generator().manual_seed(0))
    seen = []
    for name in ("_rows_times", "_thin_t_mm"):
        f = getattr(rollout_mod, name)
        monkeypatch.setattr(rollout_mod, name, lambda *a, f=f, name=name: (seen.append(name), f(*a))[1])
    backward(ro, torch.ones(4, 3))
    assert sorted(seen) == ["_rows_times", "_thin_t_mm", "_thin_t_mm"]
