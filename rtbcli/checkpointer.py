"""What a training run writes: its checkpoint and its resumable state, and their metadata.

The file formats (safetensors, string metadata) are `rtbcli.checkpoint` (checkpoints) and
`rtbcli.state` (states); this module decides what a run puts in them, in one place for both
commands.

Checkpoint metadata (format version 2): `base_metadata`'s keys (format, versions, kind, config,
preset, step, seed, run), `run_id`, and for fine-tuning `algo`, `beta`, `alpha`, `prior_sha256`,
`prior_path`, `reward` (and `reward_sha256`). `run` (JSON) holds the run's options that are not
keys of their own: command, device, steps (the total planned now), schedule_steps (the original
planned length the schedules follow), processes, out, status, on_policy, warm start and
divergence facts. The seed, the run id and the prior's path are each stored once (version 1
repeated them inside `run`; version-1 files still load).

State metadata (format version 2): kind, run_id, step, planned_steps (the total planned now),
schedule_steps (the original planned length), seed, device, config, preset, log, and for
fine-tuning algo, on_policy, step_offset, warm_start. Version 1 had no schedule_steps (its
planned_steps stands for it) and an `exploration_schedule` that nothing read (it is in config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import base_metadata, save_checkpoint
from .config import Preset
from .state import RunState, save_state, state_path


@dataclass
class RunInfo:
    """The facts about a run that its files record (the same at every save)."""

    command: str  # "pretrain" or "finetune"
    run_id: str
    seed: int
    device: torch.device
    preset: Preset
    preset_ref: str
    steps: int  # the total planned now (a resumed run may extend it)
    schedule_steps: int  # the original planned length: the schedules' N
    processes: int
    out: Path
    checkpoint_meta: dict = field(default_factory=dict)  # recipe's own top-level checkpoint keys (algo, beta, prior_path, ...)
    run_meta: dict = field(default_factory=dict)  # recipe's own options inside `run` (on_policy, warm start, ...)
    state_meta: dict = field(default_factory=dict)  # recipe's own state keys (algo, on_policy, step_offset, ...)

    @property
    def kind(self) -> str:
        return "prior" if self.command == "pretrain" else "finetuned"

    def checkpoint_metadata(self, step: int, status: str, top: dict | None = None, **extra) -> dict[str, str]:
        """The checkpoint's metadata at `step` (the number the checkpoint carries): `top` adds
        top-level keys, `extra` options inside `run`."""
        run = {
            "command": self.command,
            "device": self.device.type,
            "steps": self.steps,
            "schedule_steps": self.schedule_steps,
            "processes": self.processes,
            "out": str(self.out),
            "status": status,
            **self.run_meta,
            **extra,
        }
        meta = base_metadata(self.kind, self.preset, self.preset_ref, step, self.seed, run)
        meta.update(run_id=self.run_id, **self.checkpoint_meta, **(top or {}))
        return meta

    def state_metadata(self, step: int, log_to: Path | None, seconds: float = 0.0) -> dict[str, str]:
        return {
            "kind": self.command,
            "run_id": self.run_id,
            "step": step,
            "seconds": repr(seconds),  # training time to `step`, which a resumed run's log counts on from
            "planned_steps": self.steps,
            "schedule_steps": self.schedule_steps,
            "seed": self.seed,
            "device": self.device.type,
            "config": self.preset.model_dump_json(),
            "preset": self.preset_ref,
            "log": str(log_to) if log_to else "",
            **self.state_meta,
        }


def schedule_steps(state: RunState) -> int:
    """The original planned length of a saved run (version 1: its planned_steps)."""
    return int(state.meta.get("schedule_steps", state.meta["planned_steps"]))


def save_run(
    path: Path,
    info: RunInfo,
    step: int,
    status: str,
    log_to: Path | None,
    *,
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    extra: dict[str, torch.Tensor] | None = None,
    checkpoint_step: int | None = None,
    top: dict | None = None,
    seconds: float = 0.0,
) -> None:
    """The checkpoint of `step` at `path` and its state beside it (both atomic; call inside an
    `atomic_group` so that they are put in place together). `checkpoint_step`: the step the
    checkpoint carries, when it differs (a warm-started run counts on from its start); `top`:
    more top-level checkpoint keys; `seconds`: the training time to `step` (the state keeps it for a resumed run's log)."""
    meta = info.checkpoint_metadata(step if checkpoint_step is None else checkpoint_step, status, top)
    save_checkpoint(path, tensors, meta)
    save_state(
        state_path(path), params=params, opt=opt, generators=generators, meta=info.state_metadata(step, log_to, seconds), extra=extra
    )
