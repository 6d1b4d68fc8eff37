"""benchmarks/logz_repeats.py: signed log-Z errors of an energy-mode sampler over R independent evaluations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "logz_repeats.py"


def script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def energy_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logz") / "gmm.safetensors"
    assert run(["finetune", "--preset", "gmm25-energy", "--steps", "3", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    return out


def test_repeats_are_evaluations_at_seeds_0_to_r_and_their_signed_errors(energy_ckpt):
    r = script(energy_ckpt, "--n", 300, "--repeats", 3, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ck = load_checkpoint(energy_ckpt)
    by_hand = [evaluate(ck, n=300, seed=s).metrics for s in range(3)]
    assert got["log_z_true"] == 0.0  # 25GMM's exact log Z
    assert got["elbo_error"] == pytest.approx([d["elbo"] for d in by_hand], abs=1e-9)
    assert got["rw_error"] == pytest.approx([d["log_z_rw"] for d in by_hand], abs=1e-9)
    # the draws differ (three seeds, not one draw three times), and a 3-step sampler is far from 25GMM
    assert len({round(v, 9) for v in got["rw_error"]}) == 3 and got["elbo_error_mean"] < -1
    rw = [d["log_z_rw"] for d in by_hand]
    assert got["delta_log_z_rw_median"] == pytest.approx(sorted(abs(v) for v in rw)[1], abs=1e-9)
    assert got["delta_log_z_rw_max"] == pytest.approx(max(abs(v) for v in rw), abs=1e-9)
    pooled = math.log(sum(math.exp(v) for v in rw) / 3)  # log mean exp of all 900 weights
    assert got["pooled_rw_error"] == pytest.approx(pooled, abs=1e-9)
    table = script(energy_ckpt, "--n", 300, "--repeats", 3)
    assert table.returncode == 0 and f"{got['rw_error_mean']:.3f} +- {got['rw_error_sd']:.3f}" in table.stdout


def test_bad_input_is_one_line_and_exit_2(energy_ckpt, tiny_prior, tmp_path):
    for args, match in [
        ((tmp_path / "missing.safetensors",), "does not exist"),
        ((energy_ckpt, "--repeats", 0), "--repeats at least 1"),
        ((tiny_prior,), "is not an energy-mode checkpoint"),
    ]:
        r = script(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], (args, r.stderr)
