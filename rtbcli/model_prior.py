"""A diffusers model folder as the prior a fine-tuning run starts from (`finetune --prior DIR`; rtbcli.lora)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from .checkpoint import Checkpoint
from .config import Preset, SamplerSpec, option_error
from .ddpm import check_tail_steps
from .errors import InputError
from .lora import folder_sha256, model_folders, require_diffusers


def folder_checkpoint(
    path: Path,
    preset,
    sampling_steps: int | None,
    lora_rank: int | None,
    lora_alpha: float | None,
    lora_targets,
    eta: float | None = None,
    prior_tail_steps: int | None = None,
):
    """A diffusers model folder as the prior a fine-tuning run starts from: a `Checkpoint` of kind prior with no tensors,
    whose preset is `preset` with the model in its [sampler] (`sampling_steps`, `eta`, `prior_tail_steps` None: the preset's)."""
    require_diffusers()
    model_folders(path)  # a one-line error for a folder that is not a model
    if sampling_steps is not None and sampling_steps <= 0:
        raise InputError(f"--sampling-steps must be a positive number of steps (got {sampling_steps})")
    if eta is not None and not 0 < eta <= 1:
        raise InputError(f"--eta must be in (0, 1]: 1 is the DDPM step, smaller adds less noise per step (got {eta:g})")
    if prior_tail_steps is not None and prior_tail_steps < 0:
        raise InputError(f"--prior-tail-steps must be 0 or more steps (got {prior_tail_steps})")
    try:
        spec = SamplerSpec.model_validate(
            {
                **preset.sampler.model_dump(),
                "network": None,
                "model": str(path),
                "model_sha256": folder_sha256(path),
                "sampling_steps": sampling_steps if sampling_steps is not None else preset.sampler.sampling_steps,
                "eta": eta if eta is not None else preset.sampler.eta,
                "prior_tail_steps": prior_tail_steps if prior_tail_steps is not None else preset.sampler.prior_tail_steps,
                "lora_rank": lora_rank,
                "lora_alpha": lora_alpha,
                "lora_targets": lora_targets or None,
            },
            context={"base_dir": Path.cwd()},
        )
    except ValidationError as e:
        raise option_error(e) from None
    data = preset.model_dump()
    data["sampler"] = spec.model_dump()
    p = Preset.model_validate(data)
    ck = Checkpoint(tensors={}, meta={"kind": "prior", "step": "0", "seed": "0"}, preset=p, path=Path(path), sha256=spec.model_sha256 or "")
    check_tail_steps(p.sampler.prior_tail_steps, ck.sampler("prior").steps)  # the model loads and has the preset's dimension
    return ck


MODEL_FIELDS = ("model", "model_sha256", "sampling_steps", "eta", "prior_tail_steps", "lora_rank", "lora_alpha", "lora_targets")


def with_model_of(preset, start):
    """`preset` with the diffusers model fields of `start`'s [sampler] (a run from a model folder keeps its model)."""
    spec = start.preset.sampler
    if spec.model is None or preset.sampler.model == spec.model:
        return preset
    data = preset.model_dump()
    data["sampler"] = {**data["sampler"], "network": None, **{k: getattr(spec, k) for k in MODEL_FIELDS}}
    return Preset.model_validate(data)
