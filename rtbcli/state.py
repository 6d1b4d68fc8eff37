"""Resumable run state, as safetensors beside the checkpoint (no pickle).

A training run writes, next to `X.safetensors`, `X.state.safetensors` holding everything the
rest of the run depends on: the trained parameters at full precision, Adam's moments and step
counts, the states of the run's random generators, the step reached, and the run's original
planned length (from which every schedule follows: learning rates, exploration). Resuming restores all
of it, so a run stopped and resumed ends bit-identical to the same run left alone (on one CPU
thread; multithreaded reductions are not bit-reproducible even without a stop).

Metadata (strings): format, format_version, and the Adam hyperparameters of each parameter group
(`adam_groups`); what a run adds (kind, run_id shared with its checkpoint, step, planned_steps,
schedule_steps, seed, device, config, ...) is `rtbcli.checkpointer`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError
from .runtime import atomic_path

FORMAT = "rtbcli-state"
FORMAT_VERSION = "2"  # what this rtbcli writes (`rtbcli.checkpointer`: what changed)
READS = ("1", "2")  # what it resumes


def state_path(checkpoint: Path) -> Path:
    """`X.safetensors` -> `X.state.safetensors`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".state.safetensors")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Adam's per-parameter state as named tensors, and its groups' hyperparameters."""
    sd = opt.state_dict()
    tensors = {
        f"adam.{i}.{k}": v.detach().cpu().clone() for i, st in sd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("adam."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = t
    if len(groups) != len(sd["param_groups"]):
        raise InputError("the saved optimiser state does not match this run's parameters: the state file belongs to another kind of run")
    # the saved hyperparameters over the current ones (a version-1 state has no initial_lr: the current one stays)
    param_groups = [{**cur, **saved, "params": cur["params"]} for saved, cur in zip(groups, sd["param_groups"])]
    opt.load_state_dict({"state": state, "param_groups": param_groups})


@dataclass
class RunState:
    """A loaded state file."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    path: Path

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def step_offset(self) -> int:
        """The step a warm-started fine-tuning run's checkpoints count on from (0 for any other run)."""
        return int(self.meta.get("step_offset", 0))

    @property
    def seconds(self) -> float:
        """Training time to `step` (0 in a state saved before it was kept)."""
        try:
            return float(self.meta.get("seconds", 0.0))
        except ValueError:
            raise InputError(f"state file '{self.path}': its 'seconds' is not a number: the file is damaged") from None

    @property
    def planned_steps(self) -> int:
        return int(self.meta["planned_steps"])

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def generator_state(self, name: str) -> torch.Tensor:
        return self.tensors[f"rng.{name}"]

    @property
    def adam_groups(self) -> list[dict]:
        return json.loads(self.meta["adam_groups"])

    def preset(self):
        """The resolved preset the run was started with."""
        from .config import Preset

        return Preset.model_validate_json(self.meta["config"])


def save_state(
    path: Path,
    *,
    params: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    meta: dict[str, str],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the state atomically (a temporary file, then a rename)."""
    adam, groups = optimizer_tensors(opt)
    tensors = {f"param.{k}": v.detach().cpu().contiguous().clone() for k, v in params.items()}
    tensors.update(adam)
    tensors.update({f"rng.{k}": g.get_state().cpu() for k, g in generators.items()})
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().cpu().contiguous().clone()
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "adam_groups": json.dumps(groups), **{k: str(v) for k, v in meta.items()}}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=full)


def load_state(checkpoint: Path, kind: str) -> RunState:
    """The resumable state beside `checkpoint`; every problem is an InputError naming the fix."""
    path = state_path(checkpoint)
    fresh = "--warm-start" if kind == "finetune" else "`rtbcli pretrain` without --resume"
    if not path.exists():
        instead = (
            "to start a new run from the checkpoint instead, use --warm-start"
            if kind == "finetune"
            else "to start over, run `rtbcli pretrain` without --resume"
        )
        raise InputError(
            f"'{checkpoint}' has no resumable state beside it ({path.name} is missing): resume needs the state "
            f"file that the run wrote; {instead}"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise InputError(
            f"state file '{path}' cannot be read ({e.__class__.__name__}): it is damaged; start a new run with {fresh}"
        ) from None
    if meta.get("format") != FORMAT:
        raise InputError(f"'{path}' is not an rtbcli state file")
    if meta.get("format_version") not in READS:
        raise InputError(
            f"state file '{path}' has format version {meta.get('format_version')}, this rtbcli reads versions "
            f"{' and '.join(READS)}: "
            f"resume it with the rtbcli that wrote it, or start a new run with {fresh}"
        )
    if meta.get("kind") != kind:
        raise InputError(
            f"state file '{path}' is from a {meta.get('kind')} run, not a {kind} run: use `rtbcli {meta.get('kind')} --resume`"
        )
    state = RunState(tensors, meta, path)
    try:  # what every resume reads: a damaged or hand-edited file is named here, not half-way through
        state.step, state.planned_steps, state.adam_groups, state.preset()
    except (KeyError, ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise InputError(f"state file '{path}' is damaged ({e.__class__.__name__} in its metadata): start a new run with {fresh}") from None
    return state
