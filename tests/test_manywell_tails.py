"""benchmarks/manywell_tails.py: exact samples of the tilted ManyWell-32 target land on the exact row, and the prior row
reweighted by r moves an untilted sample's tilted pairs to the tilted masses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtbcli.datasets.manywell import ManyWell, tilted_target

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "manywell_tails.py"


def cells(line: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in c.split(" / ")) for c in line.strip("| \n").split(" | ")[1:]]


def test_exact_samples_match_the_exact_row_and_reweighting_tilts_the_prior(tmp_path):
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "untilted.npy", ManyWell().sample(40_000, g, dtype=torch.float64).numpy())
    np.save(tmp_path / "tilted.npy", tilted_target(1.0, 8)[0].sample(40_000, g, dtype=torch.float64).numpy())
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "untilted.npy", "tilted.npy", "--reweight"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    first, rest = p.stdout.split("Over all pairs")
    overall, joint = rest.split("Jointly")
    lines = [ln for ln in first.splitlines() if ln.startswith("| ") and "---" not in ln and "pair 0" not in ln]
    rows = {ln.split(" | ")[0].strip("| "): cells(ln) for ln in lines}
    exact, tilted, untilted, reweighted = rows["exact"], rows["tilted.npy"], rows["untilted.npy"], rows["untilted.npy, reweighted by r"]
    assert [round(left, 3) for left, _ in exact] == [0.844] * 8 + [0.156]
    for (e, _), (t, _), (r, _) in zip(exact, tilted, reweighted):
        assert abs(t - e) < 0.01  # exact samples of the target
        assert abs(r - e) < 0.02  # p_data reweighted pair by pair is the tilted target (ManyWell is a product)
    assert all(abs(u - 0.156) < 0.01 for u, _ in untilted)
    # over all pairs: the exact row's left-well and between-the-wells masses (by quadrature) match exact samples
    table = {
        ln.split(" | ")[0].strip("| "): [float(c) for c in ln.strip("| ").split(" | ")[1:]]
        for ln in overall.splitlines()
        if ln.startswith("| ") and "---" not in ln and "samples" not in ln
    }
    for name in ("tilted.npy", "untilted.npy"):
        assert abs(table[name][2] - 1.0) < 0.01  # x2 is N(0, 1) in every pair
    left, between, _ = table["exact"]
    assert abs(table["tilted.npy"][0] - left) < 0.005 and abs(table["tilted.npy"][1] - between) < 0.002
    assert abs(table["untilted.npy"][1] - 0.0036) < 0.0015  # the barrier: 0.36% of an untilted pair's mass within |x1| < 1
    # jointly: independent pairs, so no correlation; each pair's E exp(-x1_j) is exactly 1 under p_data (log Z = 0)
    row = next(ln for ln in joint.splitlines() if ln.startswith("| untilted.npy"))
    corr, _, _, per_pair = (c.strip() for c in row.strip("| ").split(" | ")[1:])
    assert abs(float(corr)) < 0.01 and abs(float(per_pair)) < 0.05


def test_mass_below_is_the_cdf_of_the_x1_density():
    """mass_below1 (the script's exact tail column) against a direct Riemann sum of exp(-x^4 + 6x^2 + (0.5 - t) x)."""
    from rtbcli.datasets.manywell import left_mass1, mass_below1

    g = torch.linspace(-7, 7, 1_400_001, dtype=torch.float64)
    for tilt, cut in ((0.0, -2.4), (1.0, -2.4), (1.0, 0.3)):
        p = torch.exp(-(g**4) + 6 * g**2 + (0.5 - tilt) * g)
        assert mass_below1(cut, tilt) == pytest.approx(float(p[g < cut].sum() / p.sum()), rel=1e-3)
    assert mass_below1(0.0) == pytest.approx(left_mass1(0.0), rel=1e-12)
    assert (mass_below1(-50.0), mass_below1(50.0)) == (0.0, 1.0)
