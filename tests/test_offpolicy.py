"""The off-policy tools' pieces (rtbcli.offpolicy): the alternation, replayed trajectories, local
search toward pi, the buffers' exact save/restore, the paper's exploration schedule, bad options.
(Their behaviour inside the training loop: tests/test_offpolicy_loop.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.config import FinetuneSpec
from rtbcli.energy.buffer import backward_trajectories
from rtbcli.errors import InputError
from rtbcli.offpolicy import OffPolicy, check_gradient, check_options
from rtbcli.sampler import bridge_log_prob
from rtbcli.trainer import exploration_linear

D, T, SIGMA2 = 2, 10, 1.0
CENTRE = torch.tensor([3.0, -2.0], dtype=torch.float64)


def log_pi(x: torch.Tensor) -> torch.Tensor:
    """N(CENTRE, 0.25 I), unnormalised."""
    return -2.0 * (x - CENTRE).pow(2).sum(-1)


def log_r(x: torch.Tensor) -> torch.Tensor:
    return log_pi(x) + 0.5 * x.pow(2).sum(-1) / SIGMA2


def spec(**kw) -> FinetuneSpec:
    return FinetuneSpec(**{"replay": True, "buffer_size": 5000, **kw})


def offpolicy(energy=False, seed=0, **kw) -> OffPolicy:
    def bridge(x, g):  # the uniform grid's pinned bridge
        return backward_trajectories(x, T, SIGMA2, g)

    return OffPolicy(spec(**kw), D, bridge, log_density=log_pi if energy else None, seed=seed, dtype=torch.float64)


def filled(op: OffPolicy, n=50, seed=1) -> OffPolicy:
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    op.add(x, log_r(x))
    return op


def test_paper_exploration_schedule():
    assert exploration_linear(0, 0.2, 5000, 25000) == 0.2
    assert exploration_linear(2500, 0.2, 5000, 25000) == pytest.approx(0.1)
    assert exploration_linear(4999, 0.2, 5000, 25000) == pytest.approx(0.2 / 5000)
    assert exploration_linear(5000, 0.2, 5000, 25000) == 0.0
    assert exploration_linear(20000, 0.2, 5000, 25000) == 0.0
    assert exploration_linear(99, 0.2, 5000, 100) == 0.0  # the last step of a run never explores


def test_alternation_and_local_search_schedule():
    op = offpolicy(energy=True, local_search=True, ls_every=10)
    assert [it for it in range(8) if op.replays(it)] == [1, 3, 5, 7]
    assert [it for it in range(40) if op.searches(it)] == [1, 11, 21, 31]
    assert not any(offpolicy(energy=True).searches(it) for it in range(40))  # no local search unless asked


def test_replayed_trajectories_end_at_buffer_states_by_the_bridge():
    op = filled(offpolicy())
    traj, lr = op.replay(1, 64, log_r)
    assert traj.shape == (T + 1, 64, D)
    assert torch.all(traj[0] == 0)
    held = op.buffer.states()[0]
    match = (traj[-1][:, None, :] == held[None]).all(-1)  # every end state is a buffer state
    assert match.any(1).all()
    assert torch.allclose(lr, log_r(traj[-1]))  # log r comes with the state
    assert torch.isfinite(bridge_log_prob(traj, SIGMA2)).all()


def test_replay_draws_by_rank():
    op = offpolicy()
    x = torch.linspace(-1, 1, 100, dtype=torch.float64)[:, None].expand(100, D).contiguous()
    op.add(x, x[:, 0])  # log r rises with x
    ends = op.replay(1, 4000, log_r)[0][-1][:, 0]
    p = op.buffer.probabilities()  # the top-ranked state (x = 1) is the most likely
    assert float((ends == 1.0).double().mean()) == pytest.approx(float(p[-1]), abs=0.02)


def test_energy_mode_ranks_by_log_pi():
    op = offpolicy(energy=True)
    x = torch.tensor([[3.0, -2.0], [10.0, 10.0]], dtype=torch.float64)
    op.add(x, torch.tensor([0.0, 5.0], dtype=torch.float64))  # log r prefers the second, log pi the first
    assert op.buffer.order().tolist() == [0, 1]
    assert offpolicy().buffer.rank_by_log_pi is False


def test_local_search_moves_the_states_toward_pi():
    op = filled(offpolicy(energy=True, local_search=True, ls_steps=60, ls_burn_in=30), n=200)
    assert len(op.ls_buffer) == 0
    traj, lr = op.replay(1, 100, log_r)  # step 1 searches first, then draws from the local-search buffer
    assert len(op.ls_buffer) == 30 * 100
    states, ls_lr, ls_lp = op.ls_buffer.states()
    assert torch.allclose(ls_lp, log_pi(states)) and torch.allclose(ls_lr, log_r(states))
    assert torch.allclose(states.mean(0), CENTRE, atol=0.15)  # the chains reached pi from N(0, I)
    assert states.var(0).mean().item() == pytest.approx(0.25, rel=0.25)
    assert torch.allclose(traj[-1].mean(0), CENTRE, atol=0.3)  # replayed states come from the search
    assert 0.3 < float(op.ls_acceptance) < 0.9


def test_no_local_search_leaves_the_buffer_to_forward_states():
    op = filled(offpolicy(energy=True), n=200)
    added = op.buffer.states()[0].clone()
    traj, _ = op.replay(1, 100, log_r)
    assert (traj[-1][:, None, :] == added[None]).all(-1).any(1).all()  # only the states that were added
    assert torch.equal(op.buffer.states()[0], added)


def test_state_dict_resumes_exactly():
    a = filled(offpolicy(energy=True, local_search=True, ls_steps=20, ls_burn_in=10))
    a.replay(1, 16, log_r)
    b = offpolicy(energy=True, local_search=True, ls_steps=20, ls_burn_in=10, seed=5)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for it in (3, 11):
        ta, la = a.replay(it, 16, log_r)
        tb, lb = b.replay(it, 16, log_r)
        assert torch.equal(ta, tb) and torch.equal(la, lb)
    with pytest.raises(InputError, match="replay settings"):
        offpolicy(energy=True).load_state_dict(a.state_dict())


def test_bad_options():
    with pytest.raises(InputError, match="no behaviour log-probability.*--no-replay"):
        check_options(spec(), "reinforce-kl", energy=False)
    with pytest.raises(InputError, match="energy mode.*--no-local-search"):
        check_options(spec(local_search=True), "rtb", energy=False)
    with pytest.raises(InputError, match="--replay"):
        check_options(FinetuneSpec(local_search=True), "rtb", energy=True)
    with pytest.raises(InputError, match="one process"):
        check_options(spec(), "rtb", energy=False, processes=2)
    for algo in ("rtb", "trust-pcl", "vargrad"):
        check_options(spec(local_search=True), algo, energy=True)
    check_options(FinetuneSpec(), "reinforce-kl", energy=False)  # off: nothing refused
    for bad in ({"buffer_size": 0}, {"ls_step_size": 0.0}, {"ls_step_size": -1.0}, {"ls_burn_in": 200}, {"ls_every": 0}):
        with pytest.raises(ValueError):
            FinetuneSpec(**bad)


def test_a_target_without_gradient_is_refused_naming_the_switch():
    x = torch.zeros(4, D)
    with pytest.raises(InputError, match="--no-local-search"):
        check_gradient(lambda x: torch.as_tensor(x.detach().numpy().sum(-1)), x)
    check_gradient(lambda x: -x.pow(2).sum(-1), x)


def test_offpolicy_defaults_are_off():
    c = FinetuneSpec()
    assert (c.replay, c.local_search, c.langevin, c.exploration_end_step) == (False, False, False, None)
    assert c.buffer_size == 600_000 and c.ls_every == 100 and (c.ls_steps, c.ls_burn_in) == (200, 100)
    assert math.isclose(c.buffer_rank_k, 0.01) and math.isclose(c.ls_step_size, 0.1)
