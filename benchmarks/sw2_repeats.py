"""Sliced W2 and nn_dist beside their floors, averaged over K disjoint draws: one evaluation's floor is itself noisy.

`rtbcli evaluate --reference` compares n samples with one half of the reference and puts the other half beside them
as the floor, so one evaluation gives one draw of each. On thin data (moons with noise 0.05, n = 10,000) that draw
varies by 17% (sd over disjoint halves) and a sampler's by as much again, more than the 1.5x bar it is read against.
This script repeats the comparison on K disjoint chunks and reports means, standard deviations and the ratio of means:

    python examples/moons/make_moons.py --noise 0.05 --n 200000 --seed 8 --out exact200k.npy
    rtbcli sample thin-prior.safetensors --n 50000 --out thin-prior.npy
    python benchmarks/sw2_repeats.py thin-prior.npy --reference exact200k.npy --n 10000 --repeats 5

Chunk k of the samples (rows [k n, (k + 1) n)) meets chunk k of the reference (rows [2 k n, (2 k + 2) n)), split in
two halves exactly as `evaluate` splits it (rtbcli.metrics.reference_comparison, seed k). Prints a Markdown table
(`--json`: one object per file). Bad input (a missing file, too few rows, a dimension mismatch) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rtbcli.metrics import reference_comparison
from rtbcli.script_support import run_script

KEYS = ("sw2", "sw2_floor", "nn_dist", "nn_dist_floor")


def repeats(samples: torch.Tensor, reference: torch.Tensor, n: int, k: int) -> dict:
    """Mean and sd over k disjoint chunks of each of KEYS, and the ratios of the means (sw2 / floor, nn_dist / floor)."""
    runs = [reference_comparison(samples[i * n : (i + 1) * n], reference[2 * i * n : (2 * i + 2) * n], seed=i) for i in range(k)]
    out: dict = {}
    for key in KEYS:
        v = np.array([r[key] for r in runs])
        out[key], out[f"{key}_sd"] = float(v.mean()), float(v.std(ddof=1)) if k > 1 else 0.0
    out["sw2_ratio"] = out["sw2"] / out["sw2_floor"]
    out["nn_dist_ratio"] = out["nn_dist"] / out["nn_dist_floor"]
    out["n_far"] = sum(r["n_far"] for r in runs)
    return out


def fail(msg: str) -> None:
    print(f"sw2_repeats: error: {msg}", file=sys.stderr)
    sys.exit(2)


def load(path: str, rows: int, what: str) -> torch.Tensor:
    if not Path(path).is_file():
        fail(f"{what} '{path}' does not exist: write it first (see this script's docstring)")
    x = np.load(path)
    if x.ndim != 2 or x.shape[0] < rows:
        fail(f"{what} '{path}' has shape {x.shape}: it needs at least {rows:,} rows (lower --n or --repeats, or draw more)")
    return torch.as_tensor(x[:rows], dtype=torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help=".npy samples, at least n * repeats rows each")
    ap.add_argument("--reference", required=True, help=".npy exact draws, at least 2 * n * repeats rows")
    ap.add_argument("--n", type=int, default=10_000, help="rows a side in each comparison (evaluate's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object per file instead of the table")
    a = ap.parse_args()
    if a.n < 2 or a.repeats < 1:
        fail("--n must be at least 2 and --repeats at least 1")
    ref = load(a.reference, 2 * a.n * a.repeats, "--reference")
    results = {}
    for f in a.files:
        x = load(f, a.n * a.repeats, "samples")
        if x.shape[1] != ref.shape[1]:
            fail(f"'{f}' has dimension {x.shape[1]}, the reference {ref.shape[1]}")
        results[f] = repeats(x, ref, a.n, a.repeats)
    if a.json:
        for f, r in results.items():
            print(json.dumps({"file": f, "n": a.n, "repeats": a.repeats, **r}))
        return
    print(f"{a.repeats} disjoint comparisons of {a.n:,} a side: mean +- sd\n")
    print("| samples | sw2 | sw2_floor | sw2 / floor | nn_dist | nn_dist_floor | nn_dist / floor | n_far |")
    print("|---|---|---|---|---|---|---|---|")
    for f, r in results.items():
        print(
            f"| {f} | {r['sw2']:.4f} +- {r['sw2_sd']:.4f} | {r['sw2_floor']:.4f} +- {r['sw2_floor_sd']:.4f} | {r['sw2_ratio']:.2f}x "
            f"| {r['nn_dist']:.4f} +- {r['nn_dist_sd']:.4f} | {r['nn_dist_floor']:.4f} +- {r['nn_dist_floor_sd']:.4f} "
            f"| {r['nn_dist_ratio']:.2f}x | {r['n_far']} |"
        )


if __name__ == "__main__":
    sys.exit(run_script(main))
