"""What the three `rtbcli reproduce` drivers share (reproduce, reproduce_energy, reproduce_unet): the shipped priors'
place, a summary's provenance block, and a summary row's metrics and floors."""

from __future__ import annotations

import datetime as _dt
import platform
import time
from importlib import resources
from pathlib import Path

import torch

from . import __version__
from .metric_registry import floor_of, row_keys, with_floor


def shipped_prior(name: str = "prior-reference.safetensors") -> Path:
    """A prior that ships with rtbcli (made by `rtbcli pretrain`; see its metadata)."""
    return Path(str(resources.files("rtbcli") / "data" / name))


def provenance(started: _dt.datetime, t_start: float, device: torch.device) -> dict:
    """What every reproduce summary records of the run itself: versions, machine, start and wall time, device."""
    return {
        "device": device.type,
        "rtbcli_version": __version__,
        "torch_version": torch.__version__,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def metrics_of(m: dict) -> dict:
    """A summary row's metrics: the registry's row keys of an evaluation report."""
    return {k: m.get(k) for k in row_keys()}


def floor_row(m: dict, method: str) -> dict:
    """What a sampler of the target itself scores: the exact sampler, or the reference against itself; each metric's
    floor where the registry says it lives."""
    return {
        "method": "exact sampler (floor)" if method != "reference" else "reference (floor)",
        **{x.key: floor_of(m, x.key) for x in with_floor()},
    }
