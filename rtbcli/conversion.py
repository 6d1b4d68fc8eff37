"""Converting between the RTB and the Trust-PCL parametrisations (docs/maths.md#parameter-conversion, GitHub issue 5).

RTB fine-tunes (log Z, beta); Trust-PCL fine-tunes (alpha, V_soft(s0)). They are one objective
(Deleu et al. 2025, Prop. 1) under

    alpha = 1 / beta,          V_soft(s0) = alpha * log Z,
    beta  = 1 / alpha,         log Z      = V_soft(s0) / alpha,

and then L_TrustPCL = alpha^2 * L_RTB on every batch. Worked example: (log Z = 2, beta = 0.5)
<-> (alpha = 2, V_soft(s0) = 4).

`convert_checkpoint` rewrites a fine-tuned checkpoint from one parametrisation to the other:
the scalar tensor `log_z` <-> `v_soft_s0` and the `algo` label change, every network weight is
copied bit for bit, so both files sample exactly the same policy.

Float32 caveat: checkpoints store the scalar as a float32. The conversion is computed in float64
and rounded once to float32, so it is exact whenever alpha is a power of two (beta = 0.5, 1, 2,
...), but in general V_soft(s0) = alpha * log Z is only correct to float32 rounding (relative
error <= 2^-24), and converting back may differ from the original log Z in the last bit. beta and
alpha are stored in the metadata with repr(), like `rtbcli finetune` does, and alpha is always
recomputed as 1 / beta (never round-tripped through float32).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import InputError
from .hashing import sha256_file
from .objectives import OBJECTIVES
from .runtime import check_writable

Number = float | torch.Tensor
# the objectives that learn a scalar (log Z, or alpha^k log Z), from the objective registry: any two convert into each other
TARGETS = tuple(name for name, o in OBJECTIVES.items() if o.scalar is not None)

PARAM_HINTS = {  # the fix named in each invalid-value message
    "beta": "beta is the inverse temperature of the target p_prior * r^beta; give beta > 0",
    "alpha": "alpha = 1/beta is the Trust-PCL temperature; give alpha > 0",
    "log_z": "give a finite log Z",
    "v_soft_s0": "give a finite V_soft(s0)",
}


def check_param(name: str, value: Number, positive: bool, fix: str = "") -> None:
    """Raise InputError (one line naming `name` and `fix`) unless `value` is finite and, if `positive`, > 0.

    Tensors are checked element-wise (one host sync).
    """
    what = "a positive finite number" if positive else "a finite number"
    suffix = f": {fix}" if fix else ""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise InputError(f"{name} must be real, got a {value.dtype} tensor{suffix}")
        v = value.detach()
        bad = ~torch.isfinite(v) | (v <= 0) if positive else ~torch.isfinite(v)
        if bool(bad.any()):
            first = float(v[bad].reshape(-1)[0])
            n = int(bad.sum())
            raise InputError(f"{name} must be {what} (got {first!r}" + (f" and {n - 1} more bad values" if n > 1 else "") + f"){suffix}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a float or a torch tensor, got {type(value).__name__}{suffix}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise InputError(f"{name} must be {what} (got {value!r}){suffix}")


def _tensors(a: Number, b: Number) -> tuple[torch.Tensor, torch.Tensor]:
    """`a`, `b` as broadcast floating tensors; a float takes the other argument's dtype and device."""
    if isinstance(a, torch.Tensor):
        ref = a
    elif isinstance(b, torch.Tensor):
        ref = b
    else:
        raise TypeError("_tensors needs at least one tensor argument")
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    ta = a if isinstance(a, torch.Tensor) else torch.tensor(float(a), dtype=dtype, device=ref.device)
    tb = b if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=dtype, device=ref.device)
    ta, tb = (t if t.is_floating_point() else t.to(torch.get_default_dtype()) for t in (ta, tb))
    try:
        return torch.broadcast_tensors(ta, tb)
    except RuntimeError:
        raise InputError(
            f"the two values have shapes {tuple(ta.shape)} and {tuple(tb.shape)}, which do not broadcast: give tensors of compatible shapes"
        ) from None


def _convert(x: Number, x_name: str, s: Number, s_name: str, out_names: tuple[str, str]) -> dict[str, Number]:
    """The map shared by both directions: (x, s) -> (1/s, x/s). It is its own inverse."""
    check_param(x_name, x, positive=False, fix=PARAM_HINTS[x_name])
    check_param(s_name, s, positive=True, fix=PARAM_HINTS[s_name])
    inv: Number
    scaled: Number
    if isinstance(x, torch.Tensor) or isinstance(s, torch.Tensor):
        tx, ts = _tensors(x, s)
        inv, scaled = 1.0 / ts, tx / ts
    else:
        inv, scaled = 1.0 / float(s), float(x) / float(s)
    for name, v in zip(out_names, (inv, scaled)):  # 1/s or x/s can overflow for tiny s
        check_param(name, v, positive=False, fix=f"the conversion overflows: give a larger {s_name} (or a wider dtype)")
    return dict(zip(out_names, (inv, scaled)))


def rtb_to_trust_pcl_params(log_z: Number, beta: Number) -> dict[str, Number]:
    """RTB (log Z, beta) -> Trust-PCL {"alpha", "v_soft_s0"}:  alpha = 1/beta,  V_soft(s0) = alpha log Z.

    Floats give floats; tensors (any shapes that broadcast together) give tensors of the
    broadcast shape, with their dtype and device (a float argument takes the tensor's).
    beta must be positive and finite, log_z finite; otherwise InputError.

    >>> rtb_to_trust_pcl_params(2.0, 0.5)
    {'alpha': 2.0, 'v_soft_s0': 4.0}
    >>> rtb_to_trust_pcl_params(torch.tensor([2.0, -1.0]), 0.5)
    {'alpha': tensor([2., 2.]), 'v_soft_s0': tensor([ 4., -2.])}
    """
    return _convert(log_z, "log_z", beta, "beta", ("alpha", "v_soft_s0"))


def trust_pcl_to_rtb_params(alpha: Number, v_soft_s0: Number) -> dict[str, Number]:
    """Trust-PCL (alpha, V_soft(s0)) -> RTB {"beta", "log_z"}:  beta = 1/alpha,  log Z = V_soft(s0) / alpha.

    The inverse of `rtb_to_trust_pcl_params`, with the same rules for floats and tensors.
    alpha must be positive and finite, v_soft_s0 finite; otherwise InputError.

    >>> trust_pcl_to_rtb_params(2.0, 4.0)
    {'beta': 0.5, 'log_z': 2.0}
    """
    return _convert(v_soft_s0, "v_soft_s0", alpha, "alpha", ("beta", "log_z"))


def _scalar_of(name: str) -> str:
    """The tensor name of the scalar that objective `name` (one of TARGETS) learns."""
    scalar = OBJECTIVES[name].scalar
    if scalar is None:
        raise InputError(f"'{name}' learns no log Z or V_soft(s0): only {' and '.join(TARGETS)} checkpoints can be converted")
    return scalar


def convert_scalar(value: float, src: str, to: str, beta: float) -> float:
    """The learned scalar of objective `src` as objective `to` learns it, in float64, through log Z: each objective's
    scalar is alpha^k log Z with its own k (Objective.scalar_alpha_power; rtb k = 0, trust-pcl k = 1), alpha = 1/beta.
    The division and the product are by powers of beta, so rtb -> trust-pcl is V = log Z / beta, exactly as
    `rtb_to_trust_pcl_params` computes it."""
    k_src, k_to = OBJECTIVES[src].scalar_alpha_power, OBJECTIVES[to].scalar_alpha_power
    log_z = value * beta**k_src if k_src else value  # log Z = scalar / alpha^k
    return log_z / beta**k_to if k_to else log_z  # scalar' = alpha^k' log Z


def convert_checkpoint(src: Path, to: str, out: Path) -> dict:
    """Rewrite the fine-tuned rtb / trust-pcl checkpoint `src` in the other parametrisation, as `out`.

    - tensor `log_z` (rtb) <-> `v_soft_s0` (trust-pcl), V_soft(s0) = alpha log Z with alpha = 1/beta,
      computed in float64 and stored as a 0-d float32 tensor (see the module's float32 caveat);
    - metadata `algo` becomes `to`; `beta` and `alpha` (= 1/beta) are rewritten with repr(); the
      `config` (whose `beta` is the beta) and every other key are kept; `converted_from` records
      the source (JSON: algo, path, sha256, the source scalar, rtbcli version, time);
    - every other tensor (`policy.*`, `prior.*`) is copied bit for bit.

    `out` is written atomically and `src` is never modified. Returns a summary dict. Raises
    InputError (one line) for an unknown `to`, `out` naming `src`, a missing or foreign file, a
    prior checkpoint, a reinforce-kl / legacy-rl checkpoint (no log Z or V), or a checkpoint
    already in the target parametrisation.
    """
    from . import __version__

    src, out, to = Path(src), Path(out), str(getattr(to, "value", to))  # `to` may be a str Enum
    ck, algo, src_name, dst_name = _convertible(src, to, out)
    beta = _checkpoint_beta(ck)
    value = ck.scalar(src_name)
    if value is None:  # not reached: the tensor was checked above
        raise InputError(f"checkpoint '{src}' lacks a '{src_name}' tensor: it is damaged")
    check_param(f"the checkpoint's {src_name}", value, positive=False, fix=f"checkpoint '{src}' is damaged")
    new_value = convert_scalar(value, algo, to, beta)
    scalar = torch.tensor(new_value, dtype=torch.float64).to(torch.float32)  # rounded once; see the float32 caveat
    check_param(dst_name, scalar, positive=False, fix=f"{new_value!r} overflows the float32 of a checkpoint")
    check_writable(out, "output")

    tensors = {k: t for k, t in ck.tensors.items() if k != src_name}
    tensors[dst_name] = scalar
    alpha = 1.0 / beta
    meta = dict(ck.meta)
    meta.update(
        algo=to,
        beta=repr(beta),
        alpha=repr(alpha),
        converted_from=json.dumps(
            {
                "algo": algo,
                "path": str(src),
                "sha256": ck.sha256,
                src_name: value,
                "rtbcli_version": __version__,
                "converted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
            sort_keys=True,
        ),
    )
    save_checkpoint(out, tensors, meta)
    stored = {src_name: value, dst_name: float(scalar)}  # as stored in the two files, in the registry's order
    scalars = {_scalar_of(n): stored[_scalar_of(n)] for n in TARGETS if n in (algo, to)}
    return {
        "checkpoint": str(out),
        "source": str(src),
        "from": algo,
        "to": to,
        "beta": beta,
        "alpha": alpha,
        **scalars,
        "tensors_copied": len(tensors) - 1,
        "source_sha256": ck.sha256,
        "sha256": sha256_file(out),
    }


def _convertible(src: Path, to: str, out: Path) -> tuple[Checkpoint, str, str, str]:
    """The checkpoint `src`, its objective and the two scalar names, once every check of `convert_checkpoint` has passed."""
    if to not in TARGETS:
        raise InputError(f"cannot convert to '{to}': choose {' or '.join(TARGETS)}")
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
        raise InputError(f"the output '{out}' is the input checkpoint itself: choose another file name (the input is never changed)")
    ck = load_checkpoint(src)
    if ck.kind != "finetuned":
        raise InputError(
            f"checkpoint '{src}' is a {ck.kind} checkpoint, which has no log Z or V_soft(s0): "
            f"give one written by `rtbcli finetune --algo {' or --algo '.join(TARGETS)}`"
        )
    algo = ck.algo
    if algo is None or algo not in TARGETS:
        raise InputError(
            f"checkpoint '{src}' was fine-tuned with '{algo}', which learns no log Z or V_soft(s0): "
            f"only {' and '.join(TARGETS)} checkpoints can be converted"
        )
    if algo == to:
        others = " or ".join(f"--to {name}" for name in TARGETS if name != to)
        raise InputError(f"checkpoint '{src}' is already a {to} checkpoint: nothing to convert ({others} converts the other way)")
    src_name, dst_name = _scalar_of(algo), _scalar_of(to)
    if src_name not in ck.tensors or ck.tensors[src_name].numel() != 1 or dst_name in ck.tensors:
        raise InputError(
            f"checkpoint '{src}' is labelled {algo} but lacks a single '{src_name}' tensor (or also has '{dst_name}'): it is damaged"
        )
    return ck, algo, src_name, dst_name


def _checkpoint_beta(ck: Checkpoint) -> float:
    """beta of a fine-tuned checkpoint: its metadata `beta`, which must agree with its config's and its `alpha`."""
    where = f"checkpoint '{ck.path}'"
    try:
        beta = float(ck.meta.get("beta", repr(ck.preset.beta)))
        alpha = float(ck.meta.get("alpha", repr(1.0 / beta)))
    except ValueError:
        raise InputError(f"{where} has unreadable beta/alpha metadata: it is damaged") from None
    check_param(f"the beta of {where}", beta, positive=True, fix="it is damaged")
    if not math.isclose(beta, ck.preset.beta, rel_tol=1e-12) or not math.isclose(alpha * beta, 1.0, rel_tol=1e-12):
        raise InputError(
            f"{where} has inconsistent beta metadata (beta {beta!r}, alpha {alpha!r}, config beta {ck.preset.beta!r}): it is damaged"
        )
    return beta
