"""`rtbcli convert-params`: RTB (log Z, beta) <-> Trust-PCL (alpha, V_soft(s0)), for numbers or checkpoints.

    alpha = 1 / beta,   V_soft(s0) = alpha * log Z        (and back: beta = 1 / alpha, log Z = V_soft(s0) / alpha)

Registered by `rtbcli.cli` as `app.command("convert-params")(handle_errors(convert_params))`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .cli_common import examples
from .conversion import PARAM_HINTS, TARGETS, Number, check_param, convert_checkpoint, rtb_to_trust_pcl_params, trust_pcl_to_rtb_params
from .errors import InputError

RTB_PAIR = ("--log-z", "--beta")
TPCL_PAIR = ("--alpha", "--v-soft-s0")
CHECKPOINT_HELP = f"A checkpoint from `rtbcli finetune --algo {' or --algo '.join(TARGETS)}` to convert."
TO_HELP = f"With a checkpoint: the parametrisation to write, {' or '.join(TARGETS)}."
USAGE = "give --log-z with --beta, --alpha with --v-soft-s0, or a checkpoint with --to and --out"


# --to: the objectives of the registry that learn a scalar (conversion.TARGETS)
if TYPE_CHECKING:  # made at run time, where Typer reads its members; mypy sees an Enum without members
    Target = Enum
else:
    Target = Enum("Target", {name.replace("-", "_"): name for name in TARGETS}, type=str)


def _full(v: float) -> str:
    """A float at full (shortest round-trip) precision, without a trailing '.0'."""
    s = repr(v)
    return s[:-2] if s.endswith(".0") else s


def convert_params(
    checkpoint: Path | None = typer.Argument(None, help=CHECKPOINT_HELP),
    to: Target | None = typer.Option(None, "--to", case_sensitive=False, help=TO_HELP),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="With a checkpoint: the converted checkpoint to write (atomically; never the input)."
    ),
    log_z: float | None = typer.Option(None, "--log-z", help="RTB log Z, to convert with --beta."),
    beta: float | None = typer.Option(None, "--beta", help="RTB inverse temperature beta > 0, to convert with --log-z."),
    alpha: float | None = typer.Option(None, "--alpha", help="Trust-PCL temperature alpha > 0, to convert with --v-soft-s0."),
    v_soft_s0: float | None = typer.Option(None, "--v-soft-s0", help="Trust-PCL soft value V_soft(s0), to convert with --alpha."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Convert RTB (log Z, beta) <-> Trust-PCL (alpha = 1/beta, V_soft(s0) = alpha log Z), numbers or a checkpoint."""
    from .cli_common import emit_json, out_console
    from .report import kv_table

    given = {name: v for name, v in zip(RTB_PAIR + TPCL_PAIR, (log_z, beta, alpha, v_soft_s0)) if v is not None}
    if checkpoint is not None:
        if given:
            raise InputError(f"{' and '.join(given)} cannot be combined with a checkpoint: convert either numbers or a checkpoint")
        return _convert_file(checkpoint, to, out, as_json)

    if to is not None or out is not None:
        raise InputError("--to and --out are for converting a checkpoint: give the checkpoint as the first argument")
    if not given:
        raise InputError(f"nothing to convert: {USAGE}")
    rtb, tpcl = [o for o in RTB_PAIR if o in given], [o for o in TPCL_PAIR if o in given]
    if rtb and tpcl:
        raise InputError(f"{' and '.join(given)} mix the two parametrisations: {USAGE}")
    pair = RTB_PAIR if rtb else TPCL_PAIR
    if len(given) == 1:
        (have,) = given
        other = pair[1 - pair.index(have)]
        raise InputError(f"{have} needs {other} as well: {pair[0]} and {pair[1]} are converted together")
    for name, v in given.items():
        check_param(name, v, positive=name in ("--beta", "--alpha"), fix=PARAM_HINTS[name[2:].replace("-", "_")])

    rows: list[tuple[str, Number]]
    if pair == RTB_PAIR:
        res = rtb_to_trust_pcl_params(given["--log-z"], given["--beta"])
        title, rows = (
            "RTB -> Trust-PCL",
            [
                ("log_z (given)", given["--log-z"]),
                ("beta (given)", given["--beta"]),
                ("alpha = 1/beta", res["alpha"]),
                ("v_soft_s0 = alpha log_z", res["v_soft_s0"]),
            ],
        )
    else:
        res = trust_pcl_to_rtb_params(given["--alpha"], given["--v-soft-s0"])
        title, rows = (
            "Trust-PCL -> RTB",
            [
                ("alpha (given)", given["--alpha"]),
                ("v_soft_s0 (given)", given["--v-soft-s0"]),
                ("beta = 1/alpha", res["beta"]),
                ("log_z = v_soft_s0 / alpha", res["log_z"]),
            ],
        )
    if as_json:
        return emit_json(res)
    out_console.print(kv_table(title, [(k, _full(float(v))) for k, v in rows]))  # floats in, floats out


def _convert_file(checkpoint: Path, to, out: Path | None, as_json: bool):
    """convert-params CHECKPOINT --to OBJECTIVE --out FILE."""
    from .cli_common import check_checkpoint_out, emit_json, out_console
    from .objectives import OBJECTIVES
    from .report import kv_table

    if to is None or out is None:
        missing = " and ".join(o for o, v in (("--to", to), ("--out", out)) if v is None)
        raise InputError(
            f"converting a checkpoint needs {missing}: e.g. rtbcli convert-params {checkpoint} --to trust-pcl --out converted.safetensors"
        )
    check_checkpoint_out(out)  # the output is never the input: `convert_checkpoint` refuses that itself
    r = convert_checkpoint(checkpoint, to.value, out)
    if as_json:
        return emit_json(r)
    out_console.print(
        kv_table(
            f"convert-params {r['from']} -> {r['to']}",
            [
                ("checkpoint", r["checkpoint"]),
                ("from", f"{r['source']} ({r['from']})"),
                ("beta / alpha", f"{_full(r['beta'])} / {_full(r['alpha'])}"),
                *[(name, _full(r[name])) for name in (OBJECTIVES[t].scalar for t in TARGETS) if name is not None and name in r],
                ("weights copied unchanged", r["tensors_copied"]),
            ],
        )
    )
    out_console.print(f"next: rtbcli evaluate {r['checkpoint']}")


convert_params.__doc__ = (convert_params.__doc__ or "") + examples(
    "rtbcli convert-params --log-z 2 --beta 0.5 --json", "rtbcli convert-params rtb.safetensors --to trust-pcl --out as-tpcl.safetensors"
)
