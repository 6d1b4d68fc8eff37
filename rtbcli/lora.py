"""A diffusers DDPM model from its folder, and LoRA adapters on it (peft), for `rtbcli.ddpm.DDPMSampler`.

Folders: what diffusers' `save_pretrained` writes, read from disk only (never the hub):
- a UNet2DModel folder (config.json + weights) with its DDPMScheduler's scheduler_config.json beside it, or
- a DDPMPipeline folder (unet/ and scheduler/ subfolders, model_index.json).

Images: rtbcli's samplers, rewards and sample files see flat vectors x of shape (B, d) with
d = C * H * W, the image's (C, H, W) array flattened in C order (`x.view(B, C, H, W)` gives the
images back); values are in the model's range, [-1, 1] for diffusers' DDPM models.

LoRA (`add_lora`): peft's `get_peft_model` puts rank-R adapters on the modules whose names end with
one of `target_modules` (default `DEFAULT_TARGETS`: the convolutions and the time-embedding
projections of small UNets, with or without attention blocks, and attention's projections where
there are any); only the adapters train (the base weights have requires_grad off and stay bit-identical).
`merged_folder` merges them (`merge_and_unload`) and writes a folder diffusers loads.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .ddpm import DDPMSampler, Schedule, schedule_from_config
from .errors import InputError, RtbcliWarning
from .hashing import sha256_file
from .runtime import write_folder

INSTALL = 'pip install "rtbcli[diffusers]"'
DEFAULT_TARGETS = ("conv_in", "conv1", "conv2", "conv_out", "time_emb_proj", "linear_1", "linear_2", "to_q", "to_k", "to_v", "to_out.0")


def require_diffusers() -> tuple[Any, Any]:
    """(diffusers, peft), or an InputError naming the extra to install."""
    try:
        import diffusers
        import peft
    except ImportError as e:
        raise InputError(f"a diffusers model needs the diffusers and peft packages ({e.name} is missing): {INSTALL}") from None
    return diffusers, peft


def image_shape(config) -> tuple[int, int, int]:
    """(C, H, W) of a UNet2DModel's images, from its config (the model's, or its folder's config.json as a dict)."""
    size = config["sample_size"]
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    return int(config.get("in_channels", 3)), int(h), int(w)


class UNetEps(nn.Module):
    """A diffusers UNet2DModel as an epsilon network of flat images: x (B, d), timesteps (B,) -> eps (B, d)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet: Any = unet  # a UNet2DModel, or a peft model around one
        self.shape = image_shape(unet.config)

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x.reshape(-1, *self.shape), t).sample.reshape(x.shape[0], -1)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"'{path}' is not a readable JSON file ({e.__class__.__name__}): the model folder is damaged") from None
    if not isinstance(data, dict):
        raise InputError(f"'{path}' holds a JSON {type(data).__name__}, not an object: the model folder is damaged")
    return data


def model_folders(path: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a UNet2DModel or DDPMPipeline folder; an InputError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"'{path}' is not a folder: give a folder written by diffusers' save_pretrained (a UNet2DModel or a DDPMPipeline)")
    if (path / "unet" / "config.json").is_file():
        unet_dir, sched = path / "unet", path / "scheduler" / "scheduler_config.json"
    else:
        unet_dir, sched = path, path / "scheduler_config.json"
    if not (unet_dir / "config.json").is_file():
        raise InputError(
            f"'{path}' is not a diffusers model folder (no config.json or unet/config.json): give a folder written by save_pretrained"
        )
    cls = _json(unet_dir / "config.json").get("_class_name")
    if cls != "UNet2DModel":
        raise InputError(f"'{unet_dir}' holds a {cls}: rtbcli supports UNet2DModel")
    if not sched.is_file():
        raise InputError(
            f"'{path}' has no DDPMScheduler config ({sched.name}): save the scheduler beside the UNet (scheduler.save_pretrained)"
        )
    return unet_dir, sched


def load_model(path: Path, sampling_steps: int | None = None, eta: float | None = None) -> tuple[UNetEps, Schedule, dict]:
    """The epsilon network, its schedule and the scheduler config of a diffusers folder (from disk only)."""
    diffusers, _ = require_diffusers()
    unet_dir, sched = model_folders(path)
    config = _json(sched)
    schedule = schedule_from_config(config, sampling_steps, where=f"the scheduler of '{path}'", eta=eta)
    if not any(unet_dir.glob("*.safetensors")):  # a .bin is a pickle: loading it could run code
        raise InputError(
            f"'{unet_dir}' holds no safetensors weights, and rtbcli never loads pickled ones (.bin): "
            "save the model again with save_pretrained(..., safe_serialization=True)"
        )
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, use_safetensors=True)
    except Exception as e:
        raise InputError(f"'{unet_dir}' could not be loaded by diffusers ({e.__class__.__name__}: {str(e).strip()[:200]})") from None
    return UNetEps(unet), schedule, config


def add_lora(eps: UNetEps, rank: int, alpha: float | None = None, target_modules: list[str] | tuple[str, ...] | None = None) -> UNetEps:
    """Put LoRA adapters of rank `rank` (scale alpha / rank, alpha default = rank) on the UNet; only they train."""
    _, peft = require_diffusers()
    if rank <= 0:
        raise InputError(f"--lora-rank must be a positive rank (got {rank})")
    targets = list(target_modules or DEFAULT_TARGETS)
    matched = [(n, m) for n, m in eps.unet.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    if not matched:
        raise InputError(f"the LoRA target modules {targets} match no module of the UNet: name some of its Conv2d or Linear modules")
    other = next(((n, m) for n, m in matched if not isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if other is not None:
        raise InputError(f"the LoRA target '{other[0]}' is a {type(other[1]).__name__}: name some of the UNet's Conv2d or Linear modules")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets, init_lora_weights=True)
    eps.unet = peft.get_peft_model(eps.unet, cfg)
    return eps


def counts(module: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (for the run's log)."""
    return {
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def merged_folder(eps: UNetEps, scheduler_config: dict, out: Path) -> Path:
    """Merge the adapters into the base weights and write a folder diffusers loads (UNet2DModel +
    scheduler_config.json), atomically: a temporary folder beside `out`, then a rename."""
    diffusers, _ = require_diffusers()
    out = Path(out)
    if out.exists():
        raise InputError(f"'{out}' exists: choose a new folder for the merged model")
    unet = eps.unet.merge_and_unload() if hasattr(eps.unet, "merge_and_unload") else eps.unet

    def fill(tmp: Path) -> None:
        unet.save_pretrained(str(tmp))
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_") or k == "_class_name"}
        diffusers.DDPMScheduler.from_config(config).save_pretrained(str(tmp))

    return write_folder(out, fill)


def folder_sha256(path: Path | str) -> str:
    """The SHA-256 of a model folder: over its files' relative paths and contents (hidden files left out)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)):
        h.update(str(f.relative_to(root)).encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def model_sampler(ck, prefix: str = "policy") -> DDPMSampler:
    """The sampler of a checkpoint whose [sampler] names a diffusers model: the folder's UNet (checked against the
    recorded SHA-256), with LoRA adapters on the policy where the run has them, and the checkpoint's tensors under `prefix`
    (none for the frozen prior, the adapters alone under LoRA). The folder holds weights and JSON only: no code runs."""
    spec = ck.preset.sampler
    eps, schedule, config = load_model(Path(spec.model), spec.sampling_steps, spec.eta)
    if spec.model_sha256 is not None:
        sha = folder_sha256(spec.model)
        if sha != spec.model_sha256:
            raise InputError(
                f"the diffusers model '{spec.model}' is not the folder the run was made with (SHA-256 {sha[:12]}... vs "
                f"{spec.model_sha256[:12]}...): restore that folder (the checkpoint's weights are built on it)"
            )
    if eps.dim != ck.preset.dim:
        raise InputError(
            f"the diffusers model '{spec.model}' makes images of {eps.shape} (d = {eps.dim}), the preset's data have d = {ck.preset.dim}: "
            f"give a preset of this model's images"
        )
    state = ck.section(prefix)
    if prefix == "policy" and spec.lora_rank is not None:
        with torch.random.fork_rng(devices=[]):  # the adapters' initial A matrices (B starts at 0): fixed
            torch.manual_seed(0)
            add_lora(eps, spec.lora_rank, spec.lora_alpha, spec.lora_targets)
    s = DDPMSampler(eps.dim, schedule, eps)
    s.scheduler_config = config
    s.in_folder = prefix == "prior"
    if state:
        missing, unexpected = s.load_state_dict(state, strict=False)
        lora = spec.lora_rank is not None
        if unexpected or (missing and not lora) or (lora and any("lora_" in k for k in missing)):
            first = (unexpected or missing)[0]
            raise InputError(
                f"checkpoint '{ck.path}': its {prefix} weights do not fit the model '{spec.model}' (e.g. '{first}'): the file is damaged"
            )
    if prefix == "policy" and spec.prior_tail_steps:  # the last steps keep the prior's epsilon: the adapters off, or a frozen copy
        s.keep_prior_tail(spec.prior_tail_steps, None if spec.lora_rank is not None else load_model(Path(spec.model))[0])
    return s


def merge_checkpoint(ck, out: Path) -> Path:
    """`rtbcli merge`: a finetuned checkpoint of a diffusers model (LoRA adapters merged, or fully fine-tuned weights)
    written as a folder diffusers loads, with the model's DDPMScheduler config."""
    if ck.preset.sampler.model is None:
        raise InputError(f"checkpoint '{ck.path}' is not built on a diffusers model: merge applies to `finetune --prior DIR` runs")
    if ck.kind != "finetuned":
        raise InputError(f"checkpoint '{ck.path}' is a {ck.kind} checkpoint: merge a finetuned one")
    s = ck.sampler("policy")
    assert isinstance(s.net, UNetEps)
    if s.tail_steps:
        warnings.warn(
            f"the run kept the prior's epsilon for its last {s.tail_steps} sampling steps (prior_tail_steps), which a diffusers "
            "folder cannot say: the merged model uses the fine-tuned one there too",
            RtbcliWarning,
            stacklevel=2,
        )
    return merged_folder(s.net, s.scheduler_config, out)
