"""Presets written back as TOML, every key commented with the docstring it is declared with.

`rtbcli presets init FILE` writes one to edit; `render_preset` is also what `presets show --toml`
prints for a preset that is not a shipped file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from .config import DataFileSpec, Preset, PythonRewardSpec

RESOLVED = {"dim", "sha256"}  # filled in when a preset is loaded; not for a person to write


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        if v and isinstance(v[0], list):
            return "[\n" + "".join(f"  {_value(x)},\n" for x in v) + "]"
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _comment(text: str | None) -> list[str]:
    return [f"# {line.strip()}" for line in (text or "").strip().splitlines() if line.strip()]


def _table(name: str, model: BaseModel, base: Path | None) -> list[str]:
    lines = [f"[{name}]"] if name else []
    doc = type(model).__doc__
    if name and doc:
        lines[:0] = _comment(doc.strip().splitlines()[0])
    subtables = []
    for key, field in type(model).model_fields.items():
        v = getattr(model, key)
        if isinstance(v, BaseModel):
            subtables.append((key, v))
            continue
        if isinstance(v, dict):
            subtables.append((key, v))
            continue
        if key in RESOLVED and not isinstance(model, Preset):
            continue
        lines += _comment(field.description)
        if v is None:
            lines.append(f"# {key} = ...  (not set)")
            continue
        if base is not None and isinstance(v, str) and key in ("path", "reference", "function"):
            v = _relative(v, base)
        lines.append(f"{key} = {_value(v)}")
    out = lines
    for key, sub in subtables:
        full = f"{name}.{key}" if name else key
        out.append("")
        if isinstance(sub, dict):
            out += _comment(type(model).model_fields[key].description) + [f"[{full}]"] + [f"{k} = {_value(v)}" for k, v in sub.items()]
        else:
            out += _table(full, sub, base)
    return out


def _relative(value: str, base: Path) -> str:
    """An absolute path under `base` written relative to it (also inside 'file.py:function')."""
    path, sep, attr = value.rpartition(":") if value.count(":") and ".py:" in value else (value, "", "")
    p = Path(path)
    if p.is_absolute():
        try:
            path = os.path.relpath(p, base)
        except ValueError:
            pass
    return f"{path}{sep}{attr}"


def render_preset(preset: Preset, base: Path | None = None) -> str:
    """The preset as TOML with a comment above every key; paths relative to `base` where possible."""
    head = ["# An rtbcli preset: the task (prior data, reward, beta), the sampler and the default budgets.",
            "# Paths are relative to this file. Check it with `rtbcli presets show THIS_FILE`.", ""]
    return "\n".join(head + _table("", preset, base)) + "\n"


def own_task_template() -> Preset:
    """The starting point for your own data and reward."""
    return Preset(name="mytask", description="my data and my reward",
                  prior_data=DataFileSpec(path="data.csv"),
                  reward=PythonRewardSpec(type="python", function="rewards.py:log_reward"))
