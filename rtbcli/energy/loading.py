"""Loading an energy target from a preset's [target] or `--target` (docs/maths.md#energy-mode).

A target is named like a Python reward: 'path/to/target.py:log_pi' or 'package.module:log_pi',
called as log_pi(x, **kwargs) on x of shape (B, d), returning log pi(x) of shape (B,). The shipped
targets are trusted module references, 'rtbcli.energy.targets:NAME' with NAME one of
`ENERGY_TARGETS` (gmm25, funnel, manywell; kwargs go to the constructor): they bring their exact
log Z and exact sampler. A user's target has neither.

Safety, as for rewards: loading a checkpoint never imports code. A checkpoint records the target's
reference and its file's SHA-256; a user's target is imported only when named again (`--target`);
shipped targets are part of the package and are built without asking.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InputError, RtbcliWarning
from ..rewards import RewardFailed, checked_output, import_function, parse_reference
from .targets import ENERGY_TARGETS, EnergyTarget

SHIPPED_PREFIX = "rtbcli.energy.targets:"


def shipped_name(ref: str) -> str | None:
    """NAME of a shipped target reference 'rtbcli.energy.targets:NAME', else None."""
    if parse_reference(ref, "target")[0] is None and ref.startswith(SHIPPED_PREFIX):
        return ref[len(SHIPPED_PREFIX) :]
    return None


def shipped_target(ref: str, kwargs: dict | None = None) -> EnergyTarget:
    """The shipped target a reference names, built with `kwargs`; InputError for an unknown name."""
    name = shipped_name(ref)
    if name not in ENERGY_TARGETS:
        raise InputError(f"unknown shipped target '{ref}': choose one of {', '.join(SHIPPED_PREFIX + k for k in ENERGY_TARGETS)}")
    try:
        return ENERGY_TARGETS[name](**(kwargs or {}))
    except TypeError as e:
        raise InputError(f"target '{ref}': bad [target.kwargs] ({e}): remove them (or give the constructor's arguments)") from None


class TargetFailed(RewardFailed):
    """The target raised or returned something unusable during a run (exit code 1): a failure of
    the derived reward, so a run stops as for a reward's (the last good state kept)."""


@dataclass
class LogDensity:
    """log pi(x) = function(x, **kwargs), checked for type and shape on every call; keeps autograd."""

    reference: str
    function: Callable
    kwargs: dict = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.function(x.clone(), **self.kwargs)  # a copy: a target that edits x in place must not move the samples
        except (Exception, SystemExit) as e:  # sys.exit() in a target would end the run as a success
            raise TargetFailed(f"the target '{self.reference}' raised {e.__class__.__name__}: {str(e).strip()[:200]}") from None
        return checked_output(out, x, f"the target '{self.reference}'", "log pi(x)", TargetFailed)


@dataclass
class LoadedTarget:
    """A target ready to call: its checked log-density, dimension, and (shipped targets) exact log Z and sampler."""

    reference: str
    log_density: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    sha256: str | None = None
    shipped: EnergyTarget | None = None  # exact log Z (`log_z`) and exact samples (`sample`)

    @property
    def log_z(self) -> float | None:
        return None if self.shipped is None else float(self.shipped.log_z)


@dataclass
class UnnamedTarget:
    """The user's target a checkpoint records, not imported: loading a checkpoint never runs code."""

    reference: str
    dim: int

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise InputError(
            f"this checkpoint samples the target '{self.reference}', and loading a checkpoint never imports code: "
            f"name it again with --target {self.reference}"
        )

    __call__ = log_density
    log_z = None
    shipped = None


def _user_dim(ref: str, fn: Callable, given: int | None) -> int:
    own = getattr(fn, "dim", None)
    if own is not None and given is not None and int(own) != given:
        raise InputError(f"the target '{ref}' has dimension {own} (its `dim`), the prior dimension {given}: give matching dimensions")
    d = given if given is not None else own
    if d is None:
        raise InputError(f"the target '{ref}' does not say its dimension: give --dim D (or dim = D in [target])")
    return int(d)


def load_target(spec, *, allow_import: bool = True) -> LoadedTarget | UnnamedTarget:
    """The target a `TargetSpec` names. Unless `allow_import`, only shipped targets are built; a user's is an `UnnamedTarget`."""
    ref = spec.log_density
    if shipped_name(ref) is not None:
        t = shipped_target(ref, spec.kwargs)
        if spec.dim is not None and spec.dim != t.dim:
            raise InputError(f"the target '{ref}' has dimension {t.dim}, the prior dimension {spec.dim}: give matching dimensions")
        return LoadedTarget(ref, t.log_density, t.dim, None, t)
    if not allow_import:
        if spec.dim is None:
            raise InputError(f"the recorded target '{ref}' has no dimension: the checkpoint is damaged")
        return UnnamedTarget(ref, spec.dim)
    fn, sha = import_function(ref, "target")
    if spec.sha256 is not None and sha is not None and sha != spec.sha256:
        warnings.warn(
            f"the target file of '{ref}' has changed since the checkpoint recorded it (SHA-256 {sha[:12]}... vs {spec.sha256[:12]}...)",
            RtbcliWarning,
            stacklevel=2,
        )
    return LoadedTarget(ref, LogDensity(ref, fn, dict(spec.kwargs)), _user_dim(ref, fn, spec.dim), sha)


def check_target_output(target: LoadedTarget | UnnamedTarget, x: torch.Tensor) -> torch.Tensor:
    """Call log pi once on the prior's samples before a run; any problem is bad input (exit 2), named with its fix."""
    try:
        out = target.log_density(x)
    except TargetFailed as e:
        raise InputError(f"{e} (on {x.shape[0]} samples of the prior)") from None
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        raise InputError(
            f"the target '{target.reference}' returns NaN or inf on {int(bad.sum())} of {out.numel()} samples of the prior: "
            f"make log pi finite wherever N(0, sigma2 I) puts mass (or change --sigma2)"
        )
    return out


def resolve_target(preset, allow_import: bool = True):
    """The preset with its target's dimension (and a user file's SHA-256) filled in, as the checkpoint records it.

    Unless `allow_import`, a user's target is left as it is (only shipped targets are built)."""
    spec = preset.target
    if spec is None or (shipped_name(spec.log_density) is None and not allow_import):
        return preset
    t = load_target(spec, allow_import=allow_import)
    return preset.updated("target", dim=t.dim, sha256=getattr(t, "sha256", None))
