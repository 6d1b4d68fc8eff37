"""A DDPM / VP discretisation beside the pinned bridge: ancestral sampling with an epsilon-prediction network.

Timesteps follow diffusers' `DDPMScheduler` (N training steps t = 0..N-1, beta_t from a schedule,
abar_t = prod_{s <= t} (1 - beta_s)); K <= N sampling steps use its "leading" spacing,
tau_k = (K - 1 - k) * (N // K) for k = 0..K-1, each step going from tau_k to prev = tau_k - N // K
(abar_prev = 1 below 0). In rtbcli's trajectory order traj[0] = x_{tau_0} ~ N(0, I) and traj[K] is
the sample. One step, with beta' = 1 - abar_t / abar_prev (beta_t itself when K = N):

    x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)     (clipped to [-r, r] with clip_sample)
    mean   = sqrt(abar_prev) beta' / (1 - abar_t) x0_hat + sqrt(1 - beta') (1 - abar_prev) / (1 - abar_t) x_t
    x_prev ~ N(mean, var_k I)

so every transition's log-probability is exact and RTB / Trust-PCL / REINFORCE-KL apply unchanged
(the fine-tuned and the prior policy share var_k). The variance is positive at every step:

- `fixed_small` (diffusers' default): the posterior variance (1 - abar_prev) / (1 - abar_t) beta', which
  is 0 at the last step (where diffusers adds no noise): there rtbcli uses the step before's value
  (improved DDPM's clipping of beta~_1 to beta~_2); K = 1 uses beta'.
- `fixed_large`: beta'.

With `eta` (0 < eta <= 1) the steps are DDIM's instead (Song et al. 2021; diffusers' `DDIMScheduler.step` with
`use_clipped_model_output=True`): variance var_k = eta^2 beta~ (beta~ the posterior variance above, at the last step
the step before's, as for fixed_small; variance_type is then unused) and

    mean = sqrt(abar_prev) x0_hat + d (x_t - sqrt(abar_t) x0_hat),   d = sqrt((1 - abar_prev - eta^2 beta~) / (1 - abar_t))

(d from the unclipped beta~, so the last step's mean is x0_hat). eta = 1 is the DDPM fixed_small step exactly; a smaller
eta injects less noise per step, which moves the sampling chain toward the probability-flow ODE; each transition is
still Gaussian with a positive variance, so its log-probability stays exact (eta = 0 has none and is refused).

The backward (noising) process q(x_t | x_prev) = N(sqrt(1 - beta') x_prev, beta' I) of the same
steps (`noise_trajectories`, `backward_log_prob`) is the one an ELBO, pretraining or replay uses here.

Supported scheduler configurations (others are refused by name, `check_scheduler_config`):
`DDPMScheduler` with beta_schedule linear, scaled_linear or squaredcos_cap_v2, prediction_type
epsilon, variance_type fixed_small or fixed_large, clip_sample true or false (honoured),
thresholding false, timestep_spacing leading, steps_offset 0, rescale_betas_zero_snr false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .gaussian import centred_log_prob, gaussian_log_prob
from .sampler import DiffusionSampler

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCES = ("fixed_small", "fixed_large")
NO_GRAD_ROWS = 1024  # states per network pass when scoring without gradient (`DDPMSampler.means`)


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule and its sampling steps (the module docstring)."""

    train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    variance_type: str = "fixed_small"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    sampling_steps: int | None = None  # K; None: every training step
    eta: float | None = None  # DDIM's eta in (0, 1]; None: DDPM ancestral steps of variance_type

    def __post_init__(self):
        if self.beta_schedule not in SCHEDULES:
            raise InputError(f"beta_schedule '{self.beta_schedule}' is not supported: use one of {', '.join(SCHEDULES)}")
        if self.variance_type not in VARIANCES:
            raise InputError(f"variance_type '{self.variance_type}' is not supported: use one of {', '.join(VARIANCES)}")
        if self.eta is not None and not 0 < self.eta <= 1:
            raise InputError(f"eta {self.eta:g} must be in (0, 1]: 1 is the DDPM step, smaller adds less noise (0 has no density)")
        k = self.steps
        if not 1 <= k <= self.train_steps:
            raise InputError(f"sampling steps {k} must be between 1 and the {self.train_steps} training steps")

    @property
    def steps(self) -> int:
        return self.train_steps if self.sampling_steps is None else self.sampling_steps

    def betas(self) -> torch.Tensor:
        """beta_0..beta_{N-1} in float64, as diffusers computes them."""
        n = self.train_steps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)

    def tables(self) -> dict[str, torch.Tensor]:
        """Per sampling step k (float64, (K,)): the timestep, sqrt(abar_t), sqrt(1 - abar_t), the mean's two
        coefficients, the transition variance, and the noising step's sqrt(1 - beta') and beta'."""
        abar = torch.cumprod(1 - self.betas(), 0)
        k, ratio = self.steps, self.train_steps // self.steps
        t = torch.arange(k - 1, -1, -1, dtype=torch.long) * ratio
        prev = t - ratio
        ab_t = abar[t]
        ab_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(ab_t))
        beta = 1 - ab_t / ab_prev
        c0 = ab_prev.sqrt() * beta / (1 - ab_t)
        ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
        small = (1 - ab_prev) / (1 - ab_t) * beta  # beta~: 0 at the last step
        if self.eta is not None:  # DDIM: var = eta^2 beta~, the direction's coefficient d from the unclipped variance
            ct = ((1 - ab_prev - self.eta**2 * small).clamp(min=0) / (1 - ab_t)).sqrt()
            c0 = ab_prev.sqrt() - ab_t.sqrt() * ct
            var = self.eta**2 * small
        elif self.variance_type == "fixed_large":
            var = beta.clone()
        else:
            var = small.clone()
        if self.eta is not None or self.variance_type != "fixed_large":
            var[-1] = var[-2] if k > 1 else beta[-1]  # 0 at the last step: the step before's (positive) value
        return {
            "timesteps": t,
            "sqrt_abar": ab_t.sqrt(),
            "sqrt_1m_abar": (1 - ab_t).sqrt(),
            "c0": c0,
            "ct": ct,
            "var": var,
            "q_scale": (1 - beta).sqrt(),
            "q_var": beta,
        }


UNSUPPORTED = {  # scheduler config key -> the values rtbcli reproduces
    "prediction_type": ("epsilon",),
    "thresholding": (False,),
    "timestep_spacing": ("leading",),
    "steps_offset": (0,),
    "rescale_betas_zero_snr": (False,),
    "trained_betas": (None,),
}


def schedule_from_config(
    config: dict, sampling_steps: int | None = None, where: str = "the scheduler", eta: float | None = None
) -> Schedule:
    """A `Schedule` from a diffusers DDPMScheduler config (scheduler_config.json); an InputError names what is not supported."""
    cls = config.get("_class_name", "DDPMScheduler")
    if cls != "DDPMScheduler":
        raise InputError(f"{where} is a {cls}: rtbcli supports DDPMScheduler (save the model with a DDPMScheduler config)")
    for key, ok in UNSUPPORTED.items():
        if key in config and config[key] not in ok:
            raise InputError(f"{where} has {key} = {config[key]!r}: rtbcli supports {key} = {' or '.join(repr(v) for v in ok)}")

    def number(key: str, default, kind):
        value = config.get(key, default)
        try:
            if isinstance(value, bool) or value is None:
                raise TypeError
            out = kind(value)
        except (TypeError, ValueError):
            raise InputError(f"{where} has {key} = {value!r}: give a number") from None
        if not math.isfinite(out):
            raise InputError(f"{where} has {key} = {value!r}: give a finite number")
        return out

    schedule = Schedule(
        train_steps=number("num_train_timesteps", 1000, int),
        beta_start=number("beta_start", 1e-4, float),
        beta_end=number("beta_end", 0.02, float),
        beta_schedule=str(config.get("beta_schedule", "linear")),
        variance_type=str(config.get("variance_type", "fixed_small")),
        clip_sample=bool(config.get("clip_sample", True)),
        clip_sample_range=number("clip_sample_range", 1.0, float),
        sampling_steps=sampling_steps,
        eta=eta,
    )
    betas = schedule.betas()
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise InputError(
            f"{where} gives betas outside (0, 1) (beta_start {schedule.beta_start:g}, beta_end {schedule.beta_end:g}): "
            "each step's noise variance must be between 0 and 1"
        )
    return schedule


def check_tail_steps(tail: int, steps: int) -> None:
    """`prior_tail_steps` must leave at least one of the `steps` sampling steps to the policy."""
    if not 0 <= tail < steps:
        raise InputError(f"prior_tail_steps {tail} must be between 0 and the {steps} sampling steps minus 1")


class DDPMSampler(DiffusionSampler):
    """Ancestral DDPM sampling with an epsilon network `net(x (B, d), timesteps (B,) long) -> eps (B, d)`.

    The same interface as the pinned-bridge samplers (`sample`, `means`, `step_log_probs`, `log_prob`,
    `step_var`, here a (K, 1) tensor: one variance per step), so `rtbcli.rollout` and the objectives
    use it unchanged (plain loop, autograd)."""

    def __init__(self, dim: int, schedule: Schedule, net: nn.Module):
        nn.Module.__init__(self)
        self.dim, self.schedule, self.steps = dim, schedule, schedule.steps
        self.sigma2 = 1.0  # x at the start ~ N(0, I)
        self.net = net  # type: ignore[assignment]  # an epsilon network, not a DriftNet
        self.in_folder = False  # the weights are a model folder's (a frozen prior): a checkpoint saves none of them
        self.scheduler_config: dict = {}  # a diffusers model's scheduler config, for a merged folder
        self._tables = schedule.tables()  # float64 on the CPU; `_t` keeps a copy per device and dtype
        self._cache: dict[tuple, torch.Tensor] = {}
        self.tail_steps = 0  # the last steps that keep the prior's epsilon (`keep_prior_tail`)
        self.tail: nn.Module | None = None  # the prior's frozen epsilon network for them (None under LoRA: the adapters off)

    def keep_prior_tail(self, steps: int, base: nn.Module | None = None) -> None:
        """The last `steps` sampling steps use the prior's epsilon, without gradient: `base` (a frozen copy of the prior's
        network), or with None this network with its LoRA adapters switched off. There the policy's transitions are the
        prior's, so they add nothing to lpf - lpp; at those steps the variance is ~1e-5 (fixed_small's last two), where
        any change of the mean that the adapters make for the earlier steps costs |change|^2 / (2 var) nats."""
        check_tail_steps(steps, self.steps)
        if steps and base is None and not hasattr(getattr(self.net, "unet", None), "disable_adapter"):
            raise InputError("prior_tail_steps needs the prior's network: LoRA adapters to switch off, or a frozen copy")
        self.tail_steps = steps
        if base is not None:
            self.tail = base.requires_grad_(False)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: nothing for a model folder's own weights, the adapters alone under LoRA, else everything."""
        if self.in_folder:
            return {}
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("tail.")}
        lora = {k: v for k, v in state.items() if "lora_" in k}
        return lora or state

    @property
    def anchor(self) -> torch.Tensor:
        for p in self.net.parameters():
            return p
        raise InputError("the epsilon network has no parameters")

    def _t(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """A schedule table (K,) in the dtype and on the device of `like` (default: the network's)."""
        w = self.anchor if like is None else like
        dtype = torch.long if name == "timesteps" else w.dtype
        key = (name, w.device, dtype)
        if key not in self._cache:
            self._cache[key] = self._tables[name].to(device=w.device, dtype=dtype)
        return self._cache[key]

    @property
    def step_var(self) -> torch.Tensor:
        """The variance of every step, (K, 1) (broadcast over the batch)."""
        return self._t("var")[:, None]

    def eps(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The network's epsilon at states x (N, d) and sampling-step indices k (N,)."""
        out = self.net(x, self._t("timesteps")[k])
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"the epsilon network returned {got} for x of shape {tuple(x.shape)}: return epsilon, shape (B, d)")
        return out

    def prior_eps(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The prior's epsilon at states x (N, d) and steps k (N,), without gradient (`keep_prior_tail`)."""
        with torch.no_grad():
            if self.tail is not None:
                return self.tail(x, self._t("timesteps")[k])
            unet: Any = self.net.unet  # a peft model (`keep_prior_tail` checked it)
            with unet.disable_adapter():
                return self.eps(x, k)

    def mean_at(self, x: torch.Tensor, k: torch.Tensor, prior: bool = False) -> torch.Tensor:
        """The transition mean from states x (N, d) at sampling steps k (N,) (`prior`: with the prior's epsilon)."""
        eps = self.prior_eps(x, k) if prior else self.eps(x, k)
        x0 = (x - self._t("sqrt_1m_abar")[k, None] * eps) / self._t("sqrt_abar")[k, None]
        if self.schedule.clip_sample:
            r = self.schedule.clip_sample_range
            x0 = x0.clamp(-r, r)
        return self._t("c0")[k, None] * x0 + self._t("ct")[k, None] * x

    def means(self, traj: torch.Tensor) -> torch.Tensor:
        """The means of all K*B transitions: (K, B, d). One batched pass when autograd keeps its graph (training);
        without gradient (scoring), passes of at most NO_GRAD_ROWS states, whose activations stay small enough for
        the allocator to reuse (one pass over all of evaluate's 125,000 states maps GBs afresh: 3x the time, mostly
        page faults)."""
        x, head = traj[:-1], self.steps - self.tail_steps
        if self.tail_steps == 0:
            return self._means(x, 0, False)
        return torch.cat([self._means(x[:head], 0, False), self._means(x[head:], head, True)])

    def _means(self, x: torch.Tensor, first: int, prior: bool) -> torch.Tensor:
        """`means` of the states x (K', B, d) of steps first..first + K' - 1."""
        K, B, d = x.shape
        flat, k = x.reshape(K * B, d), torch.arange(first, first + K, device=x.device).repeat_interleave(B)
        if (torch.is_grad_enabled() and not prior) or K * B <= NO_GRAD_ROWS:
            return self.mean_at(flat, k, prior).reshape(K, B, d)
        return torch.cat([self.mean_at(a, b, prior) for a, b in zip(flat.split(NO_GRAD_ROWS), k.split(NO_GRAD_ROWS))]).reshape(K, B, d)

    def step_log_probs(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        return gaussian_log_prob(traj[1:], self.means(traj), self.step_var + extra_var)

    def log_prob(self, traj: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        """log N(traj[0]; 0, I) + the K transitions' log-probabilities: (B,). The start's term is the same for every
        policy of the schedule (it cancels in the objectives, which use `step_log_probs`)."""
        return self.start_log_prob(traj) + self.step_log_probs(traj, extra_var).sum(0)

    def start_log_prob(self, traj: torch.Tensor) -> torch.Tensor:
        """log N(traj[0]; 0, I): shared by every policy of this schedule (it cancels in the objectives)."""
        return centred_log_prob(traj[0], 1.0)

    @torch.no_grad()
    def sample(self, n: int, extra_var: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n trajectories (K + 1, n, d): traj[0] ~ N(0, I), then K ancestral steps of variance var_k + extra_var."""
        w = self.anchor
        traj = torch.randn(self.steps + 1, n, self.dim, generator=generator, dtype=w.dtype, device=w.device)
        traj[1:].mul_((self.step_var + extra_var).sqrt()[:, :, None])
        for k in range(self.steps):
            kk = torch.full((n,), k, dtype=torch.long, device=w.device)
            traj[k + 1].add_(self.mean_at(traj[k], kk, k >= self.steps - self.tail_steps))
        return traj

    def run(self, *args, **kwargs):  # the fused loop assumes DriftNet
        raise NotImplementedError("DDPMSampler has no fused run(); use sample()")

    def drift(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a DDPM sampler is pretrained with the epsilon loss, not the bridge's drift regression")

    # ------------------------------------------------------------------ the noising process
    @torch.no_grad()
    def noise_trajectories(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Trajectories (K + 1, B, d) of the noising process from data x0 (traj[K] = x0), in sampling order."""
        K = self.steps
        traj = torch.empty(K + 1, *x0.shape, dtype=x0.dtype, device=x0.device)
        traj[K] = x0
        z = torch.randn(K, *x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        scale, var = self._t("q_scale", x0), self._t("q_var", x0)
        for k in range(K - 1, -1, -1):
            traj[k] = scale[k] * traj[k + 1] + var[k].sqrt() * z[k]
        return traj

    def backward_log_prob(self, traj: torch.Tensor) -> torch.Tensor:
        """sum_k log q(traj[k] | traj[k + 1]) over the K noising steps: (B,)."""
        scale, var = self._t("q_scale", traj), self._t("q_var", traj)
        return gaussian_log_prob(traj[:-1], scale[:, None, None] * traj[1:], var[:, None]).sum(0)

    def backward_sample(self, x_end: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reference backward process of this sampler is its noising process."""
        return self.noise_trajectories(x_end, generator)

    def elbo(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p_theta(tau) (its start included) - log q(tau | x0) on noising trajectories: a lower bound on log p_theta(x0), (B,)."""
        traj = self.noise_trajectories(x0, generator)
        return self.log_prob(traj) - self.backward_log_prob(traj)
