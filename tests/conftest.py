"""Shared fixtures: tiny presets and checkpoints so that every test runs in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rtbcli.config import Preset
from rtbcli.presets_loader import load_preset

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def to_toml(data: dict) -> str:
    """Render a preset dict (scalars, lists, nested tables) as TOML."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if v is None:
            raise ValueError("TOML has no null")
        return repr(v)

    def table(prefix: str, d: dict) -> list[str]:
        lines = [f"[{prefix}]"] if prefix else []
        subs = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append((k, v))
            elif v is not None:
                lines.append(f"{k} = {value(v)}")
        for k, v in subs:
            lines += [""] + table(f"{prefix}.{k}" if prefix else k, v)
        return lines

    return "\n".join(table("", data)) + "\n"


def tiny(preset: Preset, **sections) -> Preset:
    """The reference task with a tiny sampler and budgets (overridable per section)."""
    p = preset.updated("sampler", steps=10, hidden=16, time_features=8, layers=2)
    p = p.updated("pretrain", steps=4, batch_size=32)
    p = p.updated("finetune", steps=4, batch_size=32)
    p = p.updated("evaluate", n=400)
    for name, changes in sections.items():
        p = p.updated("" if name == "top" else name, **changes)
    return p


@pytest.fixture(scope="session")
def reference() -> Preset:
    return load_preset("reference")[0]


@pytest.fixture(scope="session")
def tiny_preset(reference) -> Preset:
    return tiny(reference)


@pytest.fixture(scope="session")
def tiny_preset_file(tmp_path_factory, tiny_preset) -> Path:
    path = tmp_path_factory.mktemp("presets") / "tiny.toml"
    path.write_text(to_toml(tiny_preset.model_dump()))
    return path


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory, tiny_preset) -> Path:
    """A prior checkpoint trained for a few steps on the tiny preset."""
    from rtbcli.pretrain import pretrain

    out = tmp_path_factory.mktemp("prior") / "prior.safetensors"
    pretrain(tiny_preset, "tiny", out, seed=0, progress=False)
    return out


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny sequential ops (training runs): two threads give
    them nothing, and on shared cores OpenMP's spinning workers can make them many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
