"""Where a ManyWell-32 sampler puts its x1 mass, pair by pair, beside the exact target: the left-well mass
P(x1_j < 0) and the far-left tail P(x1_j < CUT) (beyond the left well at about -1.7), from sample files.

    rtbcli sample runs/mw/prior.safetensors --n 20000 --out prior.npy
    rtbcli sample runs/mw/rtb.safetensors --n 20000 --out rtb.npy
    python benchmarks/manywell_tails.py prior.npy rtb.npy --reweight      # exact: the tilted target (8 pairs)

A second table gives, over all pairs together, the left-well mass, the mass between the wells P(|x1| < 1) (the barrier at
x1 = 0 is about 10 nats below a well: the exact mass there is 0.4%) and the std of x2; a third, over the tilted pairs, how their x1 move together (correlation, rows with three or more far left)
and log mean r beside the sum of the pairs' own log mean exp(-x1_j) (equal in expectation for a product over pairs; r is
heavy-tailed, so the joint mean of a finite sample falls short of it: -1.06 against 0.01 for 40,000 exact samples).
Exact values come from the quadrature of rtbcli.datasets.manywell (the target p_data r with r = exp(-sum_{j<8} x1_j),
or p_data itself with --tilted-pairs 0). Prints one Markdown table, a row per file and one for the exact target.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from rtbcli.datasets.manywell import ManyWell, mass_below1, tilted_target
from rtbcli.script_support import run_script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help=".npy samples (n, 32)")
    ap.add_argument("--tilted-pairs", type=int, default=8, help="pairs the reward tilts (0: p_data)")
    ap.add_argument("--cut", type=float, default=-2.4)
    ap.add_argument(
        "--reweight",
        action="store_true",
        help="also a row for the first file (a prior's samples) with each tilted pair's x1 weighted by its own factor exp(-x1_j) (one pair at a time): "
        "where a prior's samples say p_prior r puts that pair's mass, if the prior is close to a product over pairs",
    )
    a = ap.parse_args()
    target = tilted_target(1.0, a.tilted_pairs)[0] if a.tilted_pairs else ManyWell()
    pairs = len(target.tilts)
    show = list(range(min(pairs, 8))) + ([pairs - 1] if pairs > 8 else [])
    head = " | ".join(f"pair {j}" for j in show)
    print(f"left-well mass P(x1 < 0) / far-left tail P(x1 < {a.cut:g}), per pair ({a.tilted_pairs} tilted)\n")
    print(f"| samples | {head} |\n|---" + "|---" * len(show) + "|")
    rows = [("exact", target.left_well_masses().tolist(), [mass_below1(a.cut, float(t)) for t in target.tilts])]
    for i, f in enumerate(a.files):
        x1 = np.load(f)[:, 0::2]
        rows.append((f, (x1 < 0).mean(0).tolist(), (x1 < a.cut).mean(0).tolist()))
        if a.reweight and i == 0:
            w = np.exp(-(x1 - x1.min(0)))
            w[:, a.tilted_pairs :] = 1.0  # untilted pairs keep their own weights
            w /= w.sum(0)
            rows.append((f"{f}, reweighted by r", (w * (x1 < 0)).sum(0).tolist(), (w * (x1 < a.cut)).sum(0).tolist()))
    for name, left, tail in rows:
        cells = " | ".join(f"{left[j]:.3f} / {tail[j]:.2g}" for j in show)
        print(f"| {name} | {cells} |")
    print("\nOver all pairs: left-well mass P(x1 < 0), mass between the wells P(|x1| < 1), std of x2 (exact: 1)\n")
    print("| samples | P(x1 < 0) | P(abs(x1) < 1) | std of x2 |\n|---|---|---|---|")
    between = np.mean([mass_below1(1.0, float(t)) - mass_below1(-1.0, float(t)) for t in target.tilts])
    print(f"| exact | {float(target.left_well_masses().mean()):.4f} | {between:.4f} | 1.000 |")
    for f in a.files:
        x = np.load(f)
        x1 = x[:, 0::2]
        print(f"| {f} | {(x1 < 0).mean():.4f} | {(np.abs(x1) < 1).mean():.4f} | {x[:, 1::2].std():.3f} |")
    if a.tilted_pairs > 1:
        print(f"\nJointly, over the {a.tilted_pairs} tilted pairs:\n")
        print("| samples | mean correlation of their x1 | rows with >= 3 of them below the cut | log mean r | sum_j log mean exp(-x1_j) |")
        print("|---|---|---|---|---|")
        for f in a.files:
            x1 = np.load(f)[:, 0 : 2 * a.tilted_pairs : 2].astype(np.float64)
            corr = np.corrcoef(x1.T)[~np.eye(a.tilted_pairs, dtype=bool)].mean()
            far = int(((x1 < a.cut).sum(1) >= 3).sum())
            log_r = -x1.sum(1)
            log_mean_r = float(np.logaddexp.reduce(log_r) - math.log(len(log_r)))
            per_pair = float(sum(np.logaddexp.reduce(-x1[:, j]) - math.log(len(x1)) for j in range(a.tilted_pairs)))
            print(f"| {f} | {corr:.3f} | {far:,} of {len(x1):,} | {log_mean_r:.3f} | {per_pair:.3f} |")


if __name__ == "__main__":
    sys.exit(run_script(main))
