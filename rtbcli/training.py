"""What the two training loops (pretrain, finetune) share: where a run's files go, stopping on a
signal, and resuming.

Files of a run writing `X.safetensors` (all written atomically):

- `X.safetensors`, `X.state.safetensors`, `X.jsonl`: the finished run (checkpoint, resumable
  state, log);
- `X.partial.safetensors`, `X.partial.state.safetensors`, `X.partial.jsonl`: the last saved
  step of an unfinished run (every `save_every` steps, and on SIGINT/SIGTERM), removed when the
  run finishes; `--resume X.partial.safetensors` continues it;
- `X.last-good.safetensors`: after a divergence, the last state that was finite.

Signals: the first SIGINT or SIGTERM asks the loop to stop after the step in progress; it saves
that step (checkpoint and state) and exits with 130 (SIGINT) or 143 (SIGTERM). A second signal
stops at once (`StoppedAtOnce`, raised wherever the run is): whatever file was being written is
left as it was (writes go to a temporary name that is removed).
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import StoppedAtOnce
from .state import state_path

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


@dataclass(frozen=True)
class RunPaths:
    """Every file a run writing `out` may leave."""

    out: Path

    def _sibling(self, suffix: str) -> Path:
        return self.out.with_name(self.out.name.removesuffix(".safetensors") + suffix)

    @property
    def log(self) -> Path:
        return self._sibling(".jsonl")

    @property
    def state(self) -> Path:
        return state_path(self.out)

    @property
    def partial(self) -> Path:
        return self._sibling(".partial.safetensors")

    @property
    def partial_state(self) -> Path:
        return state_path(self.partial)

    @property
    def partial_log(self) -> Path:
        return self._sibling(".partial.jsonl")

    @property
    def last_good(self) -> Path:
        return self._sibling(".last-good.safetensors")

    def remove_partial(self) -> None:
        for p in (self.partial, self.partial_state, self.partial_log):
            p.unlink(missing_ok=True)


def is_partial(path: Path) -> bool:
    return Path(path).name.endswith(".partial.safetensors")


def final_of(partial: Path) -> Path:
    """`X.partial.safetensors` -> `X.safetensors`."""
    p = Path(partial)
    return p.with_name(p.name.removesuffix(".partial.safetensors") + ".safetensors")


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


class StopSignals:
    """Turn SIGINT/SIGTERM into a request the loop checks between steps (see the module docstring).

    Handlers are installed only in the main thread (elsewhere Python does not allow it, and the
    loop then runs without them).
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL/SIG_IGN or None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
            return
        raise StoppedAtOnce(f"stopped at once by a second {SIGNAL_NAMES.get(signum, signum)}: nothing more was saved", 128 + signum)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.requested or signal.SIGINT)

    @property
    def name(self) -> str:
        return "a signal" if self.requested is None else SIGNAL_NAMES.get(signal.Signals(self.requested), "a signal")


def resume_command(command: str, partial: Path, preset, device) -> str:
    """The command that continues a stopped run: its Python reward named again (a checkpoint never
    imports one by itself), and the device when `auto` would pick another."""
    from .config import PythonRewardSpec
    from .rewards import is_trusted

    words = ["rtbcli", command, "--resume", str(partial)]
    reward = getattr(preset, "reward", None)
    if isinstance(reward, PythonRewardSpec) and not is_trusted(reward.function):
        words += ["--reward", reward.function]
    if device.type == "cpu" and torch.cuda.is_available():
        words += ["--device", "cpu"]
    return shlex.join(words)


def earlier_log(state, checkpoint: Path) -> list[str]:
    """The log records of a resumed run up to its step: from the log its state names, looked for
    first beside the checkpoint (where the commands write it, wherever the folder has moved)."""
    recorded = state.meta.get("log", "")
    if not recorded:
        return []
    beside = Path(checkpoint).with_name(Path(recorded).name)
    return read_log_until(beside if beside.exists() else Path(recorded), state.step)


def read_log_until(path: Path, step: int) -> list[str]:
    """The records of an earlier part of the run (steps <= `step`), to continue its log."""
    if not Path(path).exists():
        return []
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                lines.append(line)
        except json.JSONDecodeError:
            break
    return lines


def config_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """'finetune.batch_size 8 vs 200' for every leaf where two dumped presets differ."""
    out = []
    for k in saved.keys() | given.keys():
        a, b = saved.get(k), given.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a} vs {b}" if len(repr(a)) + len(repr(b)) < 60 else f"{prefix}{k}")
    return sorted(out)
