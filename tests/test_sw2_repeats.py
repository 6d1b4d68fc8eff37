"""benchmarks/sw2_repeats.py: sliced W2 and nn_dist over K disjoint comparisons, beside their floors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtbcli.metrics import reference_comparison

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sw2_repeats.py"


def thin(n: int, seed: int, spread: float) -> np.ndarray:
    """Points on the unit circle, spread across it by `spread`."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([np.cos(a), np.sin(a)], 1) + spread * rng.standard_normal((n, 2))


def script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_repeats_average_evaluates_comparisons_and_see_a_wide_sampler(tmp_path):
    n, k = 400, 3
    np.save(tmp_path / "ref.npy", thin(2 * n * k, 0, 0.02))
    np.save(tmp_path / "exact.npy", thin(n * k, 1, 0.02))
    np.save(tmp_path / "wide.npy", thin(n * k, 2, 0.2))
    r = script(tmp_path / "exact.npy", tmp_path / "wide.npy", "--reference", tmp_path / "ref.npy", "--n", n, "--repeats", k, "--json")
    assert r.returncode == 0, r.stderr
    exact, wide = (json.loads(line) for line in r.stdout.splitlines())
    ref, x = torch.tensor(np.load(tmp_path / "ref.npy")), torch.tensor(np.load(tmp_path / "exact.npy"))
    by_hand = [reference_comparison(x[i * n : (i + 1) * n], ref[2 * i * n : (2 * i + 2) * n], seed=i) for i in range(k)]
    assert exact["sw2"] == pytest.approx(np.mean([b["sw2"] for b in by_hand]), rel=1e-12)
    assert exact["sw2_floor"] == pytest.approx(np.mean([b["sw2_floor"] for b in by_hand]), rel=1e-12)
    assert exact["nn_dist_sd"] == pytest.approx(np.std([b["nn_dist"] for b in by_hand], ddof=1), rel=1e-9)
    assert exact["nn_dist_ratio"] < 1.3 and wide["nn_dist_ratio"] > 3  # spread across the circle: 0.2 against 0.02
    assert wide["sw2_ratio"] > exact["sw2_ratio"]


def test_table_and_bad_input(tmp_path):
    np.save(tmp_path / "ref.npy", thin(40, 0, 0.02))
    np.save(tmp_path / "x.npy", thin(20, 1, 0.02))
    r = script(tmp_path / "x.npy", "--reference", tmp_path / "ref.npy", "--n", 10, "--repeats", 2)
    assert r.returncode == 0 and "| sw2 / floor |" in r.stdout and "x.npy" in r.stdout, r.stderr
    for args, says in [
        ((tmp_path / "missing.npy", "--reference", tmp_path / "ref.npy", "--n", 10, "--repeats", 2), "does not exist"),
        ((tmp_path / "x.npy", "--reference", tmp_path / "ref.npy", "--n", 10, "--repeats", 3), "at least 60 rows"),
        ((tmp_path / "x.npy", "--reference", tmp_path / "ref.npy", "--n", 1), "--n must be"),
    ]:
        r = script(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
