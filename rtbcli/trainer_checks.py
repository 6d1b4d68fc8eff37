"""Checks before a training run starts: is the prior right for the preset, does a saved run
continue under the settings given (each failure a one-line InputError naming the fix)."""

from __future__ import annotations

import json

import torch

from .checkpoint import Checkpoint
from .config import DataFileSpec, DatasetSpec, MixtureSpec, Preset, PythonRewardSpec
from .errors import InputError
from .state import RunState, load_state
from .training import config_differences


def _mixture_weights(spec: MixtureSpec) -> list[float]:
    """The normalised component weights (omitted weights are equal ones: the same mixture)."""
    w = [1.0] * len(spec.means) if spec.weights is None else [float(v) for v in spec.weights]
    total = sum(w)
    return [v / total for v in w]


def data_identity(spec) -> tuple:
    """What makes two presets' prior data the same data (a file by its content, not its path)."""
    if isinstance(spec, MixtureSpec):
        return ("mixture", json.dumps({"means": spec.means, "variance": spec.variance, "weights": _mixture_weights(spec)}))
    if isinstance(spec, DataFileSpec):
        return ("file", spec.sha256)
    if isinstance(spec, DatasetSpec):
        return ("dataset", spec.dataset, spec.split, spec.scaling)
    return ("?", repr(spec))


def describe_data(spec) -> str:
    if isinstance(spec, MixtureSpec):
        return f"a {len(spec.means)}-component mixture (variance {spec.variance:g})"
    if isinstance(spec, DataFileSpec):
        return f"the data file {spec.path} (SHA-256 {str(spec.sha256)[:12]}...)"
    scale, shift = spec.scaling
    return f"the {spec.dataset} dataset ({spec.split}, scale {scale:g}, shift {shift:g})"


def mixture_difference(a: MixtureSpec, b: MixtureSpec) -> str:
    """What differs between two mixtures, e.g. 'their means differ (component 1: [-10.0, -10.0] vs [-10.0, -9.0])'."""
    parts = []
    if len(a.means) != len(b.means):
        parts.append(f"{len(a.means)} vs {len(b.means)} components")
    elif a.means != b.means:
        k = next(i for i, (x, y) in enumerate(zip(a.means, b.means)) if x != y)
        parts.append(f"means differ (component {k + 1}: {a.means[k]} vs {b.means[k]})")
    if a.variance != b.variance:
        parts.append(f"variance {a.variance:g} vs {b.variance:g}")
    if len(a.means) == len(b.means) and _mixture_weights(a) != _mixture_weights(b):
        parts.append("weights differ")
    return "their " + ", ".join(parts)


def check_compatible(prior: Checkpoint, preset: Preset) -> None:
    """The prior must be a sampler of the preset's data, with the preset's sampler settings.

    The preset's data define the target that `evaluate` scores against (p_data r^beta), so a
    prior pretrained on other data is refused.
    """
    if prior.preset.dim != preset.dim:
        raise InputError(
            f"the prior samples dimension {prior.preset.dim} but the preset's task has dimension {preset.dim}: use a prior pretrained on this preset"
        )
    # a network file's SHA-256 is filled in when a run first loads it: the preset that named it has none, and a changed
    # file is a warning where the class is attached (rtbcli.networks), not a different sampler
    mine, theirs = (s.model_dump(exclude={"network_sha256"}) for s in (prior.preset.sampler, preset.sampler))
    if mine != theirs:
        diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
        raise InputError(f"the prior's sampler settings differ from the preset's ({diff}): use the preset the prior was pretrained with")
    a, b = prior.preset.prior_data, preset.prior_data
    if data_identity(a) != data_identity(b):
        what = f"; {mixture_difference(a, b)}" if isinstance(a, MixtureSpec) and isinstance(b, MixtureSpec) else ""
        raise InputError(
            f"the prior was pretrained on {describe_data(a)} but the preset's prior_data are {describe_data(b)}{what}: "
            f"fine-tune under the preset the prior was pretrained with (its data define the target)"
        )


def check_finetune_resumable(start: Checkpoint, algo: str, preset: Preset, device: torch.device) -> RunState:
    """The state beside a finetuned checkpoint, checked against the run that would continue it."""
    if start.kind != "finetuned":
        raise InputError(f"--resume needs a finetuned checkpoint; '{start.path}' is a prior: start a run with --prior")
    assert start.path is not None  # loaded from a file
    state = load_state(start.path, "finetune")
    # a warm-started run's checkpoints number their steps on from the checkpoint it started from
    if state.meta.get("run_id") != start.meta.get("run_id") or state.step + state.step_offset != start.step:
        raise InputError(
            f"the state file beside '{start.path}' belongs to another run or step: resume from the checkpoint it was saved with"
        )
    if state.meta["algo"] != algo:
        raise InputError(
            f"'{start.path}' is a {state.meta['algo']} run: resume it with --algo {state.meta['algo']} (or start a new "
            f"{algo} run from it with --warm-start)"
        )
    saved = state.preset()
    mine = preset.updated("finetune", steps=saved.finetune.steps)
    if isinstance(saved.reward, PythonRewardSpec) and isinstance(mine.reward, PythonRewardSpec):
        mine = mine.updated("reward", sha256=saved.reward.sha256)  # the run recorded its file's hash; a changed file only warns
    if saved != mine:
        diff = ", ".join(config_differences(saved.model_dump(), mine.model_dump()))
        raise InputError(
            f"--resume continues a run under its own preset, but the preset given differs ({diff}): leave out --preset "
            f"and other settings except --steps, or start a new run with --warm-start"
        )
    check_device_and_steps(state, device, preset.finetune.steps)
    return state


def check_pretrain_resumable(checkpoint: Checkpoint, preset: Preset, device: torch.device) -> RunState:
    if checkpoint.kind != "prior":
        raise InputError(f"'{checkpoint.path}' is a finetuned checkpoint: resume it with `rtbcli finetune --resume`")
    assert checkpoint.path is not None  # loaded from a file
    state = load_state(checkpoint.path, "pretrain")
    if state.meta.get("run_id") != checkpoint.meta.get("run_id") or state.step != checkpoint.step:
        raise InputError(
            f"the state file beside '{checkpoint.path}' belongs to another run or step: resume from the checkpoint it was saved with"
        )
    saved, mine = state.preset(), preset.updated("pretrain", steps=state.preset().pretrain.steps)
    if saved != mine:
        diff = ", ".join(config_differences(saved.model_dump(), mine.model_dump()))
        raise InputError(
            f"--resume continues a run under its own preset, but the preset given differs ({diff}): leave out --preset "
            f"and other settings except --steps"
        )
    check_device_and_steps(state, device, preset.pretrain.steps)
    return state


def check_device_and_steps(state: RunState, device: torch.device, steps: int) -> None:
    """The device the run's generators belong to, and --steps, the new total of the run's own steps (a warm-started
    run's checkpoints number on from the checkpoint it started from: `state.step_offset`)."""
    if state.meta.get("device") != device.type:
        raise InputError(
            f"the run was on {state.meta.get('device')}, its random state cannot continue on {device.type}: "
            f"resume with --device {state.meta.get('device')}"
        )
    if steps <= state.step:
        offset = state.step_offset
        own = f" of its own (its checkpoints count on from the warm start's step {offset}: step {offset + state.step})" if offset else ""
        raise InputError(f"the run is at step {state.step}{own}; --steps {steps} would end it before that: give a larger total")
