"""Validated configuration: presets (tasks with their default budgets) and run options.

A preset is a TOML file; `Preset` validates it, rejecting unknown keys and wrong types with an
error that names the key and the file. Shipped presets live in `rtbcli/presets/` and are found
by name; any other TOML file is found by path. Every field is documented where it is declared.
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError

DEFAULT_PRESET = "reference"


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


PosFloat = Annotated[float, Field(gt=0), AfterValidator(_finite)]
NonNegFloat = Annotated[float, Field(ge=0), AfterValidator(_finite)]
PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class MixtureSpec(Strict):
    """An isotropic Gaussian mixture sum_k w_k N(mu_k, variance * I)."""

    means: list[list[float]] = Field(min_length=1)  # one mean per component, all of dimension d
    variance: PosFloat  # per-coordinate variance shared by all components
    weights: list[PosFloat] | None = None  # unnormalised weights; None means equal weights

    @model_validator(mode="after")
    def _shapes(self) -> MixtureSpec:
        dims = {len(m) for m in self.means}
        if len(dims) != 1 or 0 in dims:
            raise ValueError("all means must have the same, positive, dimension")
        if not all(math.isfinite(v) for m in self.means for v in m):
            raise ValueError("means must be finite")
        if self.weights is not None and len(self.weights) != len(self.means):
            raise ValueError(f"{len(self.weights)} weights for {len(self.means)} means")
        return self

    @property
    def dim(self) -> int:
        return len(self.means[0])


class RewardSpec(Strict):
    """The reward r(x) > 0, given through log r.

    - `mixture_ratio`: log r(x) = log q(x) - log p_data(x), q the mixture below. At beta = 1 the
      target p_data * r is exactly q (the reference task's p_9 / p_25).
    - `mixture`: log r(x) = log q(x).
    """

    type: Literal["mixture_ratio", "mixture"]
    mixture: MixtureSpec


class SamplerSpec(Strict):
    """The diffusion sampler of design.md §2."""

    steps: PosInt = 100  # T, the number of Gaussian steps; t_i = i / T, dt = 1 / T
    sigma2: PosFloat = 5.0  # per-step variance is sigma2 * dt (fixed, not learned)
    hidden: PosInt = 64  # width of the drift network
    time_features: PosInt = 64  # number of sin/cos frequencies, k = linspace(0.1, 100)
    layers: PosInt = 2  # hidden Linear(hidden, hidden) + GELU blocks after the input sum


class PretrainSpec(Strict):
    """Maximum-likelihood pretraining on bridge trajectories from the data (see `rtbcli.pretrain`)."""

    steps: PosInt = 10_000  # optimiser steps
    batch_size: PosInt = 500  # trajectories per step (`pairs`: the same network work, batch_size * T triples)
    lr: PosFloat = 5e-3  # Adam learning rate (peak)
    lr_schedule: Literal["constant", "cosine", "wsd"] = "wsd"  # wsd: constant, then linear decay to lr_final
    decay_fraction: Fraction = 0.2  # wsd: the last fraction of the run that decays
    lr_final: NonNegFloat = 1e-5  # last learning rate of the cosine and wsd schedules
    estimator: Literal["pairs", "trajectory"] = "pairs"  # gradient estimator of the same NLL objective
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.0  # > 0: save an EMA of the weights with this decay


class FinetuneSpec(Strict):
    """Fine-tuning toward p_prior * r^beta (design.md §2-§3)."""

    steps: PosInt = 5_000  # optimiser steps
    batch_size: PosInt = 500  # trajectories per step
    lr: PosFloat = 1e-3  # Adam learning rate of the policy
    lr_logz: PosFloat = 0.1  # Adam learning rate of log Z (trust-pcl: of V(s0) is alpha * this)
    exploration: NonNegFloat = 0.5  # s_e: the behaviour policy adds s_e^2 to each step's variance
    exploration_hold: Fraction = 0.1  # s_e is held until this fraction of the run ...
    exploration_end: Fraction = 0.9  # ... then, after a step down, decays linearly to 0 here
    snis: Literal["tempered", "exact"] = "tempered"  # reinforce-kl weights: softmax(log-ratio / T) or / 1
    legacy_lambda: NonNegFloat = 1.0  # weight of the legacy baseline's squared log-ratio penalty

    @model_validator(mode="after")
    def _order(self) -> FinetuneSpec:
        if self.exploration_end < self.exploration_hold:
            raise ValueError("exploration_end must not come before exploration_hold")
        return self


class EvalSpec(Strict):
    """Metric settings (design.md §5)."""

    n: PosInt = 20_000  # samples per evaluation
    cell_radius: PosFloat = 1.5  # a sample within this radius of its nearest prior mean is in that cell
    hist_half_width: PosFloat = 13.0  # histogram over [-w, w]^2 (2-D tasks only) ...
    hist_bin: PosFloat = 0.5  # ... in square bins of this width, plus one outside cell


class Preset(Strict):
    """A task (prior data, reward, beta) with the sampler and the default budgets for it."""

    name: str
    description: str = ""
    beta: PosFloat = 1.0  # inverse temperature: the target is p_prior * r^beta
    prior_data: MixtureSpec  # the data the prior is pretrained on (known exactly)
    reward: RewardSpec
    sampler: SamplerSpec = SamplerSpec()
    pretrain: PretrainSpec = PretrainSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    evaluate: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _dims(self) -> Preset:
        if self.reward.mixture.dim != self.prior_data.dim:
            raise ValueError(
                f"reward.mixture has dimension {self.reward.mixture.dim}, prior_data has {self.prior_data.dim}"
            )
        return self

    @property
    def dim(self) -> int:
        return self.prior_data.dim

    def updated(self, section: str, **changes: Any) -> Preset:
        """A copy with some fields of one section replaced (None values are ignored), validated."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        data = self.model_dump()
        if section:
            data[section] = {**data[section], **changes}
        else:
            data.update(changes)
        return Preset.model_validate(data)


def shipped_presets() -> list[str]:
    """Names of the presets that ship with rtbcli."""
    folder = resources.files("rtbcli") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def describe_validation_error(err: ValidationError, where: str) -> str:
    """One line naming the worst bad key of a pydantic error (and how many more there are).

    An unknown key comes first (it is usually a typo, and explains a "missing" one), then a
    wrong value, then a missing key.
    """
    rank = {"extra_forbidden": 0, "missing": 2}
    first = min(err.errors(), key=lambda e: rank.get(e["type"], 1))
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        what = f"unknown key '{key}'"
    elif first["type"] == "missing":
        what = f"missing key '{key}'"
    else:
        what = f"bad value for '{key}': {first['msg']}"
    more = len(err.errors()) - 1
    return f"{where}: {what}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def load_preset(name_or_path: str | Path | None = None) -> tuple[Preset, str]:
    """Load a preset by shipped name or by path; returns it and the name it was found by.

    Raises InputError naming the file and the bad key when the preset is invalid.
    """
    ref = str(name_or_path) if name_or_path is not None else DEFAULT_PRESET
    path = Path(ref)
    if path.suffix == ".toml" or path.exists() or "/" in ref:
        if not path.is_file():
            raise InputError(f"preset file '{ref}' not found: give a shipped name ({', '.join(shipped_presets())}) or a path to a .toml file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"preset file '{ref}' cannot be read ({e.__class__.__name__}): check its permissions and encoding") from None
        label = str(path)
    elif ref in shipped_presets():
        text = (resources.files("rtbcli") / "presets" / f"{ref}.toml").read_text(encoding="utf-8")
        label = f"{ref}.toml (shipped)"
    else:
        raise InputError(f"unknown preset '{ref}': choose one of {', '.join(shipped_presets())}, or give a path to a .toml file")
    return parse_preset(text, label), ref


def parse_preset(text: str, label: str) -> Preset:
    """Validate a preset's TOML text; `label` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"preset {label}: not valid TOML ({e})") from None
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        raise InputError(describe_validation_error(e, f"preset {label}") + ": fix the file (see `rtbcli presets`)") from None


def preset_from_json(data: dict) -> Preset:
    """Rebuild the resolved preset stored in a checkpoint."""
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        raise InputError(describe_validation_error(e, "checkpoint config") + ": the checkpoint was written by an incompatible rtbcli") from None
