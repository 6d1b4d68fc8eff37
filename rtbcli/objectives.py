"""The fine-tuning objectives (docs/maths.md#objectives), each a small pure function of a batch.

Notation, per trajectory tau_i of a batch of B (samples are detached: gradients flow only
through the learned policy's log-probabilities and the learned scalar):

    lpf_i   = sum_t log p_phi(x_{t+1} | x_t)      the learned policy (un-inflated)
    lpp_i   = sum_t log p_theta(x_{t+1} | x_t)    the frozen prior (no gradient)
    lb_i    = sum_t log b(x_{t+1} | x_t)          the behaviour policy that drew tau_i
    log_r_i = log r(x_T)

RTB and Trust-PCL are one objective (Deleu et al. 2025, Prop. 1): with alpha = 1 / beta and
V(s0) = alpha log Z, the Trust-PCL residual is -alpha times the RTB residual, so
L_TrustPCL = alpha^2 L_RTB. They are written independently here; the tests prove the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def rtb_loss(log_z: torch.Tensor, lpf: torch.Tensor, lpp: torch.Tensor, log_r: torch.Tensor, beta: float) -> torch.Tensor:
    """Relative Trajectory Balance (Venkatraman et al. 2024).

    delta_i = log Z + lpf_i - lpp_i - beta * log_r_i,      L = mean_i 1/2 delta_i^2
    """
    delta = log_z + lpf - lpp - beta * log_r
    return 0.5 * delta.pow(2).mean()


def outcome_rewards(log_r: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step RL rewards r_t, shape (T, B): zero everywhere except r_{T-1} = log r(x_T)."""
    rewards = torch.zeros(steps, *log_r.shape, dtype=log_r.dtype, device=log_r.device)
    rewards[-1] = log_r
    return rewards


def trust_pcl_loss(v_s0: torch.Tensor, step_lpf: torch.Tensor, step_lpp: torch.Tensor, rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """Trust-PCL (Nachum et al. 2018): path consistency of the soft value over whole trajectories.

    step_lpf, step_lpp, rewards: (T, B) per-step log pi_phi(a_t | s_t), log pi_ref(a_t | s_t), r_t.

        delta'_i = -V(s0) + sum_t r_t + alpha * sum_t [log pi_ref(a_t | s_t) - log pi_phi(a_t | s_t)]
        L = mean_i 1/2 delta'_i^2

    The soft value of the terminal state is 0 and the rewards sum to log r(x_T) (eq. 3 of the
    seed paper), so the consistency holds exactly at the optimum of KL-regularised RL.
    """
    delta = -v_s0 + rewards.sum(0) + alpha * (step_lpp - step_lpf).sum(0)
    return 0.5 * delta.pow(2).mean()


def snis_weights(lpf: torch.Tensor, lb: torch.Tensor | None, temper: float = 1.0) -> torch.Tensor:
    """Self-normalised importance weights softmax_i((lpf_i - lb_i) / temper), without gradient.

    temper = T (the number of steps) is the authors' tempered heuristic; temper = 1 is exact
    SNIS. lb = None means on-policy data: uniform weights 1 / B.
    """
    if lb is None:
        return torch.full_like(lpf, 1.0 / lpf.numel()).detach()
    return torch.softmax((lpf - lb).detach() / temper, dim=0)


def reinforce_kl_loss(
    lpf: torch.Tensor,
    lpp: torch.Tensor,
    log_r: torch.Tensor,
    alpha: float,
    weights: torch.Tensor,
    baseline: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Off-policy REINFORCE with KL regularisation (Deleu et al. 2025, Algorithm 2).

        R_i = log_r_i - alpha * (lpf_i - lpp_i)          reward log r, the KL inside the return
        A_i = R_i - b,  b = mean_j R_j (unweighted) unless a baseline is given
        L   = - sum_i sg[w_i A_i] * lpf_i                w from `snis_weights` (sum to 1)

    All weights and advantages are under stop-gradient. There is no log Z or V here.
    """
    ret = (log_r - alpha * (lpf - lpp)).detach()
    adv = ret - (ret.mean() if baseline is None else torch.as_tensor(baseline, dtype=ret.dtype, device=ret.device).detach())
    return -(weights.detach() * adv * lpf).sum()


def legacy_rl_loss(lpf: torch.Tensor, lpp: torch.Tensor, log_r: torch.Tensor, lam: float) -> torch.Tensor:
    """The RL baseline of the RTB paper (Deleu et al. 2025, Algorithm 1), mis-specified on purpose.

        A_i = r_i - mean_j r_j            reward r = exp(log r) itself, not log r
        L   = mean_i [ -sg[A_i] * lpf_i + lam * (lpf_i - lpp_i)^2 ]

    On-policy only. With detached samples the penalty's gradient is 2 lam times the KL's, so the
    fixed point is p_theta(x) exp(r(x) / (2 lam)), not the target. For reproducing the paper's
    failing panels; never a default.
    """
    r = log_r.exp().detach()
    adv = r - r.mean()
    return (-adv * lpf + lam * (lpf - lpp).pow(2)).mean()


def vargrad_loss(lpf: torch.Tensor, lpp: torch.Tensor, log_r: torch.Tensor, beta: float) -> torch.Tensor:
    """VarGrad (Richter et al. 2020; the "tb-avg" of Sendera et al. 2024): RTB with no learned scalar.

        d_i      = lpf_i - lpp_i - beta * log_r_i
        log Zhat = mean_i (lpp_i + beta * log_r_i - lpf_i) = -mean_i d_i       (under stop-gradient)
        L        = mean_i 1/2 (log Zhat + d_i)^2 = 1/2 * (1/B) sum_i (d_i - mean_j d_j)^2

    i.e. half the (biased, 1/B) batch variance of d, which is RTB's loss at log Z = log Zhat.
    Its gradient is mean_i (d_i - mean_j d_j) grad d_i, RTB's policy gradient at log Z = log Zhat;
    stopping the gradient through log Zhat changes nothing, since the extra term
    -grad(mean d) * mean_i (d_i - mean_j d_j) is identically 0. log Zhat is detached here (the
    cheaper graph), and with B = 1 the loss and its gradient are 0.
    """
    d = lpf - lpp - beta * log_r
    log_z_hat = -d.detach().mean()
    return 0.5 * (log_z_hat + d).pow(2).mean()


# ----------------------------------------------------------------------------- the registry
@dataclass
class Batch:
    """One step's trajectories as the objectives see them (the global batch, B trajectories).

    step_lpf carries the gradient (the learned policy, un-inflated); everything else is detached.
    """

    step_lpf: torch.Tensor  # (T, B) log p_phi(x_{t+1} | x_t)
    step_lpp: torch.Tensor  # (T, B) log p_theta(x_{t+1} | x_t), the frozen prior
    log_r: torch.Tensor  # (B,) log r(x_T)
    lb: torch.Tensor | None  # (B,) log-probability under the behaviour policy; None on-policy

    @property
    def lpf(self) -> torch.Tensor:
        return self.step_lpf.sum(0)

    @property
    def lpp(self) -> torch.Tensor:
        return self.step_lpp.sum(0)


@dataclass(frozen=True)
class HyperParams:
    """What the objectives take besides the batch."""

    beta: float  # inverse temperature; alpha = 1 / beta
    temper: float  # reinforce-kl: T for the authors' tempered weights, 1 for exact SNIS
    legacy_lambda: float  # legacy-rl's penalty weight

    @property
    def alpha(self) -> float:
        return 1.0 / self.beta


@dataclass(frozen=True)
class Objective:
    """An objective as the training loop, the command line, evaluation and the checkpoints know it."""

    name: str
    loss: Callable[[Batch, torch.Tensor | None, HyperParams], torch.Tensor]
    scalar: str | None  # the learned scalar's tensor name in a checkpoint: log Z (rtb), V(s0) (trust-pcl), or none
    explores: bool  # off-policy by default: trajectories come from the exploratory behaviour policy
    uses_beta: bool  # the target's beta enters the loss (legacy-rl's fixed point ignores it)
    help: str
    weighs_behaviour: bool = False  # the loss needs the behaviour policy's log-probability lb (importance weights)
    scalar_alpha_power: int = 0  # the learned scalar is alpha^k log Z (trust-pcl: V(s0) = alpha log Z, k = 1)
    loss_alpha_power: int = 0  # the loss is alpha^m times RTB's (trust-pcl: m = 2)
    scalar_label: str = ""  # how the progress line names the scalar

    def log_z(self, scalar: float, alpha: float) -> float:
        """log Z from the learned scalar (V(s0) / alpha for trust-pcl)."""
        return scalar / alpha**self.scalar_alpha_power

    def scalar_from_log_z(self, log_z: float, alpha: float) -> float:
        return log_z * alpha**self.scalar_alpha_power

    def gradient_scales(self, alpha: float) -> tuple[float, float]:
        """(policy, scalar): how much larger this loss's gradients are than RTB's at the same point.

        L = alpha^m L_RTB, and the scalar is alpha^k log Z, so dL/dphi = alpha^m dL_RTB/dphi and
        dL/dscalar = alpha^(m - k) dL_RTB/dlog Z (trust-pcl: alpha^2 and alpha).
        """
        m, k = self.loss_alpha_power, self.scalar_alpha_power
        return alpha**m, alpha ** (m - k)


def _rtb(b: Batch, log_z, hp: HyperParams) -> torch.Tensor:
    return rtb_loss(log_z, b.lpf, b.lpp, b.log_r, hp.beta)


def _trust_pcl(b: Batch, v_s0, hp: HyperParams) -> torch.Tensor:
    return trust_pcl_loss(v_s0, b.step_lpf, b.step_lpp, outcome_rewards(b.log_r, b.step_lpf.shape[0]), hp.alpha)


def _reinforce_kl(b: Batch, _, hp: HyperParams) -> torch.Tensor:
    return reinforce_kl_loss(b.lpf, b.lpp, b.log_r, hp.alpha, snis_weights(b.lpf, b.lb, hp.temper))


def _legacy_rl(b: Batch, _, hp: HyperParams) -> torch.Tensor:
    return legacy_rl_loss(b.lpf, b.lpp, b.log_r, hp.legacy_lambda)


def _vargrad(b: Batch, _, hp: HyperParams) -> torch.Tensor:
    return vargrad_loss(b.lpf, b.lpp, b.log_r, hp.beta)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("rtb", _rtb, "log_z", True, True, "Relative Trajectory Balance, learns log Z", scalar_label="logZ"),
        Objective(
            "trust-pcl",
            _trust_pcl,
            "v_soft_s0",
            True,
            True,
            "Trust-PCL: alpha^2 x RTB's loss, learns V(s0) = alpha log Z",
            scalar_alpha_power=1,
            loss_alpha_power=2,
            scalar_label="V",
        ),
        Objective(
            "reinforce-kl",
            _reinforce_kl,
            None,
            True,
            True,
            "REINFORCE with KL, reward log r, self-normalised importance weights off-policy",
            weighs_behaviour=True,
        ),
        Objective(
            "legacy-rl", _legacy_rl, None, False, False, "the RTB paper's RL baseline (reward r, on-policy; mis-specified on purpose)"
        ),
        Objective(
            "vargrad",
            _vargrad,
            None,
            True,
            True,
            "VarGrad: RTB with log Z replaced by its batch estimate (half the batch variance of lpf - lpp - beta log r)",
        ),
    )
}
DEFAULT_OBJECTIVE = "rtb"


@dataclass(frozen=True)
class Method:
    """A fine-tuning method as `rtbcli reproduce` compares it: an objective, on- or off-policy."""

    name: str  # row label and file stem
    algo: str  # its objective in OBJECTIVES
    on_policy: bool
    label: str  # figure panel title


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtb", "rtb", False, "RTB"),
        Method("trust-pcl", "trust-pcl", False, "Trust-PCL"),
        Method("reinforce-kl", "reinforce-kl", False, "REINFORCE-KL (off-policy)"),
        Method("reinforce-kl-on-policy", "reinforce-kl", True, "REINFORCE-KL (on-policy)"),
        Method("legacy-rl", "legacy-rl", True, "RL + KL, reward r (RTB paper)"),
        Method("vargrad", "vargrad", False, "VarGrad"),
    )
}
DEFAULT_METHODS = ["rtb", "trust-pcl", "reinforce-kl", "reinforce-kl-on-policy", "legacy-rl"]  # reproduce's, where a preset names none
