"""`rtbcli pretrain` and `rtbcli finetune`: thin wrappers over `rtbcli.pretrain` and `rtbcli.finetune`.

Both run as one process, or as several under torchrun (`torchrun --nproc-per-node N -m rtbcli
finetune ...`); rank 0 alone prints results.
"""

from __future__ import annotations

import json
import math
import signal
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .cli_common import (
    SEED_MAX,
    SEED_MIN,
    check_checkpoint_out,
    choices,
    emit_json,
    examples,
    field_help,
    out_console,
    parse_kwargs,
    with_overrides,
)
from .config import FinetuneSpec, PretrainSpec, PythonRewardSpec, SamplerSpec
from .energy.options import ENERGY_PRESETS, check_same_dim, is_brownian, require_named, target_preset, with_target
from .errors import InputError
from .objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from .presets_loader import DEFAULT_PRESET, load_preset
from .report import kv_table
from .runtime import check_writable, resolve_device
from .training import RunPaths, final_of, is_partial

if TYPE_CHECKING:  # made at run time, where Typer reads their members; mypy sees Enums without members
    Algo = Enum
    Schedule = Enum
    Estimator = Enum
    Snis = Enum
    MatmulDtype = Enum
else:
    Algo = Enum("Algo", [(k, k) for k in OBJECTIVES], type=str)
    Schedule, Estimator, Snis = choices(PretrainSpec, "lr_schedule"), choices(PretrainSpec, "estimator"), choices(FinetuneSpec, "snis")
    MatmulDtype = choices(PretrainSpec, "matmul_dtype")
ALGO_HELP = "; ".join(f"{o.name}: {o.help}" for o in OBJECTIVES.values()) + f" [default: {DEFAULT_OBJECTIVE}]"
RESUME_STEPS = "; with --resume, the new total (the schedules keep the run's original length: past it, lr_final and no exploration)"
DEVICE_HELP = "auto (CUDA when present), cpu or cuda."
TARGET_HELP = (
    "Energy mode: the log-density to sample, 'path/to/target.py:log_pi', 'package.module:log_pi' or a shipped "
    "'rtbcli.energy.targets:gmm25' (funnel, manywell); name a checkpoint's own target again (never imported from a checkpoint)."
)
NETWORK_HELP = (
    "Your own drift network, 'path/to/net.py:Class' or 'package.module:Class' (forward(x (B, d), t (B,)) -> drift (B, d)); "
    "name a checkpoint's own class again (never imported from a checkpoint)."
)
SAVE_HELP = "Save a resumable checkpoint (X.partial.safetensors) every N steps; 0: only at the end and on SIGINT/SIGTERM."


def _start_distributed(device: str, batch_size: int):
    from .distributed import check_batch_before_joining, init

    check_batch_before_joining(batch_size)
    return init(resolve_device(device))


def _leave(dist) -> None:
    """Leave the job. From here a process of a multi-process job only reports and exits: the
    SIGTERM that torchrun sends every process once one has failed must not cut its message short."""
    from . import distributed

    if dist.active:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    distributed.shutdown(dist)


def resume_out(start, out: Path | None) -> Path:
    """Where a resumed run writes: --out, or the file the interrupted run was writing.

    That file is beside its partial checkpoint: its recorded path may be relative to another
    working folder, so only its name is taken.
    """
    if out is not None:
        return out
    if is_partial(start.path):
        recorded = json.loads(start.meta.get("run", "{}")).get("out")
        return start.path.with_name(Path(recorded).name) if recorded else final_of(start.path)
    raise InputError(f"'{start.path}' is a finished run: give --out for the extended run (the original is kept)")


# --------------------------------------------------------------------------- pretrain
def pretrain(
    preset: str | None = typer.Option(
        None, "--preset", "-p", help=f"Shipped preset name or path to a .toml file [default: {DEFAULT_PRESET}]."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Pretrain on the rows of this .npy/.csv/.safetensors file (default sampler settings)."
    ),
    steps: int | None = typer.Option(None, help=field_help(PretrainSpec, "steps", RESUME_STEPS)),
    batch_size: int | None = typer.Option(None, help=field_help(PretrainSpec, "batch_size")),
    lr: float | None = typer.Option(None, help=field_help(PretrainSpec, "lr")),
    lr_schedule: Schedule | None = typer.Option(None, help=field_help(PretrainSpec, "lr_schedule")),
    estimator: Estimator | None = typer.Option(None, help=field_help(PretrainSpec, "estimator")),
    matmul_dtype: MatmulDtype | None = typer.Option(None, help=field_help(PretrainSpec, "matmul_dtype")),
    sigma2: float | None = typer.Option(
        None,
        "--sigma2",
        help="The sampler's variance per unit time sigma2: each of the T steps adds N(0, sigma2 / T) noise, the last one "
        "included, so data thinner than sqrt(sigma2 / T) come out wider than they are [default: the preset's; 5.0 where it says nothing].",
    ),
    time_power: float | None = typer.Option(None, "--time-power", help=field_help(SamplerSpec, "time_power")),
    network: str | None = typer.Option(None, "--network", help=NETWORK_HELP),
    network_arg: list[str] | None = typer.Option(
        None, "--network-arg", help="KEY=VALUE keyword argument for your network's constructor (repeatable)."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this run exactly (X.partial.safetensors, or a finished one with --steps and --out)."
    ),
    seed: int | None = typer.Option(None, min=SEED_MIN, max=SEED_MAX, help="Random seed (initialisation and data) [default: 0]."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Checkpoint to write (atomically) [default: prior.safetensors]."),
    save_every: int = typer.Option(1000, help=SAVE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Pretrain a prior diffusion sampler on data (bridge maximum likelihood)."""
    from .checkpoint import load_checkpoint
    from .data import data_preset
    from .networks import attach_network, network_of, with_network
    from .pretrain import pretrain as run_pretrain

    if sum(x is not None for x in (preset, data, resume)) > 1:
        raise InputError("give one of --preset, --data and --resume")
    start = None
    if resume is not None and Path(resume).is_dir():
        raise InputError(f"'{resume}' is a model folder: a UNet pretraining run does not resume, run it again with --preset")
    if resume is not None:
        if any(v is not None for v in (batch_size, lr, lr_schedule, estimator, matmul_dtype, sigma2, time_power)):
            raise InputError("--resume continues a run with its own settings: only --steps (a new total) may be given")
        if network_arg:
            raise InputError("--resume continues a run with its own network: leave out --network-arg")
        start = load_checkpoint(resume, expect_kind="prior")
        attach_network(start, network)
        p, ref = start.preset, start.meta.get("preset", "")
        if seed is not None and seed != start.meta_int("seed"):
            raise InputError("--seed cannot change when resuming: the run continues with its own random state")
        seed, out = start.meta_int("seed"), resume_out(start, out)
    elif data is not None:
        p, ref = data_preset(data), str(data)
    else:
        p, ref = load_preset(preset)
    p = with_overrides(
        p, "pretrain", steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, estimator=estimator, matmul_dtype=matmul_dtype
    )
    if start is None:
        p = with_network(
            with_overrides(p, "sampler", sigma2=sigma2, time_power=time_power), network, parse_kwargs(network_arg, "--network-arg")
        )
    if p.sampler.unet is not None:  # a diffusers UNet: the DDPM loss, a model folder
        bridge_only = [
            o
            for o, v in (
                ("--network", network),
                ("--estimator", estimator),
                ("--matmul-dtype", matmul_dtype),
                ("--sigma2", sigma2),
                ("--time-power", time_power),
            )
            if v is not None
        ]
        if bridge_only:
            raise InputError(f"{bridge_only[0]} applies to rtbcli's bridge sampler: the preset pretrains a UNet")
        return _pretrain_unet(p, ref, out, seed or 0, device, save_every, quiet, as_json)
    net = start.network if start is not None else network_of(p)
    out = check_checkpoint_out(out or Path("prior.safetensors"), resume, "prior")
    positive_or_zero("--save-every", save_every)
    dist, dev = _start_distributed(device, p.pretrain.batch_size)
    try:
        r = run_pretrain(
            p,
            ref,
            out,
            seed=seed or 0,
            device=dev,
            log_path=RunPaths(out).log,
            progress=not quiet,
            resume_from=start,
            save_every=save_every,
            dist=dist,
            network=net,
        )
    finally:
        _leave(dist)
    if not dist.is_main:
        return
    _report_pretrain(r, ref, dev, dist.world, as_json, p.sampler.network)


pretrain.__doc__ = (pretrain.__doc__ or "") + examples(
    "rtbcli pretrain --out prior.safetensors",
    "rtbcli pretrain --data moons.csv --steps 3000 --out moons-prior.safetensors",
    "rtbcli pretrain --resume prior.partial.safetensors",
    "rtbcli pretrain --data moons.csv --network mynet.py:Drift --network-arg width=128 --out moons-mine.safetensors",
)


# --------------------------------------------------------------------------- finetune
def finetune(
    prior: Path | None = typer.Option(
        None,
        "--prior",
        help="Start a run from this prior checkpoint (from `rtbcli pretrain`), or from 'brownian': the drift-free prior of energy "
        "mode (no data; implied by --target or a preset with [target]).",
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this finetuned run exactly: its optimiser, schedule and random state."
    ),
    warm_start: Path | None = typer.Option(
        None,
        "--warm-start",
        help="Start a new run from a finetuned checkpoint (its policy, prior and log Z; fresh optimiser and schedule).",
    ),
    algo: Algo | None = typer.Option(
        None,
        "--algo",
        "-a",
        case_sensitive=False,
        help=ALGO_HELP,
    ),
    preset: str | None = typer.Option(None, "--preset", "-p", help="Preset name or path [default: the one the prior was pretrained with]."),
    reward: str | None = typer.Option(
        None, "--reward", help="Your reward: 'path/to/rewards.py:function' or 'package.module:function', returning log r(x)."
    ),
    reward_arg: list[str] | None = typer.Option(None, "--reward-arg", help="KEY=VALUE keyword argument for the reward (repeatable)."),
    target: str | None = typer.Option(None, "--target", help=TARGET_HELP),
    target_arg: list[str] | None = typer.Option(None, "--target-arg", help="KEY=VALUE keyword argument for the target (repeatable)."),
    network: str | None = typer.Option(
        None, "--network", help="Name the checkpoint's own network class again ('net.py:Class'); loading a checkpoint never imports code."
    ),
    lora_rank: int | None = typer.Option(None, "--lora-rank", help=field_help(SamplerSpec, "lora_rank")),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help=field_help(SamplerSpec, "lora_alpha")),
    lora_target: list[str] | None = typer.Option(
        None,
        "--lora-target",
        help="A module name (suffix) LoRA adapts (repeatable) [default: the convolutions and time-embedding projections].",
    ),  # fmt: skip
    sampling_steps: int | None = typer.Option(None, "--sampling-steps", help=field_help(SamplerSpec, "sampling_steps")),
    eta: float | None = typer.Option(None, "--eta", help=field_help(SamplerSpec, "eta")),
    prior_tail_steps: int | None = typer.Option(None, "--prior-tail-steps", help=field_help(SamplerSpec, "prior_tail_steps")),
    dim: int | None = typer.Option(None, "--dim", help="Your target's dimension d (unless its function has a `dim` attribute)."),
    sigma2: float | None = typer.Option(
        None,
        "--sigma2",
        help="Energy mode: the Brownian prior's variance sigma2 (its law at T is N(0, sigma2 I)) [default: the preset's; 5.0 where it says nothing].",
    ),
    time_power: float | None = typer.Option(
        None,
        "--time-power",
        help="Energy mode: the time grid t_i = 1 - (1 - i/T)^P of the Brownian prior and the policy (1: uniform; above 1 the "
        "last steps shrink, and their noise with them; the prior still ends at N(0, sigma2 I)) [default: the preset's; 1].",
    ),
    beta: float | None = typer.Option(None, help="Inverse temperature of the target p_prior r^beta [default: the preset's]."),
    alpha: float | None = typer.Option(None, help="Trust-PCL temperature alpha = 1/beta (give this or --beta)."),
    steps: int | None = typer.Option(None, help=field_help(FinetuneSpec, "steps", RESUME_STEPS)),
    batch_size: int | None = typer.Option(None, help=field_help(FinetuneSpec, "batch_size")),
    lr: float | None = typer.Option(None, help=field_help(FinetuneSpec, "lr")),
    lr_logz: float | None = typer.Option(None, help=field_help(FinetuneSpec, "lr_logz")),
    lr_schedule: Schedule | None = typer.Option(None, help=field_help(FinetuneSpec, "lr_schedule")),
    grad_clip: float | None = typer.Option(None, help=field_help(FinetuneSpec, "grad_clip")),
    exploration: float | None = typer.Option(None, help=field_help(FinetuneSpec, "exploration")),
    on_policy: bool = typer.Option(False, "--on-policy", help="No exploration; reinforce-kl then uses uniform weights."),
    snis: Snis | None = typer.Option(None, help=field_help(FinetuneSpec, "snis")),
    legacy_lambda: float | None = typer.Option(None, help=field_help(FinetuneSpec, "legacy_lambda")),
    matmul_dtype: MatmulDtype | None = typer.Option(None, help=field_help(FinetuneSpec, "matmul_dtype")),
    # the off-policy tools (rtbcli.offpolicy), each off by default
    exploration_end_step: int | None = typer.Option(None, help=field_help(FinetuneSpec, "exploration_end_step")),
    replay: bool | None = typer.Option(None, "--replay/--no-replay", help=field_help(FinetuneSpec, "replay")),
    buffer_size: int | None = typer.Option(None, help=field_help(FinetuneSpec, "buffer_size")),
    prior_every: int | None = typer.Option(None, help=field_help(FinetuneSpec, "prior_every")),
    prior_resample: int | None = typer.Option(None, help=field_help(FinetuneSpec, "prior_resample")),
    local_search: bool | None = typer.Option(None, "--local-search/--no-local-search", help=field_help(FinetuneSpec, "local_search")),
    ls_every: int | None = typer.Option(None, help=field_help(FinetuneSpec, "ls_every")),
    ls_step_size: float | None = typer.Option(None, help=field_help(FinetuneSpec, "ls_step_size")),
    langevin: bool | None = typer.Option(None, "--langevin/--no-langevin", help=field_help(FinetuneSpec, "langevin")),
    eval_every: int | None = typer.Option(None, help=field_help(FinetuneSpec, "eval_every")),
    seed: int | None = typer.Option(None, min=SEED_MIN, max=SEED_MAX, help="Random seed [default: 0]."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Checkpoint to write [default: finetuned-ALGO.safetensors]."),
    save_every: int = typer.Option(1000, help=SAVE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Fine-tune a prior so that its samples follow p_prior(x) r(x)^beta."""
    from .evaluate import with_reward
    from .finetune import finetune as run_finetune
    from .suites import check_suite
    from .tasks import Task

    b = resolve_beta(beta, alpha)
    lora = {
        "rank": lora_rank,
        "alpha": lora_alpha,
        "targets": lora_target,
        "sampling_steps": sampling_steps,
        "eta": eta,
        "prior_tail_steps": prior_tail_steps,
    }
    start_path, start = _finetune_start(prior, resume, warm_start, preset, target, network, lora)
    is_resume = resume is not None
    algo_name = _algo_of_run(start, algo, seed, on_policy) if is_resume else (algo.value if algo is not None else DEFAULT_OBJECTIVE)
    p, ref = _energy_preset(start, preset, target, parse_kwargs(target_arg, "--target-arg"), dim, sigma2, time_power)
    if start is not None and start.preset.sampler.model is not None:
        from .model_prior import with_model_of

        p = with_model_of(p, start)  # a run from a diffusers model folder keeps it in its [sampler]
    p = with_reward(p, reward, parse_kwargs(reward_arg))
    p = with_overrides(p, "", beta=b)
    p = with_overrides(
        p,
        "finetune",
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_logz=lr_logz,
        lr_schedule=lr_schedule,
        grad_clip=grad_clip,
        exploration=exploration,
        snis=snis,
        legacy_lambda=legacy_lambda,
        matmul_dtype=matmul_dtype,
        exploration_end_step=exploration_end_step,
        replay=replay,
        buffer_size=buffer_size,
        prior_every=prior_every,
        prior_resample=prior_resample,
        local_search=local_search,
        ls_every=ls_every,
        ls_step_size=ls_step_size,
        langevin=langevin,  # the nine above: the off-policy tools
        eval_every=eval_every,
    )
    _check_named_again(p, preset, target, reward)
    check_suite(Task(p, allow_import=False))
    out = resume_out(start, out) if is_resume else (out or Path(f"finetuned-{algo_name}.safetensors"))
    check_checkpoint_out(out, start_path if start is not None else None, start.kind if start is not None else "")
    positive_or_zero("--save-every", save_every)
    dist, dev = _start_distributed(device, p.finetune.batch_size)
    try:
        r = run_finetune(
            start,
            p,
            ref,
            algo_name,
            out,
            seed=seed or 0,
            device=dev,
            on_policy=on_policy,
            log_path=RunPaths(out).log,
            progress=not quiet,
            resume=is_resume,
            save_every=save_every,
            dist=dist,
        )
    finally:
        _leave(dist)
    if not dist.is_main:
        return
    _report_finetune(r, p, dev, dist.world, as_json)


def _finetune_start(prior, resume, warm_start, preset: str | None, target: str | None, network: str | None, lora: dict):
    """(the path a run starts from, its Checkpoint or None in energy mode): a diffusers model folder (`--prior DIR`, with
    its LoRA and sampling options `lora`), or a checkpoint (`_start`); the user's network class attached again."""
    from .networks import attach_network

    flags = {
        "--lora-rank": "rank",
        "--lora-alpha": "alpha",
        "--lora-target": "targets",
        "--sampling-steps": "sampling_steps",
        "--eta": "eta",
        "--prior-tail-steps": "prior_tail_steps",
    }
    if prior is not None and Path(prior).is_dir():  # a diffusers model folder
        from .model_prior import folder_checkpoint

        rank = lora["rank"]
        if preset is None:
            raise InputError(
                f"'{prior}' is a diffusers model, with no task of its own: give --preset (a task of its images: data, reward) and --reward"
            )
        if rank is not None and rank <= 0:
            raise InputError(f"--lora-rank must be a positive rank (got {rank})")
        if (lora["alpha"] is not None or lora["targets"]) and rank is None:
            raise InputError("--lora-alpha and --lora-target set LoRA's adapters: give --lora-rank too")
        if network is not None:
            raise InputError("--network names a checkpoint's network class: a diffusers model folder needs none")
        start = folder_checkpoint(
            prior,
            load_preset(preset)[0],
            lora["sampling_steps"],
            rank,
            lora["alpha"],
            lora["targets"],
            lora["eta"],
            lora["prior_tail_steps"],
        )
        return prior, start
    given = [flag for flag, key in flags.items() if lora[key] not in (None, [])]
    if given:
        raise InputError(f"{given[0]} applies to a diffusers model folder (--prior DIR); a checkpoint keeps its own settings")
    start_path, start = _start(prior, resume, warm_start, preset, target)
    if start is None and network is not None:
        raise InputError("--network names a checkpoint's own network class again: energy mode's Brownian prior has no network")
    if start is not None:
        attach_network(start, network)
    return start_path, start


def _algo_of_run(start, algo, seed: int | None, on_policy: bool) -> str:
    """The objective a resumed run continues with, once what cannot change on a resume is checked."""
    assert start is not None
    if seed is not None and seed != start.meta_int("seed"):
        raise InputError("--seed cannot change when resuming: the run continues with its own random state")
    if on_policy and not json.loads(start.meta.get("run", "{}")).get("on_policy", False):
        raise InputError(
            "--on-policy cannot change when resuming: the run continues with its own exploration schedule; "
            "start a new run with --warm-start --on-policy"
        )
    algo_name = algo.value if algo is not None else start.algo
    if algo_name is None:
        raise InputError(f"checkpoint '{start.path}' records no algorithm (no 'algo' metadata): it is damaged")
    return algo_name


def _check_named_again(p, preset: str | None, target: str | None, reward: str | None) -> None:
    """A checkpoint's own Python target or reward is never imported unless the command names it again."""
    from .rewards import UnnamedReward
    from .tasks import Task

    if preset is None and target is None:  # energy mode: a checkpoint's own target is never imported unless named again
        require_named(p)
    if preset is None and reward is None:  # the reward comes from the checkpoint: never imported unless named again
        unnamed = Task(p, allow_import=False).reward
        if isinstance(unnamed, UnnamedReward):  # its reference is the recorded reward's function
            raise InputError(
                f"this checkpoint records the Python reward '{unnamed.reference}', and loading a checkpoint never imports "
                f"code: name it again with --reward {unnamed.reference}"
            )


def _report_finetune(r, p, dev, processes: int, as_json: bool) -> None:
    """The finished run: one JSON object, or a table and the evaluate command to run next."""
    res = {
        "checkpoint": str(r.out),
        "log": str(r.log),
        "algo": r.algo,
        "beta": p.beta,
        "alpha": 1 / p.beta,
        "steps": r.steps,
        "resumed_at": r.first_step or None,
        "seconds": round(r.seconds, 2),
        "steps_per_s": round(r.steps_per_s, 2),
        "loss": r.loss,
        "log_z": r.log_z,
        "mean_log_r": r.mean_log_r,
        "device": dev.type,
        "processes": processes,
        "trainable_parameters": r.trainable_parameters,
        "peak_memory_mb": r.peak_memory_mb,
    }
    if as_json:
        return emit_json(res)
    out_console.print(
        kv_table(
            f"finetune {r.algo}",
            [
                ("checkpoint", r.out),
                ("log", r.log),
                ("beta / alpha", f"{p.beta:g} / {1 / p.beta:g}"),
                ("device", f"{dev.type} x {processes}"),
                ("steps", r.steps),
                ("wall time (s)", r.seconds),
                ("steps/s", r.steps_per_s),
                ("final loss", r.loss),
                ("learned log Z", r.log_z),
                ("mean log r (last batch)", r.mean_log_r),
                ("trainable parameters", r.trainable_parameters),
                ("peak memory (MB)", r.peak_memory_mb),
            ],
        )
    )
    function = p.reward.function if isinstance(p.reward, PythonRewardSpec) else ""
    hint = f" --reward {function}" if function.startswith(("/", ".")) else ""
    if p.target is not None and not p.target.log_density.startswith("rtbcli."):  # a user's target is named again
        hint += f" --target {p.target.log_density}"
    if p.sampler.network is not None:  # so is a user's network
        hint += f" --network {p.sampler.network}"
    out_console.print(f"next: rtbcli evaluate {r.out}{hint}")


def _pretrain_unet(p, ref: str, out: Path | None, seed: int, device: str, save_every: int, quiet: bool, as_json: bool) -> None:
    """`pretrain` of a [sampler.unet] preset: the epsilon loss, written as a diffusers folder (rtbcli.unet_pretrain)."""
    from .lora import require_diffusers
    from .unet_pretrain import pretrain_unet

    require_diffusers()
    out = Path(out or "prior-unet")
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise InputError(
            f"--out '{out}': a UNet prior is a diffusers model folder: give a folder name (e.g. --out {out.stem or 'prior-unet'})"
        )
    check_writable(out.with_name(out.name + ".jsonl"), "--out")
    positive_or_zero("--save-every", save_every)
    dist, dev = _start_distributed(device, p.pretrain.batch_size)
    try:
        if dist.world > 1:
            raise InputError("a UNet prior pretrains in one process: run it without torchrun")
        r = pretrain_unet(
            p, ref, out, seed=seed, device=dev, log_path=out.with_name(out.name + ".jsonl"), progress=not quiet, save_every=save_every
        )
    finally:
        _leave(dist)
    _report_pretrain(r, ref, dev, 1, as_json, None, unet=True)


def _report_pretrain(r, ref: str, dev, processes: int, as_json: bool, network: str | None = None, unet: bool = False) -> None:
    """The finished run: one JSON object, or a table and what to run next."""
    res = {
        "checkpoint": str(r.out),
        "log": str(r.log),
        "preset": ref,
        "steps": r.steps,
        "resumed_at": r.first_step or None,
        "seconds": round(r.seconds, 2),
        "steps_per_s": round(r.steps_per_s, 2),
        "loss": r.loss,
        "elbo": r.elbo,
        "data_log_prob": r.data_log_prob,
        "device": dev.type,
        "processes": processes,
    }
    if unet:  # a diffusers folder trained with the epsilon loss: no bridge ELBO
        res = {**{k: v for k, v in res.items() if k not in ("elbo", "data_log_prob")}, "model_folder": True, "parameters": r.parameters}
    if as_json:
        return emit_json(res)
    if unet:
        rows = [("model folder", r.out), ("log", r.log), ("preset", ref), ("device", dev.type), ("steps", r.steps)]
        rows += [("wall time (s)", r.seconds), ("steps/s", r.steps_per_s), ("final eps-MSE", r.loss), ("parameters", r.parameters)]
        out_console.print(kv_table("pretrain (DDPM loss)", rows))
        out_console.print(f"next: rtbcli finetune --prior {r.out} --preset {ref} --lora-rank 8")
        return
    out_console.print(
        kv_table(
            "pretrain",
            [
                ("checkpoint", r.out),
                ("log", r.log),
                ("preset", ref),
                ("device", f"{dev.type} x {processes}"),
                ("steps", r.steps),
                ("wall time (s)", r.seconds),
                ("steps/s", r.steps_per_s),
                ("final loss", r.loss),
                ("ELBO of log p_theta(x), data", r.elbo),
                ("E_data log p_data(x)", r.data_log_prob),
            ],
        )
    )
    net = f" --network {network}" if network is not None else ""
    out_console.print(f"next: rtbcli evaluate {r.out}{net}   or   rtbcli finetune --prior {r.out}{net} --reward rewards.py:log_reward")


def _start(prior: Path | None, resume: Path | None, warm_start: Path | None, preset: str | None, target: str | None):
    """(path, checkpoint) the run starts from; (None, None) for energy mode's Brownian prior: `--prior brownian`, or no
    start option with --target or a preset with [target]."""
    from .checkpoint import load_checkpoint

    brownian = is_brownian(prior)
    given = [(n, v) for n, v in (("--prior", None if brownian else prior), ("--resume", resume), ("--warm-start", warm_start)) if v]
    if not given and (brownian or target is not None or (preset is not None and load_preset(preset)[0].energy)):
        return None, None
    if len(given) != 1 or brownian:
        raise InputError(
            "give exactly one of --prior (start from a prior, or 'brownian'), --resume (continue a run) and --warm-start (a new run "
            "from a finetuned checkpoint)"
        )
    ((_, path),) = given
    return path, load_checkpoint(path, expect_kind="prior" if prior is not None else "finetuned")


def _energy_preset(
    start, preset: str | None, target: str | None, kwargs: dict, dim: int | None, sigma2: float | None, time_power: float | None = None
):
    """The run's preset and its name: the checkpoint's, or --preset's, or (energy mode without a preset) --target's,
    with --target / --target-arg / --dim naming or replacing its target, --sigma2 the Brownian prior's variance and
    --time-power its (and the policy's) time grid."""
    if start is None and preset is None:
        if target is None:
            raise InputError(f"--prior brownian samples a target: give --target file.py:fn or an energy preset ({ENERGY_PRESETS})")
        p, ref = target_preset(target, kwargs, dim), target
    else:
        p, ref = (start.preset, start.meta.get("preset", "reference")) if preset is None else load_preset(preset)
    if start is None and not p.energy:
        raise InputError(
            f"--prior brownian samples a target with no data, but preset '{p.name}' has [prior_data]: give --target file.py:fn "
            f"or an energy preset ({ENERGY_PRESETS})"
        )
    p = with_target(p, target, kwargs, dim)
    for option, key, value, what in (("--sigma2", "sigma2", sigma2, "variance"), ("--time-power", "time_power", time_power, "time grid")):
        if value is None:
            continue
        if not p.energy or start is not None:
            raise InputError(
                f"{option} sets the Brownian prior's {what} (energy mode, a new run): a pretrained prior or a run keeps its own"
            )
        p = with_overrides(p, "sampler", **{key: value})
    if start is not None and p.energy:
        check_same_dim(p, start.preset)
    return p, ref


finetune.__doc__ = (finetune.__doc__ or "") + examples(
    "rtbcli finetune --prior prior.safetensors --algo rtb --out rtb.safetensors",
    "rtbcli finetune --prior moons-prior.safetensors --reward favour.py:log_reward --steps 1000 --out moons-rtb.safetensors",
    "rtbcli finetune --resume rtb.partial.safetensors",
    "rtbcli finetune --preset gmm25-energy --steps 2000 --out gmm25.safetensors",
    "rtbcli finetune --prior brownian --target target.py:log_pi --dim 2 --sigma2 5 --out mine.safetensors",
    "rtbcli finetune --prior ddpm-model --preset digits --lora-rank 8 --sampling-steps 50 --exploration 0.01 --out lora.safetensors",
)


def positive_or_zero(name: str, value: int) -> None:
    if value < 0:
        raise InputError(f"{name} must be 0 (off) or a positive number of steps (got {value})")


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


# --------------------------------------------------------------------------- merge
def merge(
    checkpoint: Path = typer.Argument(..., help="A finetuned checkpoint of a diffusers model (`finetune --prior DIR`)."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (new): a UNet2DModel with its DDPMScheduler config."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Write a fine-tuned diffusers model (its LoRA adapters merged into the weights) as a folder diffusers loads."""
    from .checkpoint import load_checkpoint
    from .lora import merge_checkpoint

    if out.exists():
        raise InputError(f"--out '{out}' exists: choose a new folder for the merged model")
    check_writable(out, "--out")
    path = merge_checkpoint(load_checkpoint(checkpoint, expect_kind="finetuned"), out)
    if as_json:
        return emit_json({"out": str(path), "checkpoint": str(checkpoint)})
    out_console.print(f"wrote the merged model to {path} (diffusers: UNet2DModel.from_pretrained('{path}'))")


merge.__doc__ = (merge.__doc__ or "") + examples("rtbcli merge lora.safetensors --out merged-model")
