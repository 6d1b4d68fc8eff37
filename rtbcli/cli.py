"""The `rtbcli` command line: a thin Typer layer over the library.

Conventions: results go to stdout (a rich table, or one JSON object with --json); progress goes
to stderr. Bad input prints one line `rtbcli: error: ...` and exits 2; a run that fails after it
started exits 1; nothing on disk is replaced unless the command succeeds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import Preset, load_preset, shipped_presets
from .errors import InputError, RtbcliError
from .runtime import check_writable, resolve_device

# typer >= 0.26 vendors click and raises its usage errors as typer.TyperException; older typer
# raises click's own ClickException.
_CliUsageError = getattr(typer, "TyperException", None)
if _CliUsageError is None:  # pragma: no cover - old typer
    from click import ClickException as _CliUsageError

app = typer.Typer(
    name="rtbcli",
    help="Fine-tune diffusion samplers toward a reward: RTB, Trust-PCL and KL-regularised REINFORCE.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Results on stdout; when it is not a terminal (pipes, logs, CI) tables get 120 columns, not 80.
out_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)


class Algo(str, Enum):
    rtb = "rtb"
    trust_pcl = "trust-pcl"
    reinforce_kl = "reinforce-kl"
    legacy_rl = "legacy-rl"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    wsd = "wsd"


class Estimator(str, Enum):
    pairs = "pairs"
    trajectory = "trajectory"


class Snis(str, Enum):
    tempered = "tempered"
    exact = "exact"


def fail(message: str, code: int = 2) -> typer.Exit:
    print(f"rtbcli: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and their exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RtbcliError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except typer.Exit:
            raise
        except Exception as e:  # a bug or an environment failure: still one line, exit 1
            if os.environ.get("RTBCLI_DEBUG"):
                raise
            raise fail(f"unexpected {e.__class__.__name__}: {e} (set RTBCLI_DEBUG=1 for a traceback)", 1) from None

    return wrapper


OPTION_NAMES = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "lr_logz": "--lr-logz",
                "exploration": "--exploration", "beta": "--beta", "legacy_lambda": "--legacy-lambda", "snis": "--snis"}


def with_overrides(preset: Preset, section: str, **values) -> Preset:
    """Apply command-line overrides to a preset section, naming the option when one is invalid."""
    try:
        return preset.updated(section, **values)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][-1]) if err["loc"] else ""
        opt = OPTION_NAMES.get(field, field)
        msg = err['msg'].replace('Input should', 'should').replace('Value error, ', '')
        raise InputError(f"{opt} {msg} (got {err.get('input')!r})") from None


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


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, escape(fmt(v)))
    return t


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def version_callback(value: bool):
    if value:
        print(f"rtbcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit.")):
    """rtbcli: pretrain a diffusion prior, fine-tune it toward a reward, evaluate, reproduce the paper."""


# --------------------------------------------------------------------------- presets
@app.command("presets")
@handle_errors
def presets_cmd(name: Optional[str] = typer.Argument(None, help="Show this preset's resolved settings."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the shipped presets, or show one (resolved, with every default)."""
    if name is None:
        rows = []
        for p in shipped_presets():
            preset, _ = load_preset(p)
            rows.append({"name": p, "description": preset.description, "dim": preset.dim, "beta": preset.beta})
        if as_json:
            return emit_json(rows)
        t = Table(title="shipped presets", title_justify="left")
        for c in ("name", "dim", "beta", "description"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["name"], str(r["dim"]), fmt(r["beta"]), r["description"])
        out_console.print(t)
        return
    preset, _ = load_preset(name)
    if as_json:
        return emit_json(preset.model_dump())
    out_console.print_json(preset.model_dump_json())


# --------------------------------------------------------------------------- pretrain
@app.command()
@handle_errors
def pretrain(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Shipped preset name or path to a .toml file [default: reference]."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps [default: preset's, 10,000]."),
    batch_size: Optional[int] = typer.Option(None, help="Data points per step [default: preset's, 500]."),
    lr: Optional[float] = typer.Option(None, help="Peak Adam learning rate [default: preset's, 5e-3, decayed over the last 20%]."),
    lr_schedule: Optional[Schedule] = typer.Option(None, help="constant, cosine, or wsd (constant, then linear decay) [default: wsd]."),
    estimator: Optional[Estimator] = typer.Option(None, help="pairs (Rao-Blackwellised bridge marginals) or trajectory (the authors') [default: pairs]."),
    seed: int = typer.Option(0, help="Random seed (initialisation and data)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("prior.safetensors"), "--out", "-o", help="Checkpoint to write (atomically)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Pretrain a prior diffusion sampler on the preset's data (bridge maximum likelihood)."""
    from .pretrain import pretrain as run_pretrain

    p, ref = load_preset(preset)
    p = with_overrides(p, "pretrain", steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule.value if lr_schedule else None,
                       estimator=estimator.value if estimator else None)
    dev = resolve_device(device)
    check_writable(out, "--out")
    log = out.with_suffix(".jsonl")
    r = run_pretrain(p, ref, out, seed=seed, device=dev, log_path=log, progress=not quiet)
    res = {"checkpoint": str(r.out), "log": str(r.log), "preset": ref, "steps": r.steps, "seconds": round(r.seconds, 2),
           "steps_per_s": round(r.steps_per_s, 2), "loss": r.loss, "elbo": r.elbo, "data_log_prob": r.data_log_prob, "device": dev.type}
    if as_json:
        return emit_json(res)
    out_console.print(kv_table("pretrain", [("checkpoint", r.out), ("log", r.log), ("preset", ref), ("device", dev.type),
                                            ("steps", r.steps), ("wall time (s)", r.seconds), ("steps/s", r.steps_per_s),
                                            ("final loss", r.loss), ("ELBO of log p_theta(x), data", r.elbo),
                                            ("E_data log p_data(x)", r.data_log_prob)]))
    out_console.print(f"next: rtbcli evaluate {r.out}   or   rtbcli finetune --prior {r.out}")


# --------------------------------------------------------------------------- finetune
@app.command()
@handle_errors
def finetune(
    prior: Optional[Path] = typer.Option(None, "--prior", help="Prior checkpoint from `rtbcli pretrain` (the start)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a finetuned checkpoint instead (its policy, prior and log Z/V)."),
    algo: Algo = typer.Option(Algo.rtb, "--algo", "-a", case_sensitive=False,
                              help="rtb, trust-pcl, reinforce-kl, or legacy-rl (the RTB paper's mis-specified RL baseline; for reproducing its failing panel)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or path [default: the one the prior was pretrained with]."),
    beta: Optional[float] = typer.Option(None, help="Inverse temperature of the target p_prior r^beta [default: preset's]."),
    alpha: Optional[float] = typer.Option(None, help="Trust-PCL temperature alpha = 1/beta (give this or --beta)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps [default: preset's, 5,000]."),
    batch_size: Optional[int] = typer.Option(None, help="Trajectories per step [default: preset's, 500]."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate of the policy [default: 1e-3]."),
    lr_logz: Optional[float] = typer.Option(None, help="Adam learning rate of log Z [default: 0.1]; trust-pcl's V(s0) uses alpha times it."),
    exploration: Optional[float] = typer.Option(None, help="Exploration std s_e added to each step, decayed to 0 at 90% of the run [default: 0.5]."),
    on_policy: bool = typer.Option(False, "--on-policy", help="No exploration; reinforce-kl then uses uniform weights."),
    snis: Optional[Snis] = typer.Option(None, help="reinforce-kl importance weights: tempered (softmax of log-ratio / T, the authors') or exact SNIS."),
    legacy_lambda: Optional[float] = typer.Option(None, help="legacy-rl penalty weight lambda [default: 1.0, the authors' tuned value]."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Checkpoint to write [default: finetuned-ALGO.safetensors]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Fine-tune a prior so that its samples follow p_prior(x) r(x)^beta."""
    from .checkpoint import load_checkpoint
    from .finetune import finetune as run_finetune

    b = resolve_beta(beta, alpha)
    if (prior is None) == (resume is None):
        raise InputError("give exactly one of --prior (start from a prior) and --resume (continue a finetuned checkpoint)")
    start_path = prior or resume
    start = load_checkpoint(start_path, expect_kind="prior" if prior is not None else "finetuned")
    if preset is None:
        p, ref = start.preset, start.meta.get("preset", "reference")
    else:
        p, ref = load_preset(preset)
    p = with_overrides(p, "", beta=b)
    p = with_overrides(p, "finetune", steps=steps, batch_size=batch_size, lr=lr, lr_logz=lr_logz, exploration=exploration,
                       snis=snis.value if snis else None, legacy_lambda=legacy_lambda)
    dev = resolve_device(device)
    out = out or Path(f"finetuned-{algo.value}.safetensors")
    check_writable(out, "--out")
    if out.resolve() == start_path.resolve():
        raise InputError(f"--out is the {start.kind} checkpoint it starts from: choose another file name")
    r = run_finetune(start, p, ref, algo.value, out, seed=seed, device=dev, on_policy=on_policy,
                     log_path=out.with_suffix(".jsonl"), progress=not quiet)
    res = {"checkpoint": str(r.out), "log": str(r.log), "algo": r.algo, "beta": p.beta, "alpha": 1 / p.beta, "steps": r.steps,
           "seconds": round(r.seconds, 2), "steps_per_s": round(r.steps_per_s, 2), "loss": r.loss, "log_z": r.log_z,
           "mean_log_r": r.mean_log_r, "device": dev.type}
    if as_json:
        return emit_json(res)
    out_console.print(kv_table(f"finetune {r.algo}", [("checkpoint", r.out), ("log", r.log), ("beta / alpha", f"{p.beta:g} / {1 / p.beta:g}"),
                                                        ("device", dev.type), ("steps", r.steps), ("wall time (s)", r.seconds),
                                                        ("steps/s", r.steps_per_s), ("final loss", r.loss), ("learned log Z", r.log_z),
                                                        ("mean log r (last batch)", r.mean_log_r)]))
    out_console.print(f"next: rtbcli evaluate {r.out}")


def resolve_beta(beta: float | None, alpha: float | None) -> float | None:
    """--beta and --alpha = 1/beta are one setting; both given must agree."""
    for name, v in (("--beta", beta), ("--alpha", alpha)):
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise InputError(f"{name} must be a positive finite number (got {v})")
    if beta is not None and alpha is not None:
        if abs(alpha * beta - 1.0) > 1e-9:
            raise InputError(f"--alpha {alpha} and --beta {beta} disagree (alpha must be 1/beta): give only one")
        return beta
    return 1.0 / alpha if alpha is not None else beta


# --------------------------------------------------------------------------- sample
@app.command()
@handle_errors
def sample(
    checkpoint: Path = typer.Argument(..., help="Any rtbcli checkpoint (prior or finetuned)."),
    n: int = typer.Option(1000, "--n", "-n", help="Number of samples."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("samples.npy"), "--out", "-o", help="Output: .npy (float32, shape (n, d)) or .csv."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Draw samples x_T from a checkpoint's own policy and save them as .npy or .csv."""
    from .checkpoint import load_checkpoint
    from .sampling import draw_samples, save_samples

    if n <= 0:
        raise InputError(f"--n must be a positive number of samples (got {n})")
    if out.suffix.lower() not in (".npy", ".csv"):
        raise InputError(f"--out '{out}' must end in .npy or .csv")
    check_writable(out, "--out")
    ck = load_checkpoint(checkpoint)
    x = draw_samples(ck, n, seed, resolve_device(device))
    save_samples(out, x)
    res = {"out": str(out), "n": n, "dim": x.shape[1], "checkpoint": str(checkpoint), "kind": ck.kind, "algo": ck.algo, "seed": seed}
    if as_json:
        return emit_json(res)
    out_console.print(f"wrote {n} samples of dimension {x.shape[1]} to {out}")


# --------------------------------------------------------------------------- evaluate
@app.command()
@handle_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="Any rtbcli checkpoint (prior or finetuned)."),
    n: Optional[int] = typer.Option(None, "--n", "-n", help="Samples to score [default: preset's, 20,000]."),
    seed: int = typer.Option(0, help="Random seed (model samples; exact target samples use seed+1)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save a PNG: samples over the target, per-mode weights."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
):
    """Score a checkpoint against its target: modes, KL, off-target mass, log Z, ELBO/EUBO."""
    from .checkpoint import load_checkpoint
    from .evaluate import evaluate as run_evaluate

    if n is not None and n <= 0:
        raise InputError(f"--n must be a positive number of samples (got {n})")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise InputError(f"--plot '{plot}' must end in .png")
        check_writable(plot, "--plot")
    ck = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    ev = run_evaluate(ck, n or ck.preset.evaluate.n, seed, dev)
    m = ev.metrics
    if plot is not None:
        from .plots import plot_evaluation

        label = f"{ck.algo} finetuned" if ck.kind == "finetuned" else "prior"
        plot_evaluation(plot, ev.samples, ev.target, m, title=f"{checkpoint.name}: {label} checkpoint")
        m["plot"] = str(plot)
    if as_json:
        return emit_json(m)
    out_console.print(evaluation_table(m))


def evaluation_table(m: dict) -> Table:
    """The metrics of one evaluation, with the exact-sampler floor beside each sample metric."""
    t = Table(title=escape(f"{m['checkpoint']}  ({m['kind']}{', ' + m['algo'] if m['algo'] else ''}; n = {m['n']:,})"),
              title_justify="left", caption=escape(f"target: {m['target']} [{m['target_method']}]"), caption_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("model", justify="right")
    t.add_column("exact sampler (floor)", justify="right")
    f = m["floor"]
    cov = lambda d: "-" if d["mode_coverage"] is None else f"{d['mode_coverage']}/{d['n_target_modes']}"
    t.add_row("mode coverage", cov(m), cov(f))
    t.add_row("mode-weight KL", fmt(m["kl_mode"]), fmt(f["kl_mode"]))
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
    t.add_row("off-target mass", pct(m["off_target"]), pct(f["off_target"]))
    t.add_row("histogram KL", fmt(m["kl_hist"]), fmt(f["kl_hist"]))
    t.add_section()
    if m["algo"] == "trust-pcl":
        t.add_row("V(s0) learned (alpha)", f"{fmt(m['v_soft_s0'])} ({fmt(m['alpha'])})", "")
    t.add_row("log Z learned", fmt(m["log_z_learned"]), "")
    if m["kind"] == "finetuned":
        t.add_row("log Z_prior, importance-weighted", fmt(m["log_z_is"]), "")
        t.add_row("ELBO vs learned prior", fmt(m["elbo_prior"]), "")
        t.add_row("ESS of the weights", f"{100 * m['ess']:.1f}%", "")
    t.add_row("log Z_data true", fmt(m["log_z_true"]), "")
    t.add_row("log Z_data, importance-weighted", fmt(m["log_z_is_data"]), "")
    t.add_row("ELBO <= log Z_data <= EUBO", f"{fmt(m['elbo'])} <= . <= {fmt(m['eubo'])}", "")
    if m["kind"] == "prior":
        t.add_row("ESS of the weights", f"{100 * m['ess']:.1f}%", "")
    return t


# --------------------------------------------------------------------------- reproduce
@app.command()
@handle_errors
def reproduce(
    prior: Optional[Path] = typer.Option(None, "--prior", help="Reuse this prior instead of pretraining one."),
    quick: bool = typer.Option(False, "--quick", help="Reduced budget (minutes on 2 CPU threads), starting from the shipped prior."),
    seed: int = typer.Option(0, help="Random seed for every stage."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("reproduce-out"), "--out", "-o", help="Folder for checkpoints, logs, figure.png and summary.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow an --out folder that already holds files."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Run the comparison on another task [default: reference]."),
    steps: Optional[int] = typer.Option(None, help="Fine-tuning steps per method [default: 5,000; quick: 1,000]."),
    batch_size: Optional[int] = typer.Option(None, help="Fine-tuning batch size [default: 500; quick: 200]."),
    n: Optional[int] = typer.Option(None, "--n", "-n", help="Samples per evaluation [default: 20,000; quick: 10,000]."),
    pretrain_steps: Optional[int] = typer.Option(None, help="Pretraining steps when no --prior is given [default: preset's]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json's content as one JSON object."),
):
    """The seed paper's illustrative example in one command: every method, one table, one figure."""
    from dataclasses import replace

    from .reproduce import FULL, QUICK, reproduce as run_reproduce, summary_table

    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--n", n), ("--pretrain-steps", pretrain_steps)):
        if v is not None and v <= 0:
            raise InputError(f"{name} must be positive (got {v})")
    base = QUICK if quick else FULL
    budget = replace(base, **{k: v for k, v in (("finetune_steps", steps), ("batch_size", batch_size), ("eval_n", n),
                                                ("pretrain_steps", pretrain_steps)) if v is not None})
    dev = resolve_device(device)
    summary = run_reproduce(out, prior_path=prior, quick=quick, seed=seed, device=dev, overwrite=overwrite, progress=not quiet,
                            budget=budget, preset_ref=preset)
    if as_json:
        return emit_json(summary)
    out_console.print(summary_table(summary))
    out_console.print(f"figure: {summary['figure']}   summary: {out / 'summary.json'}   wall time: {summary['wall_seconds']:.0f} s")


from .cli_convert import convert_params  # noqa: E402  (its own module: it is long)

app.command("convert-params")(handle_errors(convert_params))


def run(argv: list[str] | None = None) -> int:
    """Entry point: click's own usage errors are reduced to one line too (exit 2)."""
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="rtbcli", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except _CliUsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        print(f"rtbcli: error: {e.format_message().replace('Value error, ', '')}{hint}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("rtbcli: error: aborted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())
