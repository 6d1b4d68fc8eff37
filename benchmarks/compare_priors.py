"""Priors side by side: each scored by `rtbcli evaluate --json` against its data and against the tilted target
p_prior r^beta (its own samples importance-weighted), one markdown table with the machine and date.

    python benchmarks/compare_priors.py --n 2000 \
        --prior "UNet (diffusers)=rtbcli/data/prior-digits-unet --preset digits-unet" \
        --prior "MLP (DriftNet)=rtbcli/data/prior-digits.safetensors" \
        --data-metrics sw2,sw2_floor,mmd2,nearest_train_distance --tilted-metrics class_fraction_target,ess_fraction
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys

from ablate import fmt, run  # benchmarks/ablate.py: `rtbcli ... --json` and number formatting

from rtbcli.script_support import run_script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", action="append", required=True, help='LABEL=PATH [evaluate options], e.g. "UNet=DIR --preset P"')
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--data-metrics", required=True)
    ap.add_argument("--tilted-metrics", required=True)
    a = ap.parse_args()
    dm, tm = a.data_metrics.split(","), a.tilted_metrics.split(",")
    rows = []
    for spec in a.prior:
        label, _, rest = spec.partition("=")
        args = shlex.split(rest)
        data = run(["evaluate", *args, "-n", str(a.n)])
        tilted = run(["evaluate", *args, "-n", str(a.n), "--beta", str(a.beta)])
        rows.append((label, [data.get(m) for m in dm] + [tilted.get(m) for m in tm]))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    print(
        f"Priors on n = {a.n:,} samples each, {dt.date.today()} ({machine}); data: against the prior data, "
        f"tilted: against p_prior r^{a.beta:g} by importance weights\n"
    )
    print("| prior | " + " | ".join([f"{m} (data)" for m in dm] + [f"{m} (tilted)" for m in tm]) + " |")
    print("|---" * (len(dm) + len(tm) + 1) + "|")
    for label, vals in rows:
        print(f"| {label} | " + " | ".join(fmt(v) for v in vals) + " |")


if __name__ == "__main__":
    sys.exit(run_script(main))
