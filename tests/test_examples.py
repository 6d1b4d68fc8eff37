"""The README's worked examples run as written (examples/moons, examples/mixture10d), on tiny budgets.

Each runs in a copy of its folder, through the command-line entry point, with the commands of the
README apart from the step counts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtbcli.cli import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def rtbcli(capsys, *argv) -> dict:
    code = run([str(a) for a in argv] + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_moons_example(tmp_path, capsys, monkeypatch):
    shutil.copytree(EXAMPLES / "moons", tmp_path / "moons")
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "moons/make_moons.py"], check=True, capture_output=True)
    with open("moons.csv") as f:
        assert f.readline().strip() == "x,y"
    assert np.loadtxt("moons.csv", delimiter=",", skiprows=1).shape == (4000, 2)
    rtbcli(capsys, "pretrain", "--data", "moons.csv", "--steps", 3, "--out", "moons-prior.safetensors")
    ft = rtbcli(
        capsys,
        "finetune",
        "--prior",
        "moons-prior.safetensors",
        "--reward",
        "moons/favour.py:log_reward",
        "--steps",
        3,
        "--batch-size",
        16,
        "--out",
        "moons-rtb.safetensors",
    )
    assert ft["steps"] == 3
    ev = rtbcli(capsys, "evaluate", "moons-rtb.safetensors", "--reward", "moons/favour.py:log_reward", "-n", 500, "--plot", "moons.png")
    assert ev["target_method"] == "reference" and "accepted" in ev["reference"]
    assert {"sw2", "sw2_floor", "mmd2", "mmd2_floor", "log_z_is", "ess_fraction", "path_kl", "log_r_mean"} <= set(ev)
    assert Path("moons.png").read_bytes()[:4] == b"\x89PNG"


def test_mixture10d_example(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mixture10d"
    shutil.copytree(EXAMPLES / "mixture10d", folder)
    monkeypatch.chdir(folder)
    subprocess.run([sys.executable, "make_data.py"], check=True, capture_output=True)
    assert np.load("data.npy").shape == np.load("target.npy").shape == (20_000, 10)
    rtbcli(capsys, "pretrain", "--preset", "task.toml", "--steps", 3, "--out", "prior.safetensors")
    ev = rtbcli(capsys, "evaluate", "prior.safetensors", "-n", 400)  # a prior is compared with its data, not target.npy
    assert ev["reference"] == "the 20,000 data rows" and ev["n_reference"] == 20_000
    for algo in ("rtb", "trust-pcl", "reinforce-kl"):
        rtbcli(
            capsys,
            "finetune",
            "--prior",
            "prior.safetensors",
            "--algo",
            algo,
            "--preset",
            "task.toml",
            "--steps",
            2,
            "--batch-size",
            16,
            "--out",
            f"{algo}.safetensors",
        )
        ev = rtbcli(capsys, "evaluate", f"{algo}.safetensors", "--reward", "rewards.py:keep_modes", "-n", 400)
        assert ev["dim"] == 10 and ev["target_method"] == "reference" and "target.npy" in ev["reference"]
        assert {"sw2", "sw2_floor", "mmd2", "mmd2_floor", "log_z_is", "ess_fraction", "path_kl"} <= set(ev)


def test_thin_moons_example(tmp_path, capsys, monkeypatch):
    """README's thin-data block: the moons with noise 0.05 and exact draws of their law, a prior of examples/moons/thin.toml
    (its time grid and sigma2 in the checkpoint), scored against the draws by evaluate (nn_dist beside its floor) and by
    benchmarks/sw2_repeats.py over disjoint chunks of a larger draw."""
    from rtbcli.checkpoint import load_checkpoint

    shutil.copytree(EXAMPLES / "moons", tmp_path / "examples" / "moons")
    monkeypatch.chdir(tmp_path)
    make = [sys.executable, "examples/moons/make_moons.py", "--noise", "0.05"]
    subprocess.run([*make, "--out", "examples/moons/thin.csv"], check=True, capture_output=True)
    subprocess.run([*make, "--n", "20000", "--seed", "7", "--out", "examples/moons/thin-exact.npy"], check=True, capture_output=True)
    data, exact = np.loadtxt("examples/moons/thin.csv", delimiter=",", skiprows=1), np.load("examples/moons/thin-exact.npy")
    assert data.shape == (4000, 2) and exact.shape == (20000, 2) and not np.allclose(data, exact[:4000])
    pre = ["pretrain", "--preset", "examples/moons/thin.toml", "--steps", 3, "--batch-size", 16]
    rtbcli(capsys, *pre, "--out", "thin-prior.safetensors")
    spec = load_checkpoint("thin-prior.safetensors").preset.sampler
    assert (spec.sigma2, spec.time_power) == (2.0, 2.0)
    ev = rtbcli(capsys, "evaluate", "thin-prior.safetensors", "--reference", "examples/moons/thin-exact.npy", "-n", 500)
    assert ev["n_reference"] == 20000 and ev["nn_dist"] > ev["nn_dist_floor"] > 0
    # the repeated comparison, at a tenth of README's sizes
    subprocess.run([*make, "--n", "2000", "--seed", "8", "--out", "thin-exact200k.npy"], check=True, capture_output=True)
    rtbcli(capsys, "sample", "thin-prior.safetensors", "--n", 1000, "--out", "thin-prior.npy")
    r = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES.parent / "benchmarks" / "sw2_repeats.py"),
            "thin-prior.npy",
            "--reference",
            "thin-exact200k.npy",
            "--n",
            "100",
            "--repeats",
            "10",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nn_dist_ratio"] > 1  # three steps of pretraining: far from the curves
