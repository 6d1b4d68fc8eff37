"""Checkpoints: one `.safetensors` file with the tensors and string metadata.

No pickle anywhere: loading a checkpoint only parses tensors and JSON, it never runs code.
Metadata values are strings (JSON where structured):

- `format` = "rtbcli-checkpoint", `format_version`, `rtbcli_version`, `torch_version`, `created`;
- `kind`: "prior" or "finetuned";
- `config`: the fully resolved preset (JSON), `preset`: the name or path it came from;
- `step`, `seed`, `run_id`, `run`: the run's options (JSON);
- finetuned only: `algo`, `beta`, `alpha`, `prior_sha256`, `prior_path`.

What a training run puts there, and what changed between format versions: `rtbcli.checkpointer`.

Tensors: `policy.*` (the sampler's own network, for every kind; a user's network class (`rtbcli.networks`) has its
`state_dict` under `policy.net.`, its reference, kwargs and file SHA-256 in the config's [sampler]); finetuned checkpoints add
`prior.*` (the frozen prior) and `log_z` (rtb) or `v_soft_s0` (trust-pcl). In energy mode (a
config with a `target`) the frozen prior is the Brownian one, defined by the config's sampler
settings alone: no `prior.*` tensors, `prior_path` = "brownian", and `target` (the reference) and
`target_sha256` (a user's file) in the metadata. A user's target is never imported on loading.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import Preset, preset_from_json
from .errors import InputError
from .hashing import sha256_file
from .runtime import atomic_path
from .sampler import DiffusionSampler

FORMAT = "rtbcli-checkpoint"
FORMAT_VERSION = "2"  # what this rtbcli writes (`rtbcli.checkpointer`: what changed)
READS = ("1", "2")  # what it loads
KINDS = ("prior", "finetuned")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors, its metadata, and its resolved preset."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    preset: Preset
    path: Path | None = None
    sha256: str = field(default="")
    network: Any = None  # a user's network class (`rtbcli.networks.Network`), named again by the command: never imported here

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def algo(self) -> str | None:
        return self.meta.get("algo")

    @property
    def step(self) -> int:
        return self.meta_int("step")

    def meta_int(self, key: str, default: int = 0) -> int:
        try:
            return int(self.meta.get(key, default))
        except ValueError:
            raise InputError(f"checkpoint '{self.path}': its '{key}' is not a number: the file is damaged") from None

    def meta_float(self, key: str, default: float) -> float:
        """A finite number of the metadata (`default` where absent); an InputError where the file is damaged."""
        try:
            value = float(self.meta.get(key, default))
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"checkpoint '{self.path}': its '{key}' is not a finite number: the file is damaged")
        return value

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix.`, with the prefix removed."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def sampler(self, prefix: str = "policy", device: torch.device | str = "cpu", dtype=torch.float32) -> DiffusionSampler:
        """Build the sampler stored under `prefix` ("policy" or, for finetuned, "prior").

        In energy mode (a config with a target) the prior is the drift-free `BrownianPrior` of the
        config's sampler settings: no network, no `prior.*` tensors (it has none to store)."""
        if prefix == "prior" and self.preset.energy:
            from .energy.prior import BrownianPrior

            spec = self.preset.sampler
            return BrownianPrior(self.preset.dim, spec.steps, spec.sigma2, spec.time_power).to(device=device, dtype=dtype)  # type: ignore[return-value]
        if self.preset.sampler.model is not None:
            from .lora import model_sampler

            return model_sampler(self, prefix).to(device=device, dtype=dtype)
        if self.preset.sampler.network is not None:
            s = self._network_sampler()
        else:
            with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave torch's global generator alone
                s = DiffusionSampler.from_spec(self.preset.dim, self.preset.sampler)
        state = self.section(prefix)
        try:
            s.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            if self.preset.sampler.network is not None:
                raise InputError(
                    f"checkpoint '{self.path}': its {prefix} weights do not fit the network '{self.network.reference}' ({first}): "
                    f"name the class the checkpoint was made with (--network {self.preset.sampler.network})"
                ) from None
            raise InputError(f"checkpoint '{self.path}': its {prefix} weights do not match its sampler settings ({first})") from None
        return s.to(device=device, dtype=dtype)

    def _network_sampler(self) -> DiffusionSampler:
        """A sampler of the user's network class (`rtbcli.networks`), which the command named again (`self.network`)."""
        from .networks import attach_network, make_sampler

        if self.network is None:
            attach_network(self, None)  # raises the one-line error naming --network
        return make_sampler(self.preset.sampler, self.preset.dim, self.network)

    def scalar(self, name: str) -> float | None:
        t = self.tensors.get(name)
        if t is None:
            return None
        if t.numel() != 1:
            raise InputError(
                f"checkpoint '{self.path}': '{name}' should be a single number, it has shape {tuple(t.shape)}: the file is damaged"
            )
        return float(t.reshape(()))

    def learned_log_z(self) -> float | None:
        """log Z as the objective learned it (log Z, or V(s0) / alpha), None where it learns no scalar."""
        from .objectives import OBJECTIVES

        obj = OBJECTIVES.get(self.algo or "")
        if obj is None or obj.scalar is None:
            return None
        value = self.scalar(obj.scalar)
        return None if value is None else obj.log_z(value, self.meta_float("alpha", 1.0))


def sampler_tensors(sampler: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The sampler's state under `prefix.`, as contiguous float32 CPU tensors."""
    saved = getattr(sampler, "saved_state", None)  # a diffusers model's: `rtbcli.ddpm.DDPMSampler.saved_state`
    state = saved() if saved is not None else sampler.state_dict()
    return {f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def base_metadata(kind: str, preset: Preset, preset_ref: str, step: int, seed: int, run: dict) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rtbcli_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "config": preset.model_dump_json(),
        "preset": preset_ref,
        "step": str(step),
        "seed": str(seed),
        "run": json.dumps(run, sort_keys=True),
    }


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    if meta.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}")
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def is_checkpoint_file(path: Path) -> bool:
    """Whether `path` is a safetensors file with rtbcli's checkpoint metadata (only its header is read)."""
    if not Path(path).is_file():  # a FIFO would block the read
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # safetensors raises several types for other files
        return False


def load_checkpoint(path: Path | str, expect_kind: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint; every failure is an InputError with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint '{path}' not found: check the path")
    if path.is_dir():
        raise InputError(f"checkpoint '{path}' is a directory: give a .safetensors file")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except PermissionError:
        raise InputError(f"checkpoint '{path}' cannot be read: permission denied") from None
    except Exception as e:  # safetensors raises several types for non-safetensors input
        raise InputError(
            f"'{path}' is not a readable safetensors file ({e.__class__.__name__}): give a checkpoint written by rtbcli"
        ) from None
    if meta.get("format") != FORMAT:
        raise InputError(
            f"'{path}' is a safetensors file but not an rtbcli checkpoint: give a file written by `rtbcli pretrain` or `rtbcli finetune`"
        )
    if meta.get("format_version") not in READS:
        raise InputError(
            f"checkpoint '{path}' has format version {meta.get('format_version')}, this rtbcli reads versions "
            f"{' and '.join(READS)}: upgrade rtbcli"
        )
    if meta.get("kind") not in KINDS:
        raise InputError(f"checkpoint '{path}' has an unknown kind '{meta.get('kind')}'")
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise InputError(f"checkpoint '{path}' has no readable config: it is damaged") from None
    preset = preset_from_json(config)
    if expect_kind is not None and meta["kind"] != expect_kind:
        raise InputError(f"checkpoint '{path}' is a {meta['kind']} checkpoint, a {expect_kind} one is needed here")
    ck = Checkpoint(tensors=tensors, meta=meta, preset=preset, path=path, sha256=sha256_file(path))
    return ck
