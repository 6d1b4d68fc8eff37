"""Local search (MALA): a known Gaussian stays invariant, the step adapts toward 0.574 by the paper's rule,
targets without a gradient are refused, and no step reads a tensor back to the host."""

from __future__ import annotations

import math
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rtbcli.energy import ReplayBuffer, get_target, mala
from rtbcli.errors import InputError
from rtbcli.gaussian import gaussian_log_prob

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
VAR = 0.5


def log_gauss(x):
    return gaussian_log_prob(x, MEAN.to(x), VAR)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact(n, seed):
    return MEAN + math.sqrt(VAR) * torch.randn(n, 2, generator=gen(seed), dtype=torch.float64)


@pytest.mark.parametrize("adapt_after_burn_in", [False, True])
def test_gaussian_is_left_invariant_with_the_adapted_step(adapt_after_burn_in):
    n = 4000
    # the paper's 200 iterations with 100 of burn-in, from a step too large (the right one is ~0.6 here)
    res = mala(exact(n, 0), log_gauss, steps=200, burn_in=100, step_size=1.0, adapt_after_burn_in=adapt_after_burn_in, generator=gen(1))
    x = res.x
    assert float((x.mean(0) - MEAN).abs().max()) < 5 * math.sqrt(VAR / n)
    assert float((x.var(0) - VAR).abs().max()) < 5 * VAR * math.sqrt(2 / n)
    assert abs(float(res.acceptance) - 0.574) < 0.03
    assert 0.5 < float(res.step_size) < 0.7  # it came down from the too-large start
    assert torch.allclose(res.log_pi, log_gauss(x), rtol=0, atol=1e-12)


def test_chains_move_and_the_chain_is_kept():
    x0 = exact(500, 2)
    res = mala(x0, log_gauss, steps=20, burn_in=5, keep_chain=True, generator=gen(3))
    assert res.chain.shape == (15, 500, 2) and res.chain_log_pi.shape == (15, 500)
    assert torch.equal(res.chain[-1], res.x)
    # a state changes exactly where a proposal was accepted
    moved = (res.chain[1:] != res.chain[:-1]).any(-1)
    assert torch.equal(moved, res.chain_accepted[1:])
    assert abs(float(res.chain_accepted.double().mean()) - float(res.acceptance)) < 1e-12
    assert float((res.x != x0).any(1).double().mean()) > 0.9


def test_unadjusted_langevin_would_fail_this_test():
    # the same moments check catches a kernel without the Metropolis correction: ULA at eta = 0.4 has
    # stationary variance VAR / (1 - eta / (2 VAR)) = 0.833, far from 0.5
    n, eta = 4000, 0.4
    x = exact(n, 4)
    g = gen(5)
    for _ in range(60):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_gauss(xg).sum(), xg)
        x = x + eta * grad + math.sqrt(2 * eta) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert float((x.var(0) - VAR).abs().max()) > 5 * VAR * math.sqrt(2 / n)
    res = mala(exact(n, 4), log_gauss, steps=60, burn_in=30, step_size=eta, adapt=False, generator=gen(5))
    assert float((res.x.var(0) - VAR).abs().max()) < 5 * VAR * math.sqrt(2 / n)


def test_adaptation_rule_by_hand():
    # a flat target accepts every proposal: the measured rate is 1 > 0.574, so from the second
    # iteration on eta grows by 1 % per iteration: eta_0 1.01^(steps - 1)
    def flat(x):
        return 0.0 * x.sum(-1)

    res = mala(torch.zeros(10, 3, dtype=torch.float64), flat, steps=12, burn_in=2, step_size=0.1, generator=gen(6))
    assert float(res.step_size) == pytest.approx(0.1 * 1.01**11, rel=1e-12)
    assert float(res.acceptance) == 1.0

    # an impossible target rejects every proposal: eta shrinks by 1 % per iteration
    def wall(x):
        return torch.where(x.abs().sum(-1) == 0, 0.0, -1e30) + 0.0 * x.sum(-1)

    res = mala(torch.zeros(10, 3, dtype=torch.float64), wall, steps=12, burn_in=2, step_size=0.1, generator=gen(7))
    assert float(res.step_size) == pytest.approx(0.1 * 0.99**11, rel=1e-12)
    assert float(res.acceptance) == 0.0 and torch.equal(res.x, torch.zeros(10, 3, dtype=torch.float64))
    # the paper's Algorithm 2 as written: factors 1.1 / 0.9 on each iteration's rate
    res = mala(
        torch.zeros(10, 3, dtype=torch.float64),
        flat,
        steps=12,
        burn_in=2,
        step_size=0.01,
        adapt_factor=0.1,
        adapt_every=1,
        generator=gen(6),
    )
    assert float(res.step_size) == pytest.approx(0.01 * 1.1**11, rel=1e-12)
    # frozen after burn-in: eta_0 1.01^(burn_in - 1)
    res = mala(
        torch.zeros(10, 3, dtype=torch.float64), flat, steps=12, burn_in=4, step_size=0.1, adapt_after_burn_in=False, generator=gen(6)
    )
    assert float(res.step_size) == pytest.approx(0.1 * 1.01**3, rel=1e-12)


def test_energy_targets_are_differentiable_for_local_search():
    t = get_target("manywell")
    res = mala(t.sample(64, gen(8)), t.log_density, steps=10, burn_in=5, generator=gen(9))
    assert res.x.shape == (64, 32) and bool(torch.isfinite(res.x).all())


def test_a_target_without_gradient_is_refused_with_the_option_to_switch_off():
    def no_grad_target(x):
        return torch.from_numpy(-(x.detach().numpy() ** 2).sum(-1))

    with pytest.raises(InputError, match="switch local search off"):
        mala(torch.zeros(4, 2, dtype=torch.float64), no_grad_target, steps=3, burn_in=1)
    with pytest.raises(InputError, match="does not depend on x"):
        mala(torch.zeros(4, 2), lambda x: torch.zeros(4, requires_grad=True), steps=3, burn_in=1)
    with pytest.raises(InputError, match="shape"):
        mala(torch.zeros(4, 2), lambda x: x, steps=3, burn_in=1)
    with pytest.raises(InputError, match="step size"):
        mala(torch.zeros(4, 2), log_gauss, steps=3, burn_in=1, step_size=0.0)
    with pytest.raises(InputError, match="burn_in"):
        mala(torch.zeros(4, 2), log_gauss, steps=3, burn_in=3)


# --- no reads back to the host in the per-step pieces ----------------------------------------
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")
PACKAGE = str(Path(__import__("rtbcli").__file__).parent)


@contextmanager
def host_reads():
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, method):
        def call(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                counts[name] += 1
            return method(self, *args, **kwargs)

        return call

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def test_no_host_reads_per_iteration_or_in_the_buffer():
    x = exact(16, 10)
    with host_reads() as few:
        mala(x, log_gauss, steps=4, burn_in=1, generator=gen(1))
    with host_reads() as many:
        mala(x, log_gauss, steps=20, burn_in=1, generator=gen(1))
    assert few == many and sum(many.values()) <= 1  # the one check of the step size, before the loop
    b = ReplayBuffer(8, 2, dtype=torch.float64)
    with host_reads() as c:
        for _ in range(3):
            b.add(x[:5], log_gauss(x[:5]))
            b.sample(7, gen(2))
    assert sum(c.values()) == 0
