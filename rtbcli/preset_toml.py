"""Presets written back as TOML, every key commented with the docstring it is declared with.

`rtbcli presets init FILE` writes one to edit. The TOML is built with tomlkit, so any value a
preset can hold (nested tables and arrays in a Python reward's kwargs, strings with quotes or
backslashes) is written as valid TOML that reads back to the same preset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import BaseModel
from tomlkit.container import Container
from tomlkit.items import Table

from .config import DataFileSpec, Preset, PythonRewardSpec
from .errors import InputError

RESOLVED = {"dim", "sha256"}  # filled in when a preset is loaded; not for a person to write
PATH_KEYS = ("path", "reference", "function")  # written relative to the preset file where possible
HEAD = (
    "An rtbcli preset: the task (prior data, reward, beta), the sampler and the default budgets.",
    "Paths are relative to this file. Check it with `rtbcli presets show THIS_FILE`.",
)


def _comment_lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").strip().splitlines() if line.strip()]


def _comment(where: Container | Table, text: str | None) -> None:
    for line in _comment_lines(text):
        where.add(tomlkit.comment(line))


def _value(v: Any, where: str, inline: bool = False) -> Any:
    """A TOML item for a plain value: a dict a table (an inline one inside an array), an array of
    arrays (a mixture's means) one row per line."""
    if v is None:
        raise InputError(f"preset value '{where}' is None, which TOML cannot write: remove it or give a value")
    if isinstance(v, dict):
        table = tomlkit.inline_table() if inline else tomlkit.table()
        for k, x in v.items():
            table.append(str(k), _value(x, f"{where}.{k}", inline))
        return table
    if isinstance(v, (list, tuple)):
        array = tomlkit.array()
        array.extend(_value(x, f"{where}[{i}]", inline=True) for i, x in enumerate(v))
        return array.multiline(True) if v and isinstance(v[0], (list, tuple)) else array
    return tomlkit.item(v)


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


def _fill(where: Container | Table, model: BaseModel, name: str, base: Path | None) -> None:
    """The model's plain keys (each under its comment), then its tables (each under its model's first doc line)."""
    fields = type(model).model_fields
    subtables: list[tuple[str, Any]] = []
    for key, field in fields.items():
        v = getattr(model, key)
        if isinstance(v, (BaseModel, dict)):
            subtables.append((key, v))
            continue
        if key in RESOLVED and not isinstance(model, Preset):
            continue
        _comment(where, field.description)
        if v is None:
            where.add(tomlkit.comment(f"{key} = ...  (not set)"))
            continue
        if base is not None and isinstance(v, str) and key in PATH_KEYS:
            v = _relative(v, base)
        where.add(key, _value(v, f"{name}{key}"))
    for key, sub in subtables:
        where.add(tomlkit.nl())
        if isinstance(sub, BaseModel):
            doc = type(sub).__doc__
            _comment(where, doc.strip().splitlines()[0] if doc else None)
            table = tomlkit.table()
            _fill(table, sub, f"{name}{key}.", base)
        else:
            _comment(where, fields[key].description)
            table = _value(sub, f"{name}{key}")
        where.add(key, table)
        table.trivia.indent = ""  # tomlkit puts a blank line before a table; here it goes before the table's comment


def render_preset(preset: Preset, base: Path | None = None) -> str:
    """The preset as TOML with a comment above every key; paths relative to `base` where possible."""
    doc = tomlkit.document()
    for line in HEAD:
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    _fill(doc, preset, "", base)
    return tomlkit.dumps(doc)


def own_task_template() -> Preset:
    """The starting point for your own data and reward."""
    return Preset(
        name="mytask",
        description="my data and my reward",
        prior_data=DataFileSpec(path="data.csv"),
        reward=PythonRewardSpec(type="python", function="rewards.py:log_reward"),
    )
