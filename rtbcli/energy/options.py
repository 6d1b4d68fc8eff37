"""The command line's energy-mode options, as presets: `--prior brownian`, `--target`, `--dim`, `--sigma2`.

- `--prior brownian` (a reserved word: a checkpoint file of that name is given as ./brownian) starts
  a run from the drift-free Brownian prior, with no data. It is implied when no start is given and
  the run has a target (`--target`, or a preset with [target] such as gmm25-energy).
- `--target file.py:fn` (or module:fn, or rtbcli.energy.targets:NAME) is the log-density to sample;
  with a preset it replaces the preset's [target], keeping the preset's budgets. Naming a
  checkpoint's own target again (`--resume`, `--warm-start`, `evaluate`) keeps its recorded kwargs,
  dimension and SHA-256, as `--reward` does for rewards.
- `--dim D` is a user's target's dimension (unless the function has a `dim` attribute);
  `--sigma2 S` is the Brownian prior's variance (`sampler.sigma2`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from ..config import Preset, TargetSpec, option_error
from ..errors import InputError
from .loading import UnnamedTarget, load_target, resolve_target

BROWNIAN = "brownian"
ENERGY_PRESETS = "gmm25-energy, funnel, manywell-energy"
ENERGY_EVAL_N = 2_000  # the paper's K: exact optimal transport at 20,000 samples is too slow


def is_brownian(prior: Path | str | None) -> bool:
    """`--prior brownian`, the reserved word (not a file)."""
    return prior is not None and str(prior) == BROWNIAN


def target_preset(ref: str, kwargs: dict | None = None, dim: int | None = None) -> Preset:
    """A preset for `--target` without --preset: the target, the default sampler and budgets, K = 2,000 samples to evaluate."""
    try:
        spec = TargetSpec.model_validate({"log_density": ref, "kwargs": kwargs or {}, "dim": dim}, context={"base_dir": Path.cwd()})
    except ValidationError as e:  # a bad --target reference or --dim: one line, exit 2
        raise option_error(e, {"log_density": "--target", "kwargs": "--target-arg"}) from None
    return Preset(name="energy", description=f"energy mode: sample {ref}", target=spec, evaluate={"n": ENERGY_EVAL_N})  # type: ignore[arg-type]


def with_target(preset: Preset, ref: str | None, kwargs: dict | None = None, dim: int | None = None) -> Preset:
    """The preset with its target named again, or replaced (`--target`, `--target-arg`, `--dim`), and resolved (the
    target is loaded: its dimension, its file's SHA-256). Naming the recorded reference keeps its kwargs and SHA-256."""
    if ref is None and not kwargs and dim is None:
        return preset
    old = preset.target
    if old is None:
        raise InputError(
            f"--target samples a density from the Brownian prior, and preset '{preset.name}' has [prior_data]: "
            f"use --prior brownian with an energy preset ({ENERGY_PRESETS}) or none"
        )
    new = target_preset(ref or old.log_density, None, dim).target
    assert new is not None
    same = new.log_density == old.log_density
    spec = {
        "log_density": new.log_density,
        "kwargs": {**(old.kwargs if same else {}), **(kwargs or {})},
        "dim": dim if dim is not None else (old.dim if same else None),
        "sha256": old.sha256 if same else None,
    }
    return resolve_target(preset.updated("", target=spec))


def check_same_dim(preset: Preset, recorded: Preset) -> None:
    """A target and a checkpoint's sampler of different dimensions are refused, naming both."""
    if preset.dim != recorded.dim:
        ref = preset.target.log_density if preset.target is not None else "the preset's"
        raise InputError(
            f"the target '{ref}' has dimension {preset.dim}, the checkpoint's sampler dimension {recorded.dim}: "
            f"give a target of dimension {recorded.dim} (or start a new run with --prior brownian)"
        )


def require_named(preset: Preset) -> None:
    """A checkpoint's user target is imported only when named again: the one-line error naming --target."""
    if preset.target is not None:
        t = load_target(preset.target, allow_import=False)
        if isinstance(t, UnnamedTarget):
            t.log_density(None)  # type: ignore[arg-type]  # raises the InputError naming --target REF
