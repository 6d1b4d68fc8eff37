"""Table 1 metrics: exact W2 by hand and by translation, delta log Z's by hand, and the exact zero
of the log-weights when the sampler is the target."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

from rtbcli.energy import (
    BrownianPrior,
    backward_trajectories,
    delta_log_z,
    delta_log_z_rw,
    elbo,
    eubo,
    log_weights,
    log_z_rw,
    w2_exact,
)
from rtbcli.errors import InputError
from rtbcli.gaussian import centred_log_prob
from rtbcli.sampler import bridge_log_prob


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_w2_by_hand_in_one_dimension():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.5], [3.0]])
    assert w2_exact(x, y) == pytest.approx(math.sqrt((0.25 + 4.0) / 2), abs=1e-12)
    # in 1-D the optimal coupling matches sorted values
    a = torch.randn(50, 1, generator=gen(0), dtype=torch.float64)
    b = torch.randn(50, 1, generator=gen(1), dtype=torch.float64) * 2 + 1
    sorted_w2 = math.sqrt(float((a.sort(0).values - b.sort(0).values).pow(2).mean()))
    assert w2_exact(a, b) == pytest.approx(sorted_w2, abs=1e-10)
    # unequal sizes: a point mass against two points
    assert w2_exact(torch.zeros(1, 2), torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(math.sqrt(12.5), abs=1e-12)


def test_w2_of_a_translation_is_the_shift():
    x = torch.randn(300, 3, generator=gen(2), dtype=torch.float64)
    s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert w2_exact(x, x + s) == pytest.approx(float(s.norm()), abs=1e-9)
    assert w2_exact(x, x) == pytest.approx(0.0, abs=1e-9)


def test_w2_between_samplings_of_the_same_and_of_shifted_laws():
    x = torch.randn(400, 2, generator=gen(3), dtype=torch.float64)
    y = torch.randn(400, 2, generator=gen(4), dtype=torch.float64)
    same = w2_exact(x, y)
    assert same < 0.3
    s = torch.tensor([3.0, 4.0], dtype=torch.float64)
    shifted = w2_exact(x, y + s)
    assert abs(shifted - 5.0) <= same + 1e-9  # the triangle inequality around W2(x, x + s) = |s|
    assert abs(shifted - 5.0) < 0.1


def test_w2_bad_input_and_missing_pot(monkeypatch):
    with pytest.raises(InputError):
        w2_exact(torch.zeros(3, 2), torch.zeros(3, 3))
    assert w2_exact(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2)) == math.inf
    real_import = builtins.__import__

    def no_pot(name, *args, **kwargs):
        if name == "ot":
            raise ImportError("no POT")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pot)
    with pytest.raises(InputError, match=r"pip install 'rtbcli\[pot\]'"):
        w2_exact(torch.zeros(2, 2), torch.ones(2, 2))


def test_delta_log_z_by_hand():
    lw = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    assert elbo(lw) == pytest.approx(math.log(3) / 2, abs=1e-15)
    assert log_z_rw(lw) == pytest.approx(math.log(2.0), abs=1e-15)
    assert delta_log_z(lw, 1.0) == pytest.approx(1 - math.log(3) / 2, abs=1e-15)
    assert delta_log_z_rw(lw, 1.0) == pytest.approx(1 - math.log(2), abs=1e-15)
    assert eubo(lw) == elbo(lw)
    assert torch.equal(log_weights(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])), torch.tensor([-1.0]))


def test_log_weights_vanish_when_the_sampler_is_the_target():
    # target pi = N(0, sigma2 I) * e^c (log Z = c): the Brownian prior samples it exactly, and
    # lw = log pi(x_T) + log p_B(tau | x_T) - log p_F(tau) = c for every trajectory, both ways
    sigma2, c = 2.0, 0.7
    p = BrownianPrior(3, steps=30, sigma2=sigma2).double()

    def log_pi(x):
        return centred_log_prob(x, sigma2) + c

    traj = p.sample(64, generator=gen(5))
    lw = log_weights(log_pi(traj[-1]), bridge_log_prob(traj, sigma2), p.log_prob(traj))
    assert torch.allclose(lw, torch.full_like(lw, c), rtol=0, atol=1e-10)
    assert delta_log_z(lw, c) < 1e-10 and delta_log_z_rw(lw, c) < 1e-10
    x = torch.randn(64, 3, generator=gen(6), dtype=torch.float64) * math.sqrt(sigma2)  # exact target samples
    tb = backward_trajectories(x, 30, sigma2, gen(7))
    assert abs(eubo(log_weights(log_pi(x), bridge_log_prob(tb, sigma2), p.log_prob(tb))) - c) < 1e-10


@pytest.mark.parametrize("power", [1.0, 2.5])
def test_table_metrics_of_an_exact_sampler_and_the_sandwich(power):
    from rtbcli.energy import EnergyTarget, get_target, table_metrics

    class Scaled(EnergyTarget):  # pi = e^0.7 N(0, 2 I) in d = 2: the Brownian prior of variance 2 samples it
        name, dim, sigma2 = "scaled", 2, 2.0

        def log_density(self, x):
            return centred_log_prob(x, 2.0) + 0.7

        @property
        def log_z(self):
            return 0.7

        def _draw(self, n, generator):
            return math.sqrt(2.0) * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    pol = BrownianPrior(2, steps=20, sigma2=2.0, time_power=power).double().fresh_policy(hidden=8, time_features=4)
    m = table_metrics(pol, Scaled(), k=300, generator=gen(8))  # on a non-uniform grid, exact only with that grid's bridge
    assert m["log_z_true"] == 0.7 and m["k"] == 300
    assert m["delta_log_z"] < 1e-9 and m["delta_log_z_rw"] < 1e-9 and abs(m["eubo"] - 0.7) < 1e-9
    assert m["w2"] < 0.8  # two samplings of the same law (about 0.5 at n = 300, variance 2)
    # a sampler far from the target: ELBO < log Z < EUBO, by wide margins
    t = get_target("gmm25")
    pol = BrownianPrior(2, steps=20, sigma2=5.0).double().fresh_policy(hidden=8, time_features=4)
    m = table_metrics(pol, t, k=300, generator=gen(9), stratified_reference=True)
    assert m["elbo"] < -0.5 and m["eubo"] > 0.5 and m["delta_log_z"] == pytest.approx(-m["elbo"], abs=1e-12)
    assert m["w2"] > 2.0
    with pytest.raises(InputError, match="stratified"):
        table_metrics(pol, Scaled(), k=10, generator=gen(1), stratified_reference=True)
