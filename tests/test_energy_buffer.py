"""Replay buffer: rank-prioritised probabilities exact, FIFO eviction, exact save/restore, the backward process."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.energy import ReplayBuffer, backward_trajectories, rank_weights
from rtbcli.errors import InputError
from rtbcli.sampler import bridge_sample


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def filled(log_r, capacity=10, with_log_pi=False):
    n = len(log_r)
    b = ReplayBuffer(capacity, 2, dtype=torch.float64, with_log_pi=with_log_pi)
    x = torch.arange(2 * n, dtype=torch.float64).reshape(n, 2)
    lr = torch.tensor(log_r, dtype=torch.float64)
    b.add(x, lr, -lr if with_log_pi else None)
    return b


def test_rank_probabilities_by_hand():
    b = filled([0.5, 2.0, -1.0, 1.0])
    # N = 4, k N = 0.04; ranks: 2.0 -> 0, 1.0 -> 1, 0.5 -> 2, -1.0 -> 3
    w = {0: 1 / (0.04 + 2), 1: 1 / 0.04, 2: 1 / (0.04 + 3), 3: 1 / (0.04 + 1)}
    total = sum(w.values())
    expected = torch.tensor([w[i] / total for i in range(4)], dtype=torch.float64)
    assert torch.allclose(b.probabilities(), expected, rtol=0, atol=1e-15)
    assert torch.allclose(
        rank_weights(4, 0.01), torch.tensor([25.0, 1 / 1.04, 1 / 2.04, 1 / 3.04], dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_sampling_frequencies_follow_the_probabilities():
    b = filled([0.5, 2.0, -1.0, 1.0, 0.0])
    n = 200_000
    x, lr, lp = b.sample(n, gen(0))
    assert x.shape == (n, 2) and lr.shape == (n,) and lp is None
    slot = (x[:, 0] / 2).long()
    assert torch.equal(lr, b.log_r[slot])  # states and their log r travel together
    freq = torch.bincount(slot, minlength=5).double() / n
    p = b.probabilities()
    assert float(((freq - p).abs() / (p * (1 - p) / n).sqrt()).max()) < 5


def test_ties_nan_and_steepness():
    b = filled([1.0, 1.0, float("nan"), 3.0])
    assert b.order().tolist() == [3, 0, 1, 2]  # ties by slot, NaN last
    steep, flat = ReplayBuffer(5, 1, rank_k=0.01), ReplayBuffer(5, 1, rank_k=10.0)
    for buf in (steep, flat):
        buf.add(torch.zeros(5, 1), torch.arange(5.0))
    assert float(steep.probabilities().max()) > 0.9 and float(flat.probabilities().max()) < 0.25


def test_fifo_eviction():
    b = ReplayBuffer(3, 1, dtype=torch.float64, with_log_pi=True)
    b.add(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0]))
    assert len(b) == 2
    b.add(torch.tensor([[3.0], [4.0]]), torch.tensor([3.0, 4.0]), torch.tensor([-3.0, -4.0]))
    x, lr, lp = b.states()
    assert x[:, 0].tolist() == [2.0, 3.0, 4.0] and lr.tolist() == [2.0, 3.0, 4.0] and lp.tolist() == [-2.0, -3.0, -4.0]
    b.add(torch.tensor([[5.0]]), torch.tensor([5.0]), torch.tensor([-5.0]))
    assert b.states()[0][:, 0].tolist() == [3.0, 4.0, 5.0]
    # a batch larger than the capacity keeps its last rows
    b.add(torch.arange(6.0, 11.0)[:, None], torch.arange(6.0, 11.0), -torch.arange(6.0, 11.0))
    assert b.states()[0][:, 0].tolist() == [8.0, 9.0, 10.0] and len(b) == 3
    # the ranking follows the contents
    assert float(b.log_r[b.probabilities().argmax()]) == 10.0


def test_state_dict_restores_exactly():
    a = ReplayBuffer(4, 2, dtype=torch.float64, with_log_pi=True)
    g = gen(1)
    for _ in range(3):  # wraps around
        x = torch.randn(3, 2, generator=g, dtype=torch.float64)
        a.add(x, x.sum(1), -x.sum(1))
    b = ReplayBuffer(4, 2, dtype=torch.float64, with_log_pi=True)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for s1, s2 in zip(a.sample(50, gen(2)), b.sample(50, gen(2))):
        assert torch.equal(s1, s2)
    new = torch.randn(2, 2, generator=g, dtype=torch.float64)
    a.add(new, new.sum(1), -new.sum(1))
    b.add(new, new.sum(1), -new.sum(1))
    for s1, s2 in zip(a.states(), b.states()):
        assert torch.equal(s1, s2)
    with pytest.raises(InputError):
        ReplayBuffer(5, 2, with_log_pi=True).load_state_dict(a.state_dict())


def test_bad_input():
    with pytest.raises(InputError, match="buffer size"):
        ReplayBuffer(0, 2)
    b = ReplayBuffer(3, 2)
    with pytest.raises(InputError, match="empty"):
        b.sample(4)
    with pytest.raises(InputError):
        b.add(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(InputError, match="log_pi"):
        b.add(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2))


def test_backward_trajectories_are_the_pinned_bridge():
    x_end = torch.randn(5, 3, generator=gen(3), dtype=torch.float64) * 3
    traj = backward_trajectories(x_end, 20, 5.0, gen(4))
    assert traj.shape == (21, 5, 3)
    assert torch.equal(traj[0], torch.zeros(5, 3)) and torch.equal(traj[-1], x_end)
    assert torch.equal(traj, bridge_sample(x_end, 20, 5.0, gen(4)))
    # the bridge's law at t = 1/2: mean x_end / 2, variance sigma2 t (1 - t) = 1.25
    many = backward_trajectories(x_end[:1].expand(20_000, 3), 20, 5.0, gen(5))[10]
    assert torch.allclose(many.mean(0), x_end[0] / 2, atol=5 * math.sqrt(1.25 / 20_000))
    assert float((many.var(0) - 1.25).abs().max()) < 5 * 1.25 * math.sqrt(2 / 20_000)
