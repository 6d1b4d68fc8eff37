"""`rtbcli presets`: list the shipped presets, show one, or write a commented preset to edit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .cli_common import emit_json, examples, handle_errors, out_console
from .energy.loading import resolve_target
from .errors import InputError
from .preset_toml import own_task_template, render_preset
from .presets_loader import load_preset, shipped_preset_text, shipped_presets
from .report import fmt
from .runtime import atomic_write_text, check_writable

app = typer.Typer(
    help="List the shipped presets (tasks with their budgets), show one, or start your own."
    + examples("rtbcli presets", "rtbcli presets init mytask.toml --from reference"),
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
@handle_errors
def list_presets(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the shipped presets."""
    if ctx.invoked_subcommand is not None:
        return
    rows: list[dict[str, Any]] = []
    for name in shipped_presets():
        p, _ = load_preset(name, resolve=False)
        p = resolve_target(p, allow_import=False)  # a shipped target's dimension
        rows.append(
            {
                "name": name,
                "description": p.description,
                "dim": p.target.dim if p.target is not None else p.prior_data.dim if p.prior_data is not None else None,
                "beta": p.beta,
                "data": p.prior_data.kind if p.prior_data is not None else "none (energy: Brownian prior)",
                "reward": "derived (energy)" if p.target is not None else None if p.reward is None else p.reward.type,
            }
        )
    if as_json:
        return emit_json(rows)
    t = Table(title="shipped presets (rtbcli presets show NAME)", title_justify="left")
    for c in ("name", "dim", "beta", "data", "reward", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], str(r["dim"]), fmt(r["beta"]), r["data"], str(r["reward"]), r["description"])
    out_console.print(t)


@app.command("show")
@handle_errors
def show(
    name: str = typer.Argument(..., help="A shipped preset name or a path to a .toml file."),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved preset (every default filled in) as JSON."),
):
    """Print a preset: the TOML file (shipped ones with their comments), or its resolved settings as JSON."""
    p, ref = load_preset(name)
    if as_json:
        return emit_json(p.model_dump())
    text = shipped_preset_text(ref) if ref in shipped_presets() else Path(ref).read_text(encoding="utf-8")
    print(text, end="" if text.endswith("\n") else "\n")


@app.command("init")
@handle_errors
def init(
    file: Path = typer.Argument(..., help="The preset file to write (never over an existing file)."),
    from_: str | None = typer.Option(
        None, "--from", help="Start from this preset (a shipped name or a file) [default: a template for your own data and reward]."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Write a commented preset to edit: every key with what it means and its value."""
    if file.suffix.lower() != ".toml":
        raise InputError(f"'{file}' must end in .toml")
    if file.exists():
        raise InputError(f"'{file}' already exists: choose a new file name (presets init never overwrites)")
    check_writable(file, "preset")
    preset = own_task_template() if from_ is None else load_preset(from_, resolve=False)[0]
    atomic_write_text(file, render_preset(preset, base=file.resolve().parent))
    if as_json:
        return emit_json({"preset": str(file), "from": from_ or "template"})
    out_console.print(f"wrote {file}: edit it, then e.g. `rtbcli pretrain --preset {file}`")


init.__doc__ += examples("rtbcli presets init mytask.toml --from reference", "rtbcli presets init mytask.toml")
show.__doc__ += examples("rtbcli presets show manywell32")
