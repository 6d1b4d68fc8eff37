"""What every command of the command line shares: errors, JSON, and options read from the config models.

Conventions: results go to stdout (a rich table, or one JSON object with --json); progress and
warnings go to stderr. Exit codes are listed in `rtbcli.errors`.

Options that set a preset field take their help text and default from the pydantic model
(`field_help`, or `field_default` for the default alone), and choices from its `Literal` type
(`choices`), so that a default or a list of choices lives in one place.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import cast, get_args

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from .config import Preset, option_error
from .errors import EXIT_RUN, EXIT_SIGINT, InputError, Interrupted, RtbcliError, RtbcliWarning
from .runtime import check_writable

# How long a rank other than 0 waits for rank 0 to report an error they share: rank 0 raises it at
# about the same time (bad input, a diverged loss, a lost peer), or just after the barrier of a stop.
RANK_ZERO_GRACE_S, AFTER_STOP_GRACE_S = 5.0, 0.5

# Results on stdout; when it is not a terminal (pipes, logs, CI) tables get 120 columns, not 80.
out_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)

# --seed on every command: torch's generators take a 64-bit seed; outside this range a run failed midway (exit 1)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def fail(message: str, code: int = 2) -> typer.Exit:
    print(f"rtbcli: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr: `rtbcli: warning: ...` (rtbcli's own), or Python's usual form."""
    if issubclass(category, RtbcliWarning):
        print(f"rtbcli: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


def not_rank_zero() -> bool:
    """A process of a multi-process job other than rank 0 (torchrun sets RANK and WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def handle_errors(fn):
    """Turn library errors into one line on stderr and their exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RtbcliError as e:
            if e.every_rank and not_rank_zero():
                # Rank 0 raised it too and reports it. Exiting first would let torchrun stop rank 0
                # before it prints, so wait: torchrun ends this process as soon as rank 0 exits.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(AFTER_STOP_GRACE_S if isinstance(e, Interrupted) else RANK_ZERO_GRACE_S)
                raise typer.Exit(e.exit_code) from None
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt as e:  # Ctrl-C before a run's loop, or a second signal during it
            raise fail(str(e) or "interrupted", getattr(e, "exit_code", EXIT_SIGINT)) from None
        except typer.Exit:
            raise
        except SystemExit as e:  # rtbcli's commands never raise it: code of yours (a network's forward, say) called sys.exit()
            raise fail(f"your code called sys.exit({e.code!r}) during the command: it stopped there, unfinished", EXIT_RUN) from None
        except Exception as e:  # a bug or an environment failure: still one line, exit 1
            if os.environ.get("RTBCLI_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise fail(f"unexpected {e.__class__.__name__}: {first} (set RTBCLI_DEBUG=1 for a traceback)", EXIT_RUN) from None

    return wrapper


def check_checkpoint_out(out: Path, start_path: Path | None = None, start_kind: str = "") -> Path:
    """The --out of a command that writes a checkpoint (a training run, convert-params), checked before anything runs
    (bad input, exit 2): a `.safetensors` name, since a run writes its log and state beside it (`RunPaths`: X.jsonl,
    X.state.safetensors, ...), so another name could put the log over the checkpoint; where it exists, an rtbcli
    checkpoint (a command replaces an earlier checkpoint, never a data, reward or other file of yours); and not the
    checkpoint it starts from (`start_path`, a `start_kind` one)."""
    from .checkpoint import is_checkpoint_file

    check_writable(out, "--out")
    if not out.name.endswith(".safetensors") or out.name == ".safetensors":
        raise InputError(
            f"--out '{out}' must be a .safetensors file name: a checkpoint (a run writes its log and state beside it: X.jsonl, X.state.safetensors)"
        )
    if not out.exists():
        return out
    if start_path is not None and Path(start_path).exists() and os.path.samefile(out, start_path):
        raise InputError(f"--out is the {start_kind} checkpoint it starts from: choose another file name")
    if not is_checkpoint_file(out):
        raise InputError(f"--out '{out}' exists and is not an rtbcli checkpoint: choose another file name (only a checkpoint is replaced)")
    return out


def field_default(model: type[BaseModel], name: str):
    """A field's default as the config model declares it, for a help text (20_000 shown as 20,000)."""
    default = model.model_fields[name].default
    return f"{default:,}" if isinstance(default, int) and not isinstance(default, bool) and default >= 10_000 else default


def field_help(model: type[BaseModel], name: str, extra: str = "") -> str:
    """An option's help: the field's docstring and its default, as the config model declares them."""
    f = model.model_fields[name]
    shown = f" [default: the preset's; {field_default(model, name)} where it says nothing]" if f.default is not None else ""
    text = (f.description or "").strip()
    return f"{text.rstrip('.') if extra else text}{extra}{shown}"


def choices(model: type[BaseModel], name: str) -> type[Enum]:
    """A str Enum of a Literal field's values, for Typer's choice checking."""
    values = get_args(model.model_fields[name].annotation)
    # Enum's functional API makes a class; mypy types the call as an instance of Enum
    return cast("type[Enum]", Enum(f"{model.__name__}_{name}", [(v, v) for v in values], type=str))


def with_overrides(preset: Preset, section: str, **values) -> Preset:
    """Apply command-line overrides to a preset section, naming the option when one is invalid."""
    values = {k: (v.value if isinstance(v, Enum) else v) for k, v in values.items()}
    try:
        return preset.updated(section, **values)
    except ValidationError as e:
        raise option_error(e) from None


def json_safe(obj):
    """Non-finite floats become null: strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """Print exactly one JSON object on stdout."""
    print(json.dumps(json_safe(obj), allow_nan=False, default=str))


def positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise InputError(f"{name} must be positive (got {value})")


def parse_kwargs(items: list[str] | None, option: str = "--reward-arg") -> dict:
    """`--reward-arg KEY=VALUE` (repeatable; `option` names it in the message): VALUE read as JSON (numbers,
    true/false, lists, "strings"), else as text."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"{option} '{item}': write KEY=VALUE, e.g. {option} scale=3")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def examples(*lines: str) -> str:
    """An 'Examples' block for a command's help (shown verbatim)."""
    return "\n\n\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
