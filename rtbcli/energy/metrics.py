"""The metrics of Sendera et al. 2024, Table 1 (docs/maths.md#energy-mode).

On K trajectories tau of the sampler (on-policy, K = 2,000 in the paper), the log-weights

    lw = log pi(x_T) + log p_B(tau | x_T) - log p_F(tau)

(p_B the Brownian bridge, leaving out its point-mass step to x_0; `rtbcli.sampler.bridge_log_prob`)
give E[exp(lw)] = Z and E[lw] <= log Z, hence

    delta_log_z    = |log Z - mean(lw)|                (the ELBO's gap)
    delta_log_z_rw = |log Z - log mean exp(lw)|        (the importance-weighted estimate's error)
    eubo           = mean(lw) over exact samples x ~ pi with tau ~ p_B(. | x)   (>= log Z)

and W2 is the exact optimal-transport distance between model and exact samples:
w2_exact(x, y) = sqrt(min_coupling mean |x_i - y_j|^2) (POT's emd2, uniform weights, squared
Euclidean cost), as the paper's code computes it.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError


def log_weights(log_pi: torch.Tensor, lpb: torch.Tensor, lpf: torch.Tensor) -> torch.Tensor:
    """lw = log pi(x_T) + log p_B(tau | x_T) - log p_F(tau), elementwise, (K,)."""
    return log_pi + lpb - lpf


def elbo(lw: torch.Tensor) -> float:
    """mean(lw) in float64 (<= log Z on sampler trajectories)."""
    return float(lw.to(torch.float64).mean())


def log_z_rw(lw: torch.Tensor) -> float:
    """log mean exp(lw) in float64 (the importance-weighted estimate of log Z)."""
    lw = lw.to(torch.float64)
    return float(torch.logsumexp(lw, 0) - math.log(lw.numel()))


def delta_log_z(lw: torch.Tensor, log_z: float) -> float:
    """|log Z - mean(lw)|."""
    return abs(log_z - elbo(lw))


def delta_log_z_rw(lw: torch.Tensor, log_z: float) -> float:
    """|log Z - log mean exp(lw)|."""
    return abs(log_z - log_z_rw(lw))


def eubo(lw_target: torch.Tensor) -> float:
    """mean(lw) over exact target samples with bridge trajectories (>= log Z)."""
    return elbo(lw_target)


def _ot():
    try:
        import ot  # POT, an optional dependency
    except ImportError:
        raise InputError("W2 needs the POT package: pip install 'rtbcli[pot]' (or pip install POT)") from None
    return ot


def require_pot() -> None:
    """An InputError naming the install command where POT (W2's optimal transport) is missing."""
    _ot()


def w2_exact(x: torch.Tensor, y: torch.Tensor, max_iter: int = 10_000_000) -> float:
    """Exact 2-Wasserstein distance between the empirical laws of x (n, d) and y (m, d):
    sqrt(ot.emd2(1/n, 1/m, C)), C_ij = |x_i - y_j|^2, in float64 on the CPU."""
    ot = _ot()
    x, y = torch.as_tensor(x).detach(), torch.as_tensor(y).detach()
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise InputError(f"W2 needs two non-empty sample sets of the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.to("cpu", torch.float64), y.to("cpu", torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.inf
    cost = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2).numpy()
    a, b = ot.unif(len(x)), ot.unif(len(y))
    return math.sqrt(max(float(ot.emd2(a, b, cost, numItermax=max_iter)), 0.0))


def table_from_weights(
    lw: torch.Tensor,
    log_z: float | None,
    lw_target: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> dict[str, float]:
    """Table 1's numbers from log-weights, in one place (`table_metrics` and `rtbcli evaluate` both call it):
    elbo and log_z_rw from lw; with the true log Z, log_z_true and the derived delta_log_z = |log_z_true - elbo| and
    delta_log_z_rw = |log_z_true - log_z_rw|; eubo from lw_target (exact samples with bridge trajectories); w2 between
    model samples x and exact samples y (`w2_exact`)."""
    out = {"elbo": elbo(lw), "log_z_rw": log_z_rw(lw)}
    if log_z is not None:
        out.update(log_z_true=float(log_z), delta_log_z=delta_log_z(lw, log_z), delta_log_z_rw=delta_log_z_rw(lw, log_z))
    if lw_target is not None:
        out["eubo"] = eubo(lw_target)
    if x is not None and y is not None:
        out["w2"] = w2_exact(x, y)
    return out


@torch.no_grad()
def table_metrics(
    sampler, target, k: int = 2000, generator: torch.Generator | None = None, stratified_reference: bool = False, with_w2: bool = True
) -> dict[str, float]:
    """Table 1's numbers for a sampler of `target` (an `EnergyTarget`), from K on-policy trajectories.

    `sampler` has the `DiffusionSampler` interface (`sample(n, extra_var, generator)`, `log_prob`,
    `steps`, `sigma2`, `backward_sample`, `backward_log_prob`: the bridge on its time grid). Returns
    log_z_true, elbo (mean lw), log_z_rw (log mean exp lw), delta_log_z, delta_log_z_rw, eubo (K exact
    samples with bridge trajectories) and, if `with_w2`, w2 between the K terminal states and K exact
    samples (`stratified_reference`: gmm25's equal-count draw, as the paper-era code; else, for gmm25, both: w2 and
    w2_stratified); a target without exact samples
    (no `sample`: a user's) gives elbo and log_z_rw only, with the deltas where it has a `log_z`. Everything in
    float64 Python numbers; reads back to the host, so call it at evaluation time, not per step.
    """
    if stratified_reference and not hasattr(target, "sample_stratified"):
        raise InputError(f"the {getattr(target, 'name', 'given')} target has no stratified sampler: drop stratified_reference")
    traj = sampler.sample(k, 0.0, generator)
    x = traj[-1]
    lw = log_weights(target.log_density(x), sampler.backward_log_prob(traj), sampler.log_prob(traj))
    log_z = getattr(target, "log_z", None)
    if not hasattr(target, "sample"):  # a user's target: no exact samples, so no eubo or w2
        return {"k": float(k), **table_from_weights(lw, None if log_z is None else float(log_z))}
    ref_dtype, ref_device = x.dtype, x.device
    exact = target.sample(k, generator, dtype=ref_dtype).to(ref_device)
    back = sampler.backward_sample(exact, generator)
    lw_t = log_weights(target.log_density(exact), sampler.backward_log_prob(back), sampler.log_prob(back))
    ref = None
    if with_w2:
        ref = target.sample_stratified(k, generator, dtype=ref_dtype) if stratified_reference else exact
    out = {"k": float(k), **table_from_weights(lw, None if log_z is None else float(log_z), lw_t, x if with_w2 else None, ref)}
    if with_w2 and not stratified_reference and hasattr(target, "sample_stratified"):  # 25GMM: the paper's reference too
        out["w2_stratified"] = w2_exact(x, target.sample_stratified(k, generator, dtype=ref_dtype))
    return out
