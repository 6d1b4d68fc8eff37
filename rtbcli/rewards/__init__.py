"""Rewards: log r(x) from a Gaussian mixture, or from your own Python function.

A Python reward is named by a reference, `path/to/file.py:function` or `package.module:function`,
and called as `function(x, **kwargs)` on a float tensor x of shape (B, d) on the run's device,
without gradient; it returns log r(x) of shape (B,).

Safety: loading a checkpoint never imports anything. A checkpoint records its reward's
reference (and, for a file, its SHA-256), and the reward is imported only when the user names it
again (`--reward`, or a preset that names it). The rewards that ship with rtbcli
(`rtbcli.rewards.*`) are part of the installed package and are imported without asking.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import keyword
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, RtbcliWarning, RunError
from ..hashing import sha256_file

TRUSTED_PREFIX = "rtbcli.rewards."  # rewards that ship with rtbcli


def _identifier_path(text: str) -> bool:
    return bool(text) and all(p.isidentifier() and not keyword.iskeyword(p) for p in text.split("."))


def parse_reference(ref: str, what: str = "reward") -> tuple[str | None, str]:
    """'file.py:name' -> (file path, name); 'package.module:name' -> (None, name). InputError otherwise.

    `what` names the thing referred to in the messages ("reward", "target"; "network" names a class)."""
    noun = _noun(what)
    how = f"give 'path/to/{what}s.py:{noun}' or 'package.module:{noun}'"
    if not isinstance(ref, str) or ref.count(":") < 1:
        raise InputError(f"{what} '{ref}' names no {noun}: {how}")
    where, attr = ref.rsplit(":", 1)
    if not _identifier_path(attr):
        raise InputError(f"{what} '{ref}': '{attr}' is not a Python name: {how}")
    if where.endswith(".py") or "/" in where or os.sep in where:
        return where, attr
    if not _identifier_path(where):
        raise InputError(f"{what} '{ref}': '{where}' is neither a .py file nor a module name: {how}")
    return None, attr


def _noun(what: str) -> str:
    return "Class" if what == "network" else "function"


def is_trusted(ref: str) -> bool:
    """A reward that ships with rtbcli, imported without being named again."""
    return parse_reference(ref)[0] is None and ref.startswith(TRUSTED_PREFIX)


def import_function(ref: str, what: str = "reward") -> tuple[Callable, str | None]:
    """The callable a reference names, and the SHA-256 of the file it came from (None if unknown).

    `what` names the thing referred to in the messages ("reward", "target")."""
    path, attr = parse_reference(ref, what)
    sha: str | None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{what} file '{path}' not found: check the path (a preset's paths are relative to the preset file)")
        name = f"rtbcli_{what}_" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None or spec.loader is None:
            raise InputError(f"{what} file '{path}' cannot be imported: give a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(p.resolve().parent))  # so that the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            raise InputError(f"{what} file '{path}' failed to import ({e.__class__.__name__}: {_first_line(e)}): fix the file") from None
        finally:
            sys.path.remove(str(p.resolve().parent))
        sys.modules[name] = module
        where, sha = f"file '{path}'", sha256_file(p)
    else:
        modname = ref.rsplit(":", 1)[0]
        added = os.getcwd() not in sys.path
        if added:
            sys.path.append(os.getcwd())  # like `python -m`: a package in the working folder is found
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):
                raise InputError(
                    f"{what} module '{modname}' not found: install it, run from its folder, or give a file (path/to/{what}s.py:{attr})"
                ) from None
            raise InputError(f"{what} module '{modname}' failed to import ({e.__class__.__name__}: {_first_line(e)}): fix it") from None
        except (Exception, SystemExit) as e:
            raise InputError(f"{what} module '{modname}' failed to import ({e.__class__.__name__}: {_first_line(e)}): fix it") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
        src = getattr(module, "__file__", None)
        where, sha = f"module '{modname}'", (sha256_file(src) if src and Path(src).is_file() else None)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{what} {where} has no '{attr}': name a {_noun(what).lower()} defined there")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{what} {where}: '{attr}' is a {type(obj).__name__}, not a function: name a function taking x (B, d)")
    return obj, sha


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:200]


class RewardFailed(RunError):
    """The reward raised or returned something unusable during a run (exit code 1)."""


@dataclass
class PythonReward:
    """log r(x) = function(x, **kwargs), checked for type and shape on every call."""

    reference: str
    function: Callable
    kwargs: dict = field(default_factory=dict)
    sha256: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            try:
                out = self.function(x.clone(), **self.kwargs)  # a copy: a reward that edits x in place must not move the samples
            except (Exception, SystemExit) as e:  # sys.exit() in a reward would end the run as a success
                raise RewardFailed(f"the reward '{self.reference}' raised {e.__class__.__name__}: {_first_line(e)}") from None
        return checked_output(out, x, f"the reward '{self.reference}'", "log r(x)", RewardFailed)


def checked_output(out: object, x: torch.Tensor, who: str, what: str, error: type[RunError]) -> torch.Tensor:
    """A user function's value at x, checked to be a tensor of shape x.shape[:-1] (in x's dtype), else `error`
    naming `who` (e.g. "the reward 'r.py:f'") and what it should return (e.g. "log r(x)")."""
    if not isinstance(out, torch.Tensor):
        raise error(f"{who} returned a {type(out).__name__}, not a torch tensor: return {what} as a tensor of shape (B,)")
    if out.dtype == torch.bool or out.is_complex():
        raise error(f"{who} returned a {out.dtype} tensor: return {what} as real floating-point numbers")
    if out.device != x.device:
        raise error(f"{who} returned a tensor on {out.device} for x on {x.device}: return {what} on x's device")
    if out.shape != x.shape[:-1]:
        raise error(
            f"{who} returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}: return {what} of shape {tuple(x.shape[:-1])}"
        )
    return out.to(x.dtype)


@dataclass
class UnnamedReward:
    """The Python reward a checkpoint records, not imported: loading a checkpoint never runs code."""

    reference: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise InputError(
            f"this checkpoint was trained with the Python reward '{self.reference}', and loading a checkpoint never "
            f"imports code: name it again with --reward {self.reference}"
        )


def load_python_reward(spec, *, allow_import: bool = True) -> PythonReward | UnnamedReward:
    """The reward a `PythonRewardSpec` names; unless `allow_import`, only rtbcli's own rewards are imported."""
    if not allow_import and not is_trusted(spec.function):
        return UnnamedReward(spec.function)
    fn, sha = import_function(spec.function)
    if spec.sha256 is not None and sha is not None and sha != spec.sha256:
        warnings.warn(
            f"the reward file of '{spec.function}' has changed since the checkpoint recorded it "
            f"(SHA-256 {sha[:12]}... vs {spec.sha256[:12]}...)",
            RtbcliWarning,
            stacklevel=2,
        )
    return PythonReward(spec.function, fn, dict(spec.kwargs), sha)


def check_reward_output(reward, x: torch.Tensor, what: str = "samples of the prior") -> torch.Tensor:
    """Call the reward once before a run; any problem is bad input (exit 2), named with its fix."""
    try:
        out = reward(x)
    except RewardFailed as e:
        raise InputError(f"{e} (on {x.shape[0]} {what})") from None
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        raise InputError(
            f"the reward returns NaN or inf on {int(bad.sum())} of {out.numel()} {what}: make log r finite "
            f"wherever the prior puts mass (e.g. clamp it)"
        )
    return out
