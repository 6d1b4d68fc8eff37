"""The log-Z errors of energy-mode samplers over R independent evaluations: how much of one ΔlogZ^RW is the draw.

`rtbcli evaluate` (and `reproduce`, which evaluates each run once, at the run's seed) estimates log Z from one set of
K trajectories: the ELBO mean(lw) and the importance-weighted log mean exp(lw). The second is heavy-tailed: a sampler
that covers the modes but not their exact shares scores ΔlogZ^RW 0.04 on one draw of K = 2,000 and 2.8 on another.
This script evaluates each checkpoint R times (evaluation seeds 0 .. R - 1, as `rtbcli evaluate --seed s` would) and
prints, per checkpoint, the signed errors of both estimates (estimate - log Z) over the draws:

    python benchmarks/logz_repeats.py runs/manywell-grid/TB_LP_LS-seed0.safetensors runs/manywell-grid/TB_LP_LS-seed1.safetensors \\
        --target rtbcli.energy.targets:manywell --repeats 8

Columns: the ELBO's error (mean +- sd over the draws), the importance-weighted estimate's (mean +- sd, and the median,
min and max of its absolute value, ΔlogZ^RW), and `pooled`: log mean exp over all R K weights (one estimate from R K
trajectories) minus log Z. The errors are signed because Table 1 of Sendera et al. 2024 averages signed ones: its
ΔlogZ^RW entries such as 0.02 +- 0.21 (ManyWell) cannot be means of absolute values (five non-negative numbers with
mean m have a standard deviation of at most m sqrt(5), 0.045 for m = 0.02). `--json` prints one object per checkpoint.
Bad input (a missing file, a checkpoint that is not energy-mode, R < 1) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.energy.metrics import log_z_rw
from rtbcli.errors import RtbcliError
from rtbcli.evaluate import evaluate
from rtbcli.script_support import run_script


def fail(msg: str) -> None:
    print(f"logz_repeats: error: {msg}", file=sys.stderr)
    sys.exit(2)


def repeats(path: str, target: str | None, n: int, k: int) -> dict:
    """Signed errors elbo - log Z and log_z_rw - log Z over k evaluations (seeds 0 .. k - 1) of n trajectories each."""
    ck = load_checkpoint(path)
    if not ck.preset.energy:
        fail(f"'{path}' is not an energy-mode checkpoint: give one finetuned with a [target] (`--prior brownian --target ...`)")
    draws = [evaluate(ck, n=n, seed=s, target=target).metrics for s in range(k)]
    log_z = draws[0].get("log_z_true")
    if log_z is None:
        fail(f"'{path}' has no exact log Z (an energy-mode checkpoint of a shipped target, or a target with log_z, has one)")
    elbo = np.array([d["elbo"] - log_z for d in draws])
    rw = np.array([d["log_z_rw"] - log_z for d in draws])
    # K weights per draw: log mean exp over all R K weights is log mean exp over the draws' own estimates
    pooled = log_z_rw(torch.tensor([d["log_z_rw"] for d in draws], dtype=torch.float64)) - log_z

    def sd(v: np.ndarray) -> float:
        return float(v.std(ddof=1)) if k > 1 else 0.0

    return {
        "checkpoint": path,
        "n": n,
        "repeats": k,
        "log_z_true": float(log_z),
        "elbo_error": elbo.tolist(),
        "rw_error": rw.tolist(),
        "elbo_error_mean": float(elbo.mean()),
        "elbo_error_sd": sd(elbo),
        "rw_error_mean": float(rw.mean()),
        "rw_error_sd": sd(rw),
        "delta_log_z_rw_median": float(np.median(np.abs(rw))),
        "delta_log_z_rw_min": float(np.abs(rw).min()),
        "delta_log_z_rw_max": float(np.abs(rw).max()),
        "pooled_rw_error": pooled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="energy-mode finetuned checkpoints (.safetensors)")
    ap.add_argument("--target", help="name the checkpoints' own target again ('module:fn' or 'file.py:fn')")
    ap.add_argument("--n", type=int, default=2_000, help="trajectories per evaluation (K; the paper's 2,000)")
    ap.add_argument("--repeats", type=int, default=8, help="evaluations per checkpoint (seeds 0 .. R - 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per checkpoint instead of the table")
    a = ap.parse_args()
    if a.n < 2 or a.repeats < 1:
        fail("--n must be at least 2 and --repeats at least 1")
    for p in a.checkpoints:
        if not Path(p).is_file():
            fail(f"checkpoint '{p}' does not exist: give the path of a finetuned energy-mode checkpoint")
    try:
        results = [repeats(p, a.target, a.n, a.repeats) for p in a.checkpoints]
    except RtbcliError as e:
        fail(str(e))
    if a.json:
        for r in results:
            print(json.dumps(r))
        return
    print(f"{a.repeats} evaluations of K = {a.n:,} trajectories each (seeds 0-{a.repeats - 1}); errors are estimate - log Z\n")
    print("| checkpoint | ELBO error | RW error | ΔlogZ^RW median (min, max) | pooled RW error |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['checkpoint']} | {r['elbo_error_mean']:.3f} +- {r['elbo_error_sd']:.3f} | {r['rw_error_mean']:.3f} +- {r['rw_error_sd']:.3f} "
            f"| {r['delta_log_z_rw_median']:.3f} ({r['delta_log_z_rw_min']:.3f}, {r['delta_log_z_rw_max']:.3f}) | {r['pooled_rw_error']:.3f} |"
        )


if __name__ == "__main__":
    sys.exit(run_script(main))
