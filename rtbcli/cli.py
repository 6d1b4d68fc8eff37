"""The `rtbcli` command line: a thin Typer layer over the library.

Each command lives with its kind (`cli_train`: pretrain, finetune; `cli_eval`: evaluate, sample;
`cli_presets`; `cli_convert`); this module builds the app, runs `reproduce`, and is the entry
point, which alone sets process-wide things: how warnings print, and glibc's allocator hint
(`runtime.keep_freed_memory`).

Conventions: results go to stdout (a rich table, or one JSON object with --json); progress and
warnings go to stderr. Bad input prints one line `rtbcli: error: ...` and exits 2; every exit
code is listed in `rtbcli.errors`; nothing on disk is replaced unless the command succeeds.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from . import __version__
from .cli_common import SEED_MAX, SEED_MIN, emit_json, examples, handle_errors, out_console, positive, show_warning
from .errors import EXIT_INPUT, EXIT_SIGINT, RtbcliWarning
from .presets_loader import DEFAULT_PRESET, shipped_presets
from .runtime import keep_freed_memory, resolve_device


def _usage_error_class() -> type[Any]:
    """typer >= 0.26 vendors click and raises its usage errors as typer.TyperException; older typer
    raises click's own ClickException. Typed Any: click has no type information here, and both have
    format_message, exit_code and (click's) ctx."""
    cls = getattr(typer, "TyperException", None)
    if cls is None:  # pragma: no cover - old typer
        from click import ClickException

        return ClickException
    return cls


_CliUsageError = _usage_error_class()

app = typer.Typer(
    name="rtbcli",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_callback(value: bool):
    if value:
        print(f"rtbcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit.")):
    """Fine-tune diffusion samplers toward a reward: RTB, Trust-PCL and KL-regularised REINFORCE.

    Exit codes: 0 success; 1 a run failed after it started; 2 bad input (nothing written);
    3 an `evaluate --require` check failed; 130 / 143 stopped by SIGINT / SIGTERM (the last
    completed step is saved, resumable with --resume).
    """
    warnings.showwarning = show_warning  # rtbcli's warnings as one line on stderr
    warnings.simplefilter("always", RtbcliWarning)


root.__doc__ = inspect.cleandoc(root.__doc__ or "") + examples(  # cleandoc: the appended block has no indentation to strip
    "rtbcli presets",
    "rtbcli pretrain --out prior.safetensors",
    "rtbcli finetune --prior prior.safetensors --algo rtb --out rtb.safetensors",
    "rtbcli reproduce --preset digits --quick",
)


def _shipped_list() -> str:
    """The shipped presets, the default first: 'reference (the paper's example), digits, manywell32'."""
    names = sorted(shipped_presets(), key=lambda name: name != DEFAULT_PRESET)
    return ", ".join(f"{name} (the paper's example)" if name == "reference" else name for name in names)


def reproduce(
    preset: str | None = typer.Option(
        None, "--preset", "-p", help=f"The task: {_shipped_list()}, or a .toml file [default: {DEFAULT_PRESET}]."
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Reduced budget (minutes on 2 CPU threads), starting from the preset's shipped prior (energy presets: "
        "1 seed, TB+Expl+LS and VarGrad+Expl, 1,000 steps).",
    ),
    prior: Path | None = typer.Option(None, "--prior", help="Reuse this prior instead of pretraining one."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Random seed for every stage (energy presets: the first of --seeds)."),
    seeds: int | None = typer.Option(
        None, "--seeds", help="Energy presets: seeds per configuration, mean ± std over them [default: 5; quick: 1]."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for checkpoints, logs, figure.png and summary.json [default: runs/reproduce-PRESET[-quick]]."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow an --out folder that already holds files."),
    steps: int | None = typer.Option(None, help="Fine-tuning steps per method [default: the preset's; quick: its reproduce.quick_steps]."),
    batch_size: int | None = typer.Option(None, help="Fine-tuning batch size [default: the preset's; quick: reproduce.quick_batch_size]."),
    n: int | None = typer.Option(None, "--n", "-n", help="Samples per evaluation [default: the preset's; quick: reproduce.quick_n]."),
    pretrain_steps: int | None = typer.Option(None, help="Pretraining steps when no --prior is given [default: the preset's]."),
    configs: str | None = typer.Option(
        None,
        "--configs",
        help="Energy presets: the configurations to run, comma-separated (e.g. 'TB+Expl+LS,VarGrad+Expl') "
        "[default: all; quick: TB+Expl+LS,VarGrad+Expl].",
    ),
    reuse: bool = typer.Option(
        False,
        "--reuse",
        help="Energy presets: evaluate finished runs already in --out (same configuration, seed and settings) instead of "
        "training them again: resume a cut-off grid, or collect seeds run as separate commands (--seed K --seeds 1) into one table.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json's content as one JSON object."),
):
    """A benchmark in one command: the prior, every method, one table, one figure."""
    from dataclasses import replace

    from .presets_loader import load_preset
    from .report import summary_table
    from .reproduce import budget_for
    from .reproduce import reproduce as run_reproduce

    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--n", n), ("--pretrain-steps", pretrain_steps), ("--seeds", seeds)):
        positive(name, v)
    p, _ = load_preset(preset)
    budget = replace(
        budget_for(p, quick),
        **{
            k: v
            for k, v in (("finetune_steps", steps), ("batch_size", batch_size), ("eval_n", n), ("pretrain_steps", pretrain_steps))
            if v is not None
        },
    )
    summary = run_reproduce(
        out,
        prior_path=prior,
        quick=quick,
        seed=seed,
        device=resolve_device(device),
        overwrite=overwrite,
        progress=not quiet,
        budget=budget,
        preset_ref=preset,
        seeds=seeds,
        configs=None if configs is None else [c.strip() for c in configs.split(",") if c.strip()],
        reuse=reuse,
    )
    if as_json:
        return emit_json(summary)
    if summary.get("mode") == "energy":
        from .reproduce_energy import energy_table, goal_table

        out_console.print(energy_table(summary))
        goals = goal_table(summary)
        if goals is not None:
            out_console.print(goals)
        out_console.print(
            f"figure: {summary.get('figure')}   summary: {Path(summary['out']) / 'summary.json'}   wall time: {summary['wall_seconds']:.0f} s"
        )
        return None
    from rich.console import Console

    wide = out_console if out_console.is_terminal else Console(soft_wrap=True, width=200)  # a file or pipe gets the whole table
    wide.print(summary_table(summary))
    out_console.print(
        f"figure: {summary['figure']}   summary: {Path(summary['out']) / 'summary.json'}   wall time: {summary['wall_seconds']:.0f} s"
    )


reproduce.__doc__ = (reproduce.__doc__ or "") + examples(
    "rtbcli reproduce --quick",
    "rtbcli reproduce --preset manywell32 --quick",
    "rtbcli reproduce --preset gmm25-energy --quick",
    "rtbcli reproduce --out runs/full --device cpu",
)


def _register() -> None:
    from .cli_convert import convert_params
    from .cli_eval import evaluate, sample
    from .cli_presets import app as presets_app
    from .cli_train import finetune, merge, pretrain

    app.add_typer(presets_app, name="presets")
    for name, fn in (
        ("pretrain", pretrain),
        ("finetune", finetune),
        ("sample", sample),
        ("evaluate", evaluate),
        ("convert-params", convert_params),
        ("merge", merge),
        ("reproduce", reproduce),
    ):
        app.command(name)(handle_errors(fn))


_register()


def run(argv: list[str] | None = None) -> int:
    """Run one command; click's own usage errors are reduced to one line too (exit 2)."""
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="rtbcli", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except _CliUsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `rtbcli` alone: its help (click's or typer's vendored class)
            print(e.format_message(), file=sys.stderr)
            return EXIT_INPUT
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        print(f"rtbcli: error: {e.format_message().replace('Value error, ', '')}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INPUT)
    except typer.Abort:
        print("rtbcli: error: aborted", file=sys.stderr)
        return EXIT_SIGINT
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """The console script: process-wide settings, then one command."""
    keep_freed_memory()
    sys.exit(run())
