"""Local search: Metropolis-adjusted Langevin (MALA) toward pi on a batch of states.

As in Sendera et al. 2024 (gfn-diffusion, langevin.py), each of `steps` iterations proposes, for
every chain at once,

    x' = x + eta grad log pi(x) + sqrt(2 eta) eps,        eps ~ N(0, I),

and accepts it with probability min(1, exp(A)),

    A = log pi(x') - log pi(x) + log q(x | x') - log q(x' | x),
    log q(b | a) = -|b - a - eta grad log pi(a)|^2 / (4 eta)   (constants cancel),

a kernel that leaves pi invariant for any fixed eta. The step size eta is adapted as the
paper's code does (`adjust_ld_step`, target 0.574, the optimal MALA acceptance): from the second
iteration on, eta <- eta (1 + f) if the last measured acceptance rate exceeds the target and
eta (1 - f) otherwise (f = 0.01); the acceptance rate is measured over all chains and the
iterations since the previous measurement, every `adapt_every` = 5 iterations (and after the
first). The first `burn_in` iterations are burn-in; the states after it are the search's output.

The paper's Algorithm 2 (Appendix E.1) states the same rule with f_increase = 1.1, f_decrease = 0.9,
the rate of each single iteration and eta_0 = 0.01: `adapt_factor=0.1, adapt_every=1,
step_size=0.01` reproduces it. The defaults follow the code and the Table 1 command line
(README: `--ld_step 0.1 --ld_schedule`).

Differences from the paper's code, on purpose: the output is the chains' states (the final
states, and optionally every post-burn-in state, rejected proposals repeating the current state),
not the variable-size set of accepted proposals, so that no shape depends on a random count and
nothing is copied to the host; eta stays a tensor on the device. `adapt_after_burn_in=False`
freezes eta after burn-in, which makes the post-burn-in chain exactly pi-invariant.

grad log pi comes from autograd; a log-density without a gradient is refused with an
`InputError` naming the option that switches local search off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError

TARGET_ACCEPTANCE = 0.574
SWITCH_OFF = "switch local search off (local_search = false / --no-local-search)"


@dataclass
class MalaResult:
    x: torch.Tensor  # (B, d) the final states
    log_pi: torch.Tensor  # (B,) log pi at the final states
    step_size: torch.Tensor  # () the adapted eta after the last iteration
    acceptance: torch.Tensor  # () the acceptance rate over the post-burn-in iterations (all chains)
    chain: torch.Tensor | None = None  # (steps - burn_in, B, d) the post-burn-in states, if kept
    chain_log_pi: torch.Tensor | None = None  # (steps - burn_in, B)
    chain_accepted: torch.Tensor | None = None  # (steps - burn_in, B) bool: the proposal was accepted at that
    # iteration; chain[chain_accepted] is the paper code's output set (a host sync: its size is random)


def log_density_and_grad(
    log_density: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, switch_off: str = SWITCH_OFF
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(x) (B,), grad log pi(x) (B, d)), both detached, by autograd."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = log_density(xg)
        if not isinstance(lp, torch.Tensor) or lp.shape != x.shape[:-1]:
            raise InputError(
                f"the log-density must return a tensor of shape {tuple(x.shape[:-1])}, "
                f"got {type(lp).__name__} {tuple(getattr(lp, 'shape', ()))}"
            )
        if not lp.requires_grad:
            raise InputError(
                f"the target's log-density has no gradient (autograd cannot differentiate it): {switch_off}, "
                "or write it with differentiable torch operations"
            )
        (g,) = torch.autograd.grad(lp.sum(), xg, allow_unused=True)
    if g is None:
        raise InputError(f"the target's log-density does not depend on x through autograd: {switch_off}")
    return lp.detach(), g


def mala(
    x: torch.Tensor,
    log_density: Callable[[torch.Tensor], torch.Tensor],
    steps: int = 200,
    burn_in: int = 100,
    step_size: float | torch.Tensor = 0.1,
    adapt: bool = True,
    target_acceptance: float = TARGET_ACCEPTANCE,
    adapt_factor: float = 0.01,
    adapt_every: int = 5,
    adapt_after_burn_in: bool = True,
    keep_chain: bool = False,
    generator: torch.Generator | None = None,
    switch_off: str = SWITCH_OFF,
) -> MalaResult:
    """Run `steps` MALA iterations toward pi = exp(log_density) from the states x (B, d).

    Defaults as the paper's Table 1 runs: 200 iterations, 100 of burn-in, eta_0 = 0.1
    (`--ld_step 0.1 --ld_schedule --target_acceptance_rate 0.574`). See the module docstring.
    """
    if steps <= 0 or not 0 <= burn_in < steps:
        raise InputError(f"local search needs steps > 0 and 0 <= burn_in < steps, got steps={steps}, burn_in={burn_in}")
    if not isinstance(step_size, torch.Tensor) and not step_size > 0:  # a tensor is not read back (no host sync)
        raise InputError(f"the local-search step size must be > 0, got {step_size}: set a positive step size")
    eta = torch.as_tensor(step_size, dtype=x.dtype, device=x.device).clone()
    x = x.detach().clone()
    lp, g = log_density_and_grad(log_density, x, switch_off)
    rate = torch.zeros((), dtype=x.dtype, device=x.device)  # the last measured acceptance rate
    window = torch.zeros((), dtype=x.dtype, device=x.device)  # accepted proposals since the last measurement
    count = 0  # proposals since the last measurement (a Python int)
    post = torch.zeros((), dtype=x.dtype, device=x.device)
    chain, chain_lp, chain_acc = [], [], []
    for i in range(steps):
        if adapt and i > 0 and (adapt_after_burn_in or i < burn_in):
            eta = torch.where(rate > target_acceptance, eta * (1 + adapt_factor), eta * (1 - adapt_factor))
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        prop = x + eta * g + torch.sqrt(2 * eta) * noise
        lp_new, g_new = log_density_and_grad(log_density, prop, switch_off)
        log_q_fwd = -(prop - x - eta * g).pow(2).sum(-1) / (4 * eta)
        log_q_bwd = -(x - prop - eta * g_new).pow(2).sum(-1) / (4 * eta)
        log_accept = lp_new - lp + log_q_bwd - log_q_fwd
        u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
        acc = u < torch.exp(torch.clamp(log_accept, max=0.0))  # NaN proposals are rejected
        x = torch.where(acc[:, None], prop, x)
        lp = torch.where(acc, lp_new, lp)
        g = torch.where(acc[:, None], g_new, g)
        window = window + acc.sum()
        count += x.shape[0]
        if i % adapt_every == 0:
            rate, window, count = window / count, torch.zeros_like(window), 0
        if i >= burn_in:
            post = post + acc.to(x.dtype).mean()
            if keep_chain:
                chain.append(x)
                chain_lp.append(lp)
                chain_acc.append(acc)
    stack = (lambda v: torch.stack(v)) if keep_chain else (lambda v: None)
    return MalaResult(x, lp, eta, post / (steps - burn_in), stack(chain), stack(chain_lp), stack(chain_acc))
