"""Off-policy tools of fine-tuning (Sendera et al. 2024; docs/maths.md#energy-mode): the replay
buffer alternated with forward batches, and local search (the paper's exploration schedule is
`rtbcli.trainer.exploration_linear`).

As gfn-diffusion's energy_sampling/train.py does with `--both_ways --sampling buffer
[--local_search]`, steps alternate by their (0-indexed) number `it`:

- even `it`: a forward batch from the behaviour policy (exploration on); its terminal states and
  their log r join the buffer (`OffPolicy.add`);
- odd `it`: a replayed batch (`OffPolicy.replay`): B states drawn from a buffer by rank, their
  trajectories drawn from the sampler's fixed backward process (`backward_sample`: the Brownian
  bridge pinned at 0 on the sampler's time grid, or a DDPM's noising process), and the
  objective on them, with lpf from a batched forward pass over the given trajectories (autograd),
  lpp from the frozen prior and log r from the buffer.
- local search (energy mode, where pi is known): at the replay steps with it % ls_every < 2,
  B states drawn from the buffer by rank run `ls_steps` MALA iterations toward pi
  (`rtbcli.energy.mala`, step size adapted toward acceptance 0.574); the states after burn-in go
  into a second buffer (the paper's `buffer_ls`), from which every replay step draws once local
  search is on.

Differences from the paper's code, on purpose: the local-search buffer receives every post-burn-in
chain state (a rejected proposal repeats the current state, the MCMC estimate of pi) instead of the
accepted proposals alone, whose number is random (a host sync); in energy mode both buffers rank by
log pi as the paper's (its log_reward is log pi), in fine-tuning mode by log r.

- `[finetune] prior_every = k` (no buffer): the steps with it % k == k - 1 train on a batch drawn
  from the frozen prior instead (`rtbcli.finetune.prior_step`). The target p_prior r^beta lies
  inside the prior's support, so these batches reach the parts of the target that on-policy steps
  (mode-seeking, as reverse KL) have let go of; every trajectory-balance objective's minimiser is
  still the target.

Replayed trajectories have no behaviour log-probability, so only the trajectory-balance objectives
(rtb, trust-pcl, vargrad) take them (`check_options`). Nothing here runs when the tools are off:
`OffPolicy` exists only in a run that uses them. Its draws use a generator of its own, saved with
the buffers' tensors in the run's state file (`state_dict`), so that a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .energy.buffer import ReplayBuffer
from .energy.langevin import LangevinDriftNet, LangevinSampler
from .energy.local_search import SWITCH_OFF, log_density_and_grad, mala
from .errors import InputError

LogDensity = Callable[[torch.Tensor], torch.Tensor]
REPLAY_OBJECTIVES = ("rtb", "trust-pcl", "vargrad")  # the trajectory-balance objectives: no behaviour log-probability needed


def uses_offpolicy(cfg) -> bool:
    """Whether a FinetuneSpec switches on a tool that `OffPolicy` runs (replay, local search)."""
    return bool(cfg.replay or cfg.local_search)


def check_options(cfg, algo: str, *, energy: bool, processes: int = 1) -> None:
    """Refuse what the off-policy options cannot do, each with a one-line InputError naming the fix."""
    if cfg.local_search and not energy:
        raise InputError(
            "local search needs the target density pi (energy mode: --prior brownian --target file.py:fn); "
            "a learned prior's marginal is unknown: switch local search off (--no-local-search)"
        )
    if cfg.local_search and not cfg.replay:
        raise InputError("local search feeds the replay buffer: switch replay on (--replay) or local search off (--no-local-search)")
    if cfg.replay and algo not in REPLAY_OBJECTIVES:
        raise InputError(
            f"{algo} cannot train on replayed trajectories (they have no behaviour log-probability): "
            f"use --algo {' / '.join(REPLAY_OBJECTIVES)}, or switch the replay buffer off (--no-replay)"
        )
    if cfg.prior_every and algo not in REPLAY_OBJECTIVES:
        raise InputError(
            f"{algo} cannot train on the prior's batches (it needs the behaviour policy's own log-probability): "
            f"use --algo {' / '.join(REPLAY_OBJECTIVES)}, or --prior-every 0"
        )
    if cfg.prior_resample > 1 and not cfg.prior_every:
        raise InputError("--prior-resample sets how the prior's batches are drawn: give --prior-every K too, or leave it out")
    if cfg.prior_every and cfg.replay:
        raise InputError(
            "the prior's batches and the replay buffer both take over steps of the loop: use one (--prior-every 0 or --no-replay)"
        )
    if processes > 1 and (cfg.replay or cfg.langevin or cfg.prior_every):
        raise InputError(
            "the replay buffer, the prior's batches and the Langevin parametrisation run in one process: "
            "run without torchrun, or switch them off"
        )


def check_gradient(log_density: LogDensity, x: torch.Tensor, what: str = SWITCH_OFF) -> None:
    """A one-line InputError if autograd cannot differentiate `log_density` at x (B, d), naming `what` switches it off."""
    log_density_and_grad(log_density, x, what)


class OffPolicy:
    """The buffers, the alternation and the local-search schedule of one run (module docstring).

    cfg: the run's FinetuneSpec; dim: the sampler's; backward(x, generator): trajectories
    (T + 1, B, d) of the sampler's reference backward process ending at x (its `backward_sample`);
    log_density: log pi in energy mode (ranking by it, and local search's target), else None; seed: the run's.
    """

    def __init__(
        self,
        cfg,
        dim: int,
        backward: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        *,
        log_density: LogDensity | None,
        seed: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        energy = log_density is not None
        self.cfg, self.backward, self.log_density = cfg, backward, log_density

        def buffer() -> ReplayBuffer:
            return ReplayBuffer(cfg.buffer_size, dim, device, dtype, cfg.buffer_rank_k, with_log_pi=energy, rank_by_log_pi=energy)

        self.buffer = buffer()
        self.ls_buffer = buffer() if cfg.local_search else None
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed((seed * 1_000_003 + 0x5EED) % (2**63))
        self.ls_step_size = torch.zeros((), dtype=dtype, device=device)  # the last local search's adapted step (for the log)
        self.ls_acceptance = torch.zeros((), dtype=dtype, device=device)

    def replays(self, it: int) -> bool:
        """Whether step `it` (0-indexed) trains on replayed trajectories (odd steps)."""
        return it % 2 == 1

    def searches(self, it: int) -> bool:
        """Whether replay step `it` runs local search first (the paper's it % ls_cycle < 2)."""
        return self.ls_buffer is not None and self.replays(it) and it % self.cfg.ls_every < 2

    def _log_pi(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.log_density is None:
            return None
        with torch.no_grad():
            return self.log_density(x)

    def add(self, x: torch.Tensor, log_r: torch.Tensor) -> None:
        """A forward batch's terminal states (B, d) and log r (B,) into the buffer."""
        self.buffer.add(x, log_r, self._log_pi(x))

    def local_search(self, n: int, log_reward: LogDensity) -> None:
        """MALA toward pi from n buffer states; the post-burn-in chain states into the local-search buffer."""
        assert self.log_density is not None and self.ls_buffer is not None
        x, _, _ = self.buffer.sample(n, self.gen)
        c = self.cfg
        res = mala(x, self.log_density, c.ls_steps, c.ls_burn_in, c.ls_step_size, keep_chain=True, generator=self.gen)
        assert res.chain is not None and res.chain_log_pi is not None  # keep_chain
        states = res.chain.reshape(-1, x.shape[-1])
        with torch.no_grad():
            log_r = log_reward(states)
        self.ls_buffer.add(states, log_r, res.chain_log_pi.reshape(-1))
        self.ls_step_size, self.ls_acceptance = res.step_size, res.acceptance

    def replay(self, it: int, n: int, log_reward: LogDensity) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay step `it`: (trajectories (T + 1, n, d) by the sampler's backward process, log r (n,)) of n
        states drawn by rank (from the local-search buffer when local search is on, after it ran if due)."""
        if self.searches(it):
            self.local_search(n, log_reward)
        source = self.ls_buffer if self.ls_buffer is not None else self.buffer
        x, log_r, _ = source.sample(n, self.gen)
        return self.backward(x, self.gen), log_r

    def log_record(self, replayed: bool) -> dict:
        """What a log record adds (at logging time: host reads allowed)."""
        rec: dict[str, bool | int | float] = {"replayed": replayed, "buffer": len(self.buffer)}
        if self.ls_buffer is not None:
            rec.update(ls_buffer=len(self.ls_buffer), ls_step_size=float(self.ls_step_size), ls_acceptance=float(self.ls_acceptance))
        return rec

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors (for the run's state file) that restore the buffers and the generator exactly."""
        d = {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}
        if self.ls_buffer is not None:
            d.update({f"ls_buffer.{k}": v for k, v in self.ls_buffer.state_dict().items()})
            d["ls_stats"] = torch.stack([self.ls_step_size, self.ls_acceptance])  # the last search's, for the log
        d["rng"] = self.gen.get_state()
        return d

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        if "buffer.meta" not in d or (self.ls_buffer is not None) != ("ls_buffer.meta" in d):
            raise InputError("the saved run's replay settings differ from this run's: resume with the run's own options")
        self.buffer.load_state_dict({k[7:]: v for k, v in d.items() if k.startswith("buffer.")})
        if self.ls_buffer is not None:
            self.ls_buffer.load_state_dict({k[10:]: v for k, v in d.items() if k.startswith("ls_buffer.")})
            if "ls_stats" in d:  # a state saved before they were kept: 0 until the next search, as then
                stats = d["ls_stats"].to(self.ls_step_size)
                self.ls_step_size, self.ls_acceptance = stats[0].clone(), stats[1].clone()
        self.gen.set_state(d["rng"])


# ---------------------------------------------------------------------- the Langevin parametrisation
def _no_target(x: torch.Tensor) -> torch.Tensor:
    raise InputError("this Langevin policy has no gradient target yet: set policy.net.log_density (log pi, or log r)")


def langevin_policy(
    spec, dim: int, seed: int, *, nn1: dict[str, torch.Tensor] | None = None, weights: dict[str, torch.Tensor] | None = None
) -> LangevinSampler:
    """A policy with the Langevin parametrisation (`rtbcli.energy.langevin`) for the sampler `spec`
    (a SamplerSpec): NN1 from `nn1` (a DiffusionSampler's state: the prior's drift) with a fresh NN2
    (zero last layer, bias 0.01), its random initial values drawn from `seed` alone; or every weight
    from `weights` (a Langevin policy's state, e.g. a finetuned checkpoint's). Its gradient target
    (`policy.net.log_density`) is set by the run: a checkpoint never holds code."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        p = LangevinSampler(
            dim, _no_target, spec.steps, spec.sigma2, spec.hidden, spec.time_features, spec.layers, time_power=spec.time_power
        )
    if weights is not None:
        p.load_state_dict(weights, strict=True)
    elif nn1 is not None:
        missing, unexpected = p.load_state_dict(nn1, strict=False)
        if unexpected or any(not k.startswith("net.scale.") for k in missing):
            raise InputError(f"the prior's drift does not fit the Langevin policy's NN1 (missing {missing}, unexpected {unexpected})")
    return p


def load_langevin_policy(
    checkpoint, log_density: LogDensity, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LangevinSampler:
    """A finetuned checkpoint's Langevin policy (`checkpoint`: a `rtbcli.checkpoint.Checkpoint`), with its gradient target given
    again: log pi in energy mode, else log r, differentiable (a checkpoint never holds code)."""
    if checkpoint.kind != "finetuned" or not checkpoint.preset.finetune.langevin:
        raise InputError(f"'{checkpoint.path}' holds no policy with the Langevin parametrisation: load it with Checkpoint.sampler")
    p = langevin_policy(checkpoint.preset.sampler, checkpoint.preset.dim, 0, weights=checkpoint.section("policy"))
    net = p.net
    assert isinstance(net, LangevinDriftNet)
    net.log_density = log_density
    return p.to(device=device, dtype=dtype)
