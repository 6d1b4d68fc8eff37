"""Evaluate a checkpoint against its target with the metrics of design.md §5.

The target of a prior checkpoint is its preset's prior data; the target of a finetuned one is
p_data(x) r(x)^beta / Z with the *data* distribution, so a poor prior shows in the numbers.

Log Z and its bounds, from N on-policy trajectories (lpb = sum_{i=1}^{T-1} log p_B(x_i | x_{i+1})):
- relative to the learned prior (finetuned only): lw = lpp + beta log r - lpf;
  elbo_prior = mean(lw) <= log Z_theta; log_z_is = log mean exp(lw); ess = (sum e^lw)^2 / (N sum e^2lw);
- relative to the data: lw' = log p_data(x_T) + beta log r + lpb - lpf; elbo = mean(lw') <= log Z_data;
  eubo = the same expression averaged over exact target samples with bridge trajectories >= log Z_data.
For a prior checkpoint the reward term is absent and log Z_data = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .metrics import effective_sample_size, log_mean_exp, per_mode_frequencies, sample_metrics
from .runtime import keep_freed_memory, make_generator
from .sampler import bridge_log_prob, bridge_sample
from .targets import Target, prior_target, tilted_target
from .tasks import Task

SAMPLE_KEYS = ("mode_coverage", "n_target_modes", "kl_mode", "off_target", "kl_hist")


@dataclass
class Evaluation:
    metrics: dict  # the JSON-ready report
    samples: torch.Tensor  # (n, d) model samples, CPU float32
    target_samples: torch.Tensor  # (n, d) exact target samples used for the floor and the EUBO
    target: Target


def target_of(ck: Checkpoint, beta: float | None = None) -> tuple[Task, Target]:
    """The checkpoint's task and target: p_data for a prior, p_data r^beta for a finetuned one.

    Giving `beta` scores any checkpoint (a prior included) against p_data r^beta.
    """
    task = Task(ck.preset, beta)
    if ck.kind == "finetuned" or beta is not None:
        return task, tilted_target(task, task.beta)
    return task, prior_target(task)


@torch.no_grad()
def _score(policy, prior, task: Task, traj: torch.Tensor, beta: float | None, chunk: int) -> dict:
    """lpf, lpb, log p_data, and with beta also log r and (if a prior is given) lpp, of trajectories
    (T+1, n, d), in chunks of trajectories."""
    out: dict[str, list] = {"lpf": [], "lpp": [], "lpb": [], "log_r": [], "log_data": []}
    for part in traj.split(chunk, dim=1):
        x = part[-1]
        out["lpf"].append(policy.log_prob(part).double())
        out["lpb"].append(bridge_log_prob(part.double(), policy.sigma2))
        out["log_data"].append(task.data_log_prob(x.double()))
        if beta is not None:
            out["log_r"].append(task.log_reward(x.double()))
        if prior is not None:
            out["lpp"].append(prior.log_prob(part).double())
    return {k: torch.cat(v).cpu() if v else None for k, v in out.items()}


@torch.no_grad()
def evaluate(ck: Checkpoint, n: int = 20_000, seed: int = 0, device: torch.device = torch.device("cpu"),
             chunk: int = 2_500, beta: float | None = None) -> Evaluation:
    """Sample n points from the checkpoint's policy and score them (see the module docstring).

    `beta` scores a prior checkpoint against the tilted target p_data r^beta (the starting
    point of a fine-tuning); the importance weights are then relative to the prior itself.
    """
    task, target = target_of(ck, beta)
    keep_freed_memory()
    finetuned = ck.kind == "finetuned" or beta is not None
    beta = task.beta if finetuned else None
    policy = ck.sampler("policy", device)
    prior = None  # the reference of the importance weights: the frozen prior, or a prior itself
    if finetuned:
        prior = ck.sampler("prior", device) if ck.kind == "finetuned" else policy
    gen = make_generator(seed, device)

    traj = policy.sample(n, 0.0, gen)
    x = traj[-1].float().cpu()
    s = _score(policy, prior, task, traj, beta, chunk)
    tilt = beta * s["log_r"] if finetuned else 0.0
    lw_data = s["log_data"] + tilt + s["lpb"] - s["lpf"]

    # Exact target samples: the floor of every sample metric, and the EUBO's bridge trajectories.
    tgen = make_generator(seed + 1, torch.device("cpu"))
    y = target.sample(n, tgen)
    back = bridge_sample(y.to(device=device, dtype=policy.net.state.weight.dtype), policy.steps, policy.sigma2, make_generator(seed + 2, device))
    sb = _score(policy, None, task, back, beta, chunk)
    lw_eubo = sb["log_data"] + (beta * sb["log_r"] if finetuned else 0.0) + sb["lpb"] - sb["lpf"]

    m = {"checkpoint": str(ck.path), "kind": ck.kind, "algo": ck.algo, "preset": ck.meta.get("preset"), "n": n, "seed": seed,
         "step": ck.step, "beta": beta, "target": target.description, "target_method": target.method}
    m.update(sample_metrics(x, target))
    m["floor"] = {k: v for k, v in sample_metrics(y.float(), target).items() if k in SAMPLE_KEYS}
    if finetuned:
        lw = s["lpp"] + tilt - s["lpf"]
        m["elbo_prior"], m["log_z_is"], m["ess"] = float(lw.mean()), log_mean_exp(lw), effective_sample_size(lw)
    else:
        m["elbo_prior"], m["log_z_is"], m["ess"] = None, log_mean_exp(lw_data), effective_sample_size(lw_data)
    m["log_z_is_data"] = log_mean_exp(lw_data)
    m["log_z_true"] = target.log_z if target.log_z_exact else None
    m["elbo"], m["eubo"] = float(lw_data.mean()), float(lw_eubo.mean())
    m["log_z_learned"], m["v_soft_s0"], m["alpha"] = None, None, None
    if ck.algo == "rtb":
        m["log_z_learned"] = ck.scalar("log_z")
    elif ck.algo == "trust-pcl":
        alpha = float(ck.meta["alpha"])
        m["v_soft_s0"], m["alpha"] = ck.scalar("v_soft_s0"), alpha
        m["log_z_learned"] = m["v_soft_s0"] / alpha
    freq = per_mode_frequencies(x, target)
    m["mode_frequencies"] = None if freq is None else [round(float(v), 6) for v in freq]
    m["mode_masses"] = None if target.cell_masses is None else [round(float(v), 6) for v in target.cell_masses]
    return Evaluation(m, x, y.float(), target)
