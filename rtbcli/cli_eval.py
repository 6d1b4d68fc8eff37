"""`rtbcli evaluate` and `rtbcli sample`: thin wrappers over `rtbcli.evaluate` and `rtbcli.sampling`."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from .cli_common import SEED_MAX, SEED_MIN, emit_json, examples, field_default, out_console, parse_kwargs
from .config import EvalSpec
from .errors import EXIT_REQUIRE, InputError
from .metric_registry import requirable
from .report import checks_table, evaluation_table, parse_check, run_checks
from .runtime import check_not_input, check_writable, resolve_device

REQUIRE_HELP = (
    f"'KEY OP NUMBER' on the report (repeatable, e.g. 'kl_mode < 0.05'); a failed check exits {EXIT_REQUIRE}. "
    f"KEY: {', '.join(requirable())}."
)  # the metric registry's number keys and floor.KEY


NETWORK_HELP = "Name the checkpoint's own network class again ('net.py:Class'); loading a checkpoint never imports code."


def parse_dims(text: str) -> tuple[int, int]:
    try:
        i, j = (int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--dims '{text}': give two coordinates as I,J (e.g. 0,1)") from None
    return i, j


def evaluate(
    checkpoint: Path = typer.Argument(..., help="Any rtbcli checkpoint (prior or finetuned)."),
    n: int | None = typer.Option(None, "--n", "-n", help=f"Samples to score [default: the preset's, {field_default(EvalSpec, 'n')}]."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Random seed (model samples; exact target samples use seed+1)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    reward: str | None = typer.Option(
        None, "--reward", help="Name the checkpoint's Python reward again ('rewards.py:function'); loading a checkpoint never imports code."
    ),
    reward_arg: list[str] | None = typer.Option(None, "--reward-arg", help="KEY=VALUE keyword argument for the reward (repeatable)."),
    target: str | None = typer.Option(
        None,
        "--target",
        help="Name an energy-mode checkpoint's own target again ('target.py:log_pi'); loading a checkpoint never imports code.",
    ),
    target_arg: list[str] | None = typer.Option(None, "--target-arg", help="KEY=VALUE keyword argument for the target (repeatable)."),
    network: str | None = typer.Option(None, "--network", help=NETWORK_HELP),
    reference: Path | None = typer.Option(
        None, "--reference", help="Reference samples of the target (.npy/.csv/.safetensors) for sliced-W2 and MMD."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also save a PNG: samples over the target (or two coordinates and the marginals), per-mode weights."
    ),
    dims: str = typer.Option("0,1", "--dims", help="The two coordinates a plot of a task with d != 2 shows."),
    require: list[str] | None = typer.Option(None, "--require", help=REQUIRE_HELP),
    beta: float | None = typer.Option(
        None, "--beta", help="Score a prior against the tilted target p_prior r^beta (its samples importance-weighted toward it)."
    ),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="With a diffusers model folder instead of a checkpoint: the task of its images (data, reward)."
    ),
    sampling_steps: int | None = typer.Option(
        None, "--sampling-steps", help="With a diffusers model folder: its sampling steps [default: the preset's sampler.sampling_steps]."
    ),
    eta: float | None = typer.Option(
        None, "--eta", help="With a diffusers model folder: DDIM steps with this eta [default: the preset's sampler.eta]."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
):
    """Score a checkpoint against its target: log r and log Z, distances to reference samples, modes and KL.
    A diffusers model folder (a pretrained prior) is scored with --preset, the task of its images."""
    from .evaluate import evaluate as run_evaluate
    from .networks import attach_network

    checks = [parse_check(text) for text in require or []]
    pair = parse_dims(dims)
    if n is not None and n <= 0:
        raise InputError(f"--n must be a positive number of samples (got {n})")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise InputError(f"--plot '{plot}' must end in .png")
        check_writable(plot, "--plot")
        check_not_input(plot, {"checkpoint": checkpoint}, "--plot")
    ck = _checkpoint_or_folder(checkpoint, preset, sampling_steps, eta)
    attach_network(ck, network)
    if ck.preset.dim > 1 and (not all(0 <= i < ck.preset.dim for i in pair) or pair[0] == pair[1]):
        raise InputError(f"--dims {dims}: give two different coordinates between 0 and {ck.preset.dim - 1}")
    if beta is not None and (ck.kind != "prior" or not 0 < beta < math.inf):  # NaN fails this too
        raise InputError(f"--beta scores a prior against p_prior r^beta: give a prior and a finite beta > 0 (got {ck.kind}, {beta:g})")
    dev = resolve_device(device)
    ev = run_evaluate(
        ck,
        n or ck.preset.evaluate.n,
        seed,
        dev,
        beta=beta,
        reward=reward,
        reward_kwargs=parse_kwargs(reward_arg),
        reference=reference,
        target=target,
        target_kwargs=parse_kwargs(target_arg, "--target-arg"),
    )
    m = ev.metrics
    if plot is not None:
        _plot(plot, checkpoint, ck, ev, seed, dev, pair)
        m["plot"] = str(plot)
    results = run_checks(checks, m)
    if results:
        m["checks"] = results
    if as_json:
        emit_json(m)
    else:
        out_console.print(evaluation_table(m))
        if results:
            out_console.print(checks_table(results))
    failed = [f"{r['check']} (got {r['value']})" for r in results if not r["passed"]]
    if failed:
        import sys

        print(f"rtbcli: {len(failed)} required check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        raise typer.Exit(EXIT_REQUIRE)


def _checkpoint_or_folder(path: Path, preset: str | None, sampling_steps: int | None = None, eta: float | None = None):
    """A checkpoint, or a diffusers model folder as the prior of `preset`'s task (it has none of its own),
    sampled with `sampling_steps` of its schedule and DDIM's `eta` (None: the preset's)."""
    from .checkpoint import load_checkpoint

    if not Path(path).is_dir():
        for given, flag in ((preset, "--preset"), (sampling_steps, "--sampling-steps"), (eta, "--eta")):
            if given is not None:
                raise InputError(f"{flag} applies to a diffusers model folder: a checkpoint carries its own preset and sampler settings")
        return load_checkpoint(path)
    from .model_prior import folder_checkpoint
    from .presets_loader import load_preset

    if preset is None:
        raise InputError(f"'{path}' is a diffusers model, with no task of its own: give --preset (the task of its images)")
    return folder_checkpoint(path, load_preset(preset)[0], sampling_steps, None, None, None, eta, prior_tail_steps=0)  # no policy: no tail


def _plot(plot: Path, checkpoint: Path, ck, ev, seed: int, dev, pair: tuple[int, int]) -> None:
    """`--plot`: the suite's own figure (e.g. image grids), or samples over the target with per-mode weights."""
    from .plots import plot_evaluation
    from .suites import suite_of

    label = f"{ck.algo} finetuned" if ck.kind == "finetuned" else "prior"
    title = f"{checkpoint.name}: {label} checkpoint"
    suite = suite_of(ev.task)
    if not suite.own_figure:
        plot_evaluation(plot, ev.samples, ev.target, ev.metrics, title=title, dims=pair, reference=ev.reference)
        return
    import torch

    from .sampling import draw_samples

    # the samples, the reference, and a finetuned sampler's frozen prior
    panels = [(title, ev.samples)] + ([("reference", ev.reference.float())] if ev.reference is not None else [])
    if ck.kind == "finetuned":
        prior_x = draw_samples(ck, suite.figure_samples, seed, dev, which="prior")
        panels.append(("its prior (no fine-tuning)", torch.from_numpy(prior_x)))
    suite.plot_samples(plot, panels, title=title)


evaluate.__doc__ = (evaluate.__doc__ or "") + examples(
    "rtbcli evaluate rtb.safetensors --plot rtb.png",
    "rtbcli evaluate moons-rtb.safetensors --reward favour.py:log_reward --json",
    "rtbcli evaluate rtb.safetensors --require 'kl_mode < 0.05' --require 'ess_fraction > 0.1'",
    "rtbcli evaluate gmm25.safetensors --json",
)


def sample(
    checkpoint: Path = typer.Argument(..., help="Any rtbcli checkpoint (prior or finetuned)."),
    n: int = typer.Option(1000, "--n", "-n", help="Number of samples."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("samples.npy"), "--out", "-o", help="Output: .npy (float32, shape (n, d)) or .csv."),
    reward: str | None = typer.Option(None, "--reward", help="A Langevin-parametrised policy's Python reward, named again."),
    target: str | None = typer.Option(None, "--target", help="A Langevin-parametrised policy's own target, named again."),
    network: str | None = typer.Option(None, "--network", help=NETWORK_HELP),
    grid: Path | None = typer.Option(
        None, "--grid", help="Also write the first 64 samples as a PNG grid of images (a diffusers model, or the digits presets)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Draw samples x_T from a checkpoint's own policy and save them as .npy or .csv (no reward needed, except by a
    Langevin-parametrised policy, whose drift uses the gradient of its user-written target or reward)."""
    from .checkpoint import load_checkpoint
    from .evaluate import sampling_policy
    from .networks import attach_network
    from .plots import image_shape, write_image_grid
    from .sampling import draw_samples, save_samples

    if n <= 0:
        raise InputError(f"--n must be a positive number of samples (got {n})")
    if out.suffix.lower() not in (".npy", ".csv"):
        raise InputError(f"--out '{out}' must end in .npy or .csv")
    check_writable(out, "--out")
    check_not_input(out, {"checkpoint": checkpoint}, "--out")
    if grid is not None and grid.suffix.lower() != ".png":
        raise InputError(f"--grid '{grid}' must end in .png")
    if grid is not None:
        check_writable(grid, "--grid")
        check_not_input(grid, {"checkpoint": checkpoint}, "--grid")
    ck = load_checkpoint(checkpoint)
    shape = image_shape(ck) if grid is not None else None
    if grid is not None and shape is None:
        raise InputError(
            f"--grid draws images, and '{checkpoint}' is not an image model (a diffusers model or a digits preset): leave out --grid"
        )
    attach_network(ck, network)
    dev = resolve_device(device)
    x = draw_samples(ck, n, seed, dev, policy=sampling_policy(ck, dev, reward, target))
    save_samples(out, x)
    if grid is not None:
        assert shape is not None
        write_image_grid(grid, x, shape)
    res = {"out": str(out), "n": n, "dim": x.shape[1], "checkpoint": str(checkpoint), "kind": ck.kind, "algo": ck.algo, "seed": seed}
    if grid is not None:
        res["grid"] = str(grid)
    if as_json:
        return emit_json(res)
    out_console.print(f"wrote {n} samples of dimension {x.shape[1]} to {out}")


sample.__doc__ = (sample.__doc__ or "") + examples(
    "rtbcli sample rtb.safetensors --n 10000 --out samples.npy",
    "rtbcli sample prior.safetensors --n 500 --out prior.csv",
    "rtbcli sample digits-lora.safetensors --n 64 --out digits.npy --grid digits.png",
)
