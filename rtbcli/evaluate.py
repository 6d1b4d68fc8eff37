"""Evaluate a checkpoint against its target, in three tiers (docs/maths.md#metrics).

The target of a prior checkpoint is its preset's prior data; the target of a finetuned one is
p_data(x) r(x)^beta / Z with the *data* distribution, so a poor prior shows in the numbers.
Each tier is reported when it applies (`rtbcli.metric_registry.METRICS` lists every key):

1. always (where there is a reward): the mean and quantiles of log r over the samples; for a
   finetuned sampler the importance weights relative to its prior, lw = lpp + beta log r - lpf:
   ELBO_prior = mean(lw), log Z_IS = log mean exp(lw) and its ESS, and the path KL to the prior
   mean(lpf - lpp) (an upper bound on the KL between the two samplers' marginals);
2. with reference samples of the target (`reference=`, the preset's `evaluate.reference`, or
   what the target provides: exact samples, data rows, held-out images): sliced-W2 and MMD^2
   beside their floor (two disjoint halves of the reference, at the compared size);
3. where the target is known exactly: mode coverage, mode-weight KL, off-target mass and
   histogram KL beside the exact-sampler floor, and with the data density log Z and its
   sandwich: lw' = log p_data(x_T) + beta log r + lpb - lpf, ELBO = mean(lw') <= log Z_data <= EUBO
   (the same expression over exact target samples with bridge trajectories).

Loading a checkpoint never imports code: a finetuned checkpoint trained with a Python reward is
scored only when the reward is named again (`reward=`), unless it ships with rtbcli.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import Preset, PythonRewardSpec
from .data import load_array
from .energy.metrics import log_weights, require_pot, table_from_weights, w2_exact
from .energy.options import check_same_dim, with_target
from .errors import InputError
from .metric_registry import floor_keys
from .metrics import effective_sample_size, log_mean_exp, per_mode_frequencies, reference_comparison, sample_metrics
from .objectives import OBJECTIVES
from .rewards import check_reward_output, parse_reference
from .runtime import make_generator
from .sampler import DiffusionSampler
from .suites import prior_target, suite_of, tilted_target
from .targets import Target
from .tasks import Task

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MIN_COMPARED = 4  # reference rows that tier 2 needs: two halves of at least 2 (`metrics.reference_comparison`)
W2_MAX = 2_000  # W2 (exact optimal transport, n^2 memory and more time) compares at most this many samples of each side
MAX_FLOATS = 1 << 27  # trajectories are drawn in chunks of at most this many numbers


@dataclass
class Evaluation:
    metrics: dict  # the JSON-ready report
    samples: torch.Tensor  # (n, d) model samples, CPU float32
    target_samples: torch.Tensor | None  # (n, d) exact target samples (floors, EUBO), where the target has them
    target: Target
    task: Task
    reference: torch.Tensor | None = None  # the reference samples of tier 2


def with_reward(preset: Preset, reward: str | None = None, kwargs: dict | None = None) -> Preset:
    """The preset with its reward named again, or replaced (`--reward`, `--reward-arg`).

    Naming the recorded reference keeps the recorded kwargs unless new ones are given.
    """
    if reward is None and not kwargs:
        return preset
    old = preset.reward if isinstance(preset.reward, PythonRewardSpec) else None
    if reward is None:
        if old is None:
            raise InputError(
                "--reward-arg sets a Python reward's keyword arguments: the preset's reward is not a Python reward; give --reward too"
            )
        reward = old.function
    parse_reference(reward)  # a malformed reference is named as such
    spec = PythonRewardSpec.model_validate({"type": "python", "function": reward}, context={"base_dir": Path.cwd()})
    same = old if old is not None and old.function == spec.function else None  # the recorded reward, named again
    merged = {**(same.kwargs if same is not None else {}), **(kwargs or {})}
    data = preset.model_dump()
    data["reward"] = {"type": "python", "function": spec.function, "kwargs": merged, "sha256": same.sha256 if same is not None else None}
    return Preset.model_validate(data)


def target_of(
    ck: Checkpoint, beta: float | None = None, preset: Preset | None = None, named: bool = False, device: torch.device = torch.device("cpu")
) -> tuple[Task, Target]:
    """The checkpoint's task and target: p_data for a prior, p_data r^beta for a finetuned one.

    Giving `beta` scores any checkpoint (a prior included) against p_data r^beta. `named`: the
    user named the reward again, so a Python reward may be imported. The reward is called on `device`.
    """
    task = Task(preset or ck.preset, beta, allow_import=named)
    task.device = device
    if ck.kind == "finetuned" or beta is not None:
        if task.reward is None:
            raise InputError("scoring against p_data r^beta needs a reward: give --reward path/to/rewards.py:function")
        if task.reward_unnamed:
            task.reward(torch.zeros(1, task.dim))  # raises the one-line message naming the reference to pass (--reward, --target)
        return task, tilted_target(task, task.beta)
    return task, prior_target(task)


def _chunks(n: int, steps: int, dim: int) -> list[int]:
    size = max(1, MAX_FLOATS // ((steps + 1) * dim))
    return [min(size, n - i) for i in range(0, n, size)]


@torch.no_grad()
def _score(policy, prior, task: Task, traj: torch.Tensor, want_reward: bool, chunk: int) -> dict:
    """Per-trajectory lpf, and where they apply lpp, log r, lpb and log p_data(x_T), in chunks."""
    out: dict[str, list] = {"lpf": [], "lpp": [], "lpb": [], "log_r": [], "log_data": []}
    for part in traj.split(chunk, dim=1):
        x = part[-1]
        lpf = policy.log_prob(part).double()
        out["lpf"].append(lpf)
        if task.data_is_exact:
            out["lpb"].append(policy.backward_log_prob(part.double()))
            out["log_data"].append(task.data_log_prob(x.double()))
        if want_reward:
            out["log_r"].append(task.log_reward(x).double())
        if prior is not None:  # a prior scored against p_data r^beta is its own reference: the same pass, not a second
            out["lpp"].append(lpf if prior is policy else prior.log_prob(part).double())
    return {k: torch.cat(v).cpu() if v else None for k, v in out.items()}


def _reference(arg, ck: Checkpoint, target: Target, tilted: bool) -> tuple[torch.Tensor | None, str]:
    """Reference samples: given ones; else the preset's `evaluate.reference`, which samples the tilted target
    (a prior scored against its own data keeps the data's); else the target's own."""
    if isinstance(arg, torch.Tensor):
        return arg.double().cpu(), f"{arg.shape[0]:,} given reference samples"
    path = arg or (ck.preset.evaluate.reference if tilted else None)
    if path is not None:
        rows, _ = load_array(path)
        if rows.shape[1] != ck.preset.dim:
            raise InputError(
                f"reference file '{path}' has dimension {rows.shape[1]}, the checkpoint samples dimension {ck.preset.dim}: "
                f"give reference samples of the target"
            )
        return rows, f"{rows.shape[0]:,} rows of {Path(path).name}"
    return target.reference, target.reference_note


@dataclass
class _Run:
    """What every tier reads: the task, its target, the two samplers and the per-trajectory scores."""

    ck: Checkpoint
    task: Task
    target: Target
    policy: DiffusionSampler
    finetuned: bool  # scored against p_data r^beta (a finetuned checkpoint, or a prior given beta)
    use_reward: bool  # the reward may be called
    beta: float | None
    n: int
    seed: int
    device: torch.device
    chunk: int
    scores: dict = field(default_factory=dict)  # lpf, lpp, lpb, log_r, log_data per trajectory (CPU float64); set by _sample_and_score


@torch.no_grad()
def evaluate(
    ck: Checkpoint,
    n: int = 20_000,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    chunk: int = 2_500,
    beta: float | None = None,
    reward: str | None = None,
    reward_kwargs: dict | None = None,
    reference: str | Path | torch.Tensor | None = None,
    target: str | None = None,
    target_kwargs: dict | None = None,
) -> Evaluation:
    """Sample n points from the checkpoint's policy and score them (see the module docstring).

    `beta` scores a prior checkpoint against the tilted target p_data r^beta (the starting point
    of a fine-tuning); the importance weights are then relative to the prior itself. `reward`
    names a checkpoint's Python reward again (or another one); `reference` gives reference
    samples of the target (a data file or an (m, d) tensor). `target` names an energy-mode
    checkpoint's target again (`target_kwargs` its keyword arguments), as `reward` does a reward.
    """
    # only naming the reward (`reward=`) allows importing it: new kwargs alone change its arguments, not that
    preset = with_target(with_reward(ck.preset, reward, reward_kwargs), target, target_kwargs)
    if preset.energy:
        check_same_dim(preset, ck.preset)
    task, tgt = target_of(ck, beta, preset, named=reward is not None or target is not None, device=device)
    finetuned = ck.kind == "finetuned" or beta is not None
    use_reward = task.reward is not None and not task.reward_unnamed
    if task.energy is not None and tgt.sample is not None:
        require_pot()  # W2 needs POT: say so before sampling
    run = _Run(ck, task, tgt, _policy(ck, task, device), finetuned, use_reward, task.beta if finetuned else None, n, seed, device, chunk)
    x = _sample_and_score(run)
    m = {
        "checkpoint": str(ck.path),
        "kind": ck.kind,
        "algo": ck.algo,
        "preset": ck.meta.get("preset"),
        "suite": suite_of(task).name,
        "dim": task.dim,
        "n": n,
        "seed": seed,
        "step": ck.step,
        "beta": run.beta,
        "target": tgt.description,
        "target_method": tgt.method,
    }
    lw = _importance_weights(run, m)
    # exact target samples: the floor of every sample metric, and the EUBO's bridge trajectories
    y = tgt.sample(n, make_generator(seed + 1, torch.device("cpu"))) if tgt.sample is not None else None
    ref = _reference_comparison(run, m, x, y, reference)
    _mode_metrics(run, m, x, y)
    (_energy_table if task.energy is not None else _data_log_z)(run, m, x, y)
    m.update(suite_of(task).extra_metrics(task, x, tgt, finetuned, seed, lw))
    return Evaluation(m, x, None if y is None else y.float(), tgt, task, ref)


def sampling_policy(ck: Checkpoint, device: torch.device, reward: str | None = None, target: str | None = None) -> DiffusionSampler:
    """The policy `rtbcli sample` draws from: the checkpoint's own, or, with the Langevin parametrisation, one given its
    gradient target again (a shipped target needs no naming; a user's reward or target is named with `reward`/`target`)."""
    if not (ck.kind == "finetuned" and ck.preset.finetune.langevin):
        return ck.sampler("policy", device)
    preset = with_target(with_reward(ck.preset, reward, None), target, None)
    return _policy(ck, Task(preset, allow_import=reward is not None or target is not None), device)


def _policy(ck: Checkpoint, task: Task, device: torch.device):
    """The checkpoint's policy; one with the Langevin parametrisation gets its gradient target again (energy mode:
    log pi; else log r, `rtbcli.finetune`'s differentiable reward), since a checkpoint holds no code."""
    if not (ck.kind == "finetuned" and ck.preset.finetune.langevin):
        return ck.sampler("policy", device)
    from .finetune import _differentiable_log_reward
    from .offpolicy import load_langevin_policy

    if task.reward_unnamed:
        task.reward(torch.zeros(1, task.dim))  # raises the one-line message naming the reference to pass
    target = task.energy.log_density if task.energy is not None else _differentiable_log_reward(task)
    return load_langevin_policy(ck, target, device)


def _sample_and_score(run: _Run) -> torch.Tensor:
    """Draw run.n trajectories of the policy in chunks, keep their x_T (CPU float32) and set run.scores."""
    prior = None  # the reference of the importance weights: the frozen prior, or a prior itself
    if run.finetuned:
        prior = run.ck.sampler("prior", run.device) if run.ck.kind == "finetuned" else run.policy
    policy, gen = run.policy, make_generator(run.seed, run.device)
    if run.use_reward:
        check_reward_output(
            run.task.reward,
            policy.sample(min(run.n, 256), 0.0, make_generator(run.seed + 7919, run.device))[-1],
            "samples of the checkpoint",
        )
    parts, xs = [], []
    for size in _chunks(run.n, policy.steps, policy.dim):
        traj = policy.sample(size, 0.0, gen)
        xs.append(traj[-1].float().cpu())
        parts.append(_score(policy, prior, run.task, traj, run.use_reward, run.chunk))
        del traj
    run.scores = {k: (torch.cat([p[k] for p in parts]) if parts[0][k] is not None else None) for k in parts[0]}
    return torch.cat(xs)


def _importance_weights(run: _Run, m: dict) -> torch.Tensor | None:
    """Tier 1: log r's mean and quantiles; lw = lpp + beta log r - lpf relative to the prior (elbo_prior, log_z_is,
    ess_fraction, path_kl); the learned scalar. Returns lw where it applies."""
    s, lw = run.scores, None
    if run.use_reward:
        lr = s["log_r"]
        m["log_r_mean"] = float(lr.mean())
        q = torch.quantile(lr[torch.isfinite(lr)], torch.tensor(QUANTILES, dtype=torch.float64)) if torch.isfinite(lr).any() else None
        for p, v in zip(QUANTILES, q.tolist() if q is not None else [math.nan] * len(QUANTILES)):
            m[f"log_r_q{round(100 * p):02d}"] = v
    if run.finetuned and run.use_reward:
        lw = s["lpp"] + run.beta * s["log_r"] - s["lpf"]
        m["elbo_prior"], m["log_z_is"], m["ess_fraction"] = float(lw.mean()), log_mean_exp(lw), effective_sample_size(lw)
        m["path_kl"] = float((s["lpf"] - s["lpp"]).mean())
    log_z = run.ck.learned_log_z()
    if log_z is not None:
        m["log_z_learned"] = log_z
        obj = OBJECTIVES[run.ck.algo or ""]  # learned_log_z is None unless algo names an objective
        if (
            obj.scalar is not None and obj.scalar_alpha_power
        ):  # a scalar other than log Z itself (trust-pcl's V(s0) = alpha log Z), beside its alpha
            m[obj.scalar], m["alpha"] = run.ck.scalar(obj.scalar), run.ck.meta_float("alpha", 1.0)
    return lw


def _reference_comparison(run: _Run, m: dict, x: torch.Tensor, y: torch.Tensor | None, reference) -> torch.Tensor | None:
    """Tier 2: sliced-W2 and MMD^2 beside their floor against the reference samples (given, the preset's, the target's,
    or the exact target samples y). Returns the reference used."""
    ref, note = _reference(reference, run.ck, run.target, run.finetuned)
    if ref is None and y is not None:
        ref, note = y, f"{run.n:,} exact target samples"
    finite_rows = 0 if ref is None else int(torch.isfinite(ref).all(dim=1).sum())
    if ref is not None and finite_rows < MIN_COMPARED:
        if reference is not None:  # given by the user
            raise InputError(
                f"the reference has {finite_rows} finite rows: sliced-W2 and MMD^2 beside their floor need at least "
                f"{MIN_COMPARED} (two halves of 2): give more reference samples"
            )
        ref, note = None, f"{note}: too few for sliced-W2 and MMD^2 (at least {MIN_COMPARED} rows)"
    if ref is not None:
        m.update(reference_comparison(x, ref, seed=run.seed))
    if ref is not None or note:
        m["reference"] = note
    return ref


def _mode_metrics(run: _Run, m: dict, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """Tier 3: mode coverage, mode-weight KL, off-target mass and histogram KL, beside the exact sampler's (`floor`), and
    the per-mode frequencies (`cells`)."""
    target = run.target
    if target.cell_masses is None and target.bin_masses is None:
        return
    m.update(sample_metrics(x, target))
    if y is not None:
        m["floor"] = {k: v for k, v in sample_metrics(y.float(), target).items() if k in floor_keys()}
    freq = per_mode_frequencies(x, target)
    if freq is not None and target.cell_masses is not None and target.cell_means is not None:
        modes = [
            {"mean": [round(v, 6) for v in mu], "target_mass": round(float(p), 6), "frequency": round(float(f), 6)}
            for mu, p, f in zip(target.cell_means.tolist(), target.cell_masses[:-1], freq[:-1])
        ]
        m["cells"] = {
            "radius": target.radius,
            "modes": modes,
            "elsewhere": {"target_mass": round(float(target.cell_masses[-1]), 6), "frequency": round(float(freq[-1]), 6)},
        }


def _data_log_z(run: _Run, m: dict, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """Tier 3: log Z_data by importance sampling against the data density, the ELBO and (over exact target samples with
    bridge trajectories) the EUBO; for a prior, log_z_is and ess_fraction are these data-relative ones."""
    s, task, finetuned, beta = run.scores, run.task, run.finetuned, run.beta
    if not task.data_is_exact or not (run.use_reward or not finetuned):
        return
    tilt = beta * s["log_r"] if finetuned else 0.0
    lw_data = s["log_data"] + tilt + s["lpb"] - s["lpf"]
    if not finetuned:
        m["log_z_is"], m["ess_fraction"] = log_mean_exp(lw_data), effective_sample_size(lw_data)
    m["log_z_is_data"] = log_mean_exp(lw_data)
    m["log_z_true"] = run.target.log_z if run.target.log_z_exact else None
    m["elbo"] = float(lw_data.mean())
    if y is not None:
        policy = run.policy
        back = policy.backward_sample(y.to(device=run.device, dtype=policy.anchor.dtype), make_generator(run.seed + 2, run.device))
        sb = _score(policy, None, task, back, finetuned, run.chunk)
        m["eubo"] = float((sb["log_data"] + (beta * sb["log_r"] if finetuned else 0.0) + sb["lpb"] - sb["lpf"]).mean())


def _log_pi(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """log pi of the energy target on points x (n, d), in float64 chunks on the run's device, returned on the CPU."""
    energy = run.task.energy
    assert energy is not None
    return torch.cat([energy.log_density(p.to(run.device, torch.float64)).double().cpu() for p in x.split(run.chunk)])


def _energy_table(run: _Run, m: dict, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """Energy mode, Table 1 of Sendera et al. 2024 (`rtbcli.energy.metrics.table_from_weights`): on the model's
    trajectories lw = log pi(x_T) + lpb - lpf gives elbo and log_z_rw, and with the true log Z the derived delta_log_z
    and delta_log_z_rw; over the exact samples y with bridge trajectories, eubo; W2 between the first W2_MAX of the
    model's and of the exact samples (`n_w2`), beside its floor (`w2_floor`: two independent sets of exact samples)."""
    s, energy, policy = run.scores, run.task.energy, run.policy
    assert energy is not None
    log_pi = _log_pi(run, x)
    lw = log_weights(log_pi, s["lpb"], s["lpf"])
    m["log_pi_mean"] = float(log_pi[torch.isfinite(log_pi)].mean())
    lw_t = None
    if y is not None:
        back = policy.backward_sample(y.to(device=run.device, dtype=policy.anchor.dtype), make_generator(run.seed + 2, run.device))
        sb = _score(policy, None, run.task, back, False, run.chunk)
        log_pi_y = _log_pi(run, y)
        m["log_pi_mean_exact"] = float(log_pi_y.mean())
        lw_t = log_weights(log_pi_y, sb["lpb"], sb["lpf"])
    k = min(run.n, W2_MAX)
    m["log_z_true"] = energy.log_z  # None for a user's target: no exact log Z
    m.update(table_from_weights(lw, energy.log_z, lw_t, x[:k], None if y is None else y[:k]))
    if y is not None and run.target.sample is not None:  # the floor: two independent sets of exact samples
        m["w2_floor"], m["n_w2"] = w2_exact(y[:k], run.target.sample(k, make_generator(run.seed + 5, torch.device("cpu")))), k
    shipped = getattr(energy, "shipped", None)
    if y is not None and hasattr(shipped, "sample_stratified"):  # 25GMM: also against the paper's equal-count reference
        assert shipped is not None
        strat = shipped.sample_stratified(k, make_generator(run.seed + 6, torch.device("cpu")), dtype=torch.float64)
        m["w2_stratified"], m["w2_stratified_floor"] = w2_exact(x[:k], strat), w2_exact(y[:k], strat)
