"""Reading presets: shipped ones by name (`rtbcli/presets/*.toml`), any other TOML file by path.

The schema they are validated against is `rtbcli.config`; this module finds the file, parses the
TOML, anchors its relative paths at the file's folder, and (with `resolve`) reads a data file
once so that its dimension and SHA-256 become part of the preset (`rtbcli.data.resolve_data`).
A shipped energy target's dimension is filled in (`rtbcli.energy.loading.resolve_target`); a
user's target is imported only where it is used (`rtbcli finetune`).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from .config import DATA_SUFFIXES, Preset, describe_validation_error
from .data import resolve_data
from .energy.loading import resolve_target
from .errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_PRESET = "reference"


def shipped_presets() -> list[str]:
    """Names of the presets that ship with rtbcli."""
    folder = resources.files("rtbcli") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def shipped_preset_text(name: str) -> str:
    return (resources.files("rtbcli") / "presets" / f"{name}.toml").read_text(encoding="utf-8")


def looks_like_data_file(ref: str) -> bool:
    return Path(ref).suffix.lower() in DATA_SUFFIXES


def load_preset(name_or_path: str | Path | None = None, resolve: bool = True) -> tuple[Preset, str]:
    """Load a preset by shipped name or by path; returns it and the name it was found by.

    Relative paths in the file are taken relative to it. With `resolve` (the default) a data
    file is read once, so that its dimension and SHA-256 are part of the preset and a bad file
    is reported now (see `rtbcli.data.resolve_data`). Raises InputError naming the file and the
    bad key when the preset is invalid.
    """
    ref = str(name_or_path) if name_or_path is not None else DEFAULT_PRESET
    path = Path(ref)
    if looks_like_data_file(ref):
        raise InputError(
            f"'{ref}' is a data file, not a preset: use `rtbcli pretrain --data {ref}`, or name it in a preset's "
            f"[prior_data] path (see `rtbcli presets init`)"
        )
    if path.suffix == ".toml" or path.is_file() or "/" in ref:  # a folder of that name (a model) is not a preset
        if path.is_dir():
            raise InputError(f"preset file '{ref}' is a directory: give a .toml file")
        if not path.is_file():
            raise InputError(
                f"preset file '{ref}' not found: give a shipped name ({', '.join(shipped_presets())}) or a path to a .toml file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(
                f"preset file '{ref}' cannot be read ({e.__class__.__name__}): check its permissions and that it is a UTF-8 TOML file"
            ) from None
        label, base = str(path), path.resolve().parent
    elif ref in shipped_presets():
        text, label, base = shipped_preset_text(ref), f"{ref}.toml (shipped)", None
    else:
        raise InputError(f"unknown preset '{ref}': choose one of {', '.join(shipped_presets())}, or give a path to a .toml file")
    preset = parse_preset(text, label, base)
    if resolve:
        preset = resolve_target(resolve_data(preset, label), allow_import=False)
    return preset, ref


def parse_preset(text: str, label: str, base_dir: Path | None = None) -> Preset:
    """Validate a preset's TOML text; `label` names it in error messages, `base_dir` anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"preset {label}: not valid TOML ({e})") from None
    try:
        return Preset.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise InputError(describe_validation_error(e, f"preset {label}") + ": fix the file (see `rtbcli presets show reference`)") from None
