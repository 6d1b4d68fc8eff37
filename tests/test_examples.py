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


def test_manywell32_pair_network_is_one_2d_drift_per_pair():
    """examples/manywell32/pairnet.py: the drift of pair j is one 2-D function of (x_j, t) and the pair's embedding e_j
    alone (float64): no pair's drift moves with another pair's coordinates, pairs with equal embeddings share one
    function, and a changed embedding changes its own pair's drift and no other."""
    from rtbcli.networks import load_network

    torch = pytest.importorskip("torch")
    net = load_network(f"{EXAMPLES}/manywell32/pairnet.py:PairDrift").cls().double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():  # away from the zero output layer and zero embeddings of a fresh network
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        net.index[2:] = net.index[1]  # pairs 1-15 share one embedding, pair 0 has its own
    x, t = torch.randn(3, 32, generator=gen, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: net(z, t), x)  # (3, 32, 3, 32)
    jac = torch.stack([jac[b, :, b, :] for b in range(3)])  # each row's own (32, 32) Jacobian
    block = torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 16)
    assert jac[:, ~block].abs().max() == 0  # a pair's drift sees its own coordinates only
    assert jac[:, block].abs().min() > 0
    f = net(x, t).reshape(3, 16, 2)
    swapped = x.reshape(3, 16, 2)[:, [0, 2, 1, *range(3, 16)]].reshape(3, 32)  # pairs 1 and 2 trade states
    g = net(swapped, t).reshape(3, 16, 2)
    torch.testing.assert_close(g[:, 1], f[:, 2], rtol=0, atol=1e-13)  # one function for equal embeddings
    torch.testing.assert_close(g[:, 2], f[:, 1], rtol=0, atol=1e-13)
    first = x.reshape(3, 16, 2)[:, [1, 1, *range(2, 16)]].reshape(3, 32)  # pair 0 in pair 1's state
    h = net(first, t).reshape(3, 16, 2)
    assert (h[:, 0] - f[:, 1]).abs().min() > 1e-6  # pair 0's own embedding: another function
    torch.testing.assert_close(h[:, 1:], f[:, 1:], rtol=0, atol=1e-13)


def test_manywell32_pairs_preset_is_manywell32_with_its_stated_changes():
    """examples/manywell32/pairs.toml is the manywell32 preset (data, reward, time grid, recipe) with the pair network and
    the changes its comments give: no box term, pretraining batch 50, fine-tuning at lr 1e-3 and batch 50."""
    from rtbcli.presets_loader import load_preset

    pairs, base = load_preset(str(EXAMPLES / "manywell32" / "pairs.toml"))[0], load_preset("manywell32")[0]
    assert (pairs.beta, pairs.prior_data, pairs.reward, pairs.evaluate) == (base.beta, base.prior_data, base.reward, base.evaluate)
    s, b = pairs.sampler, base.sampler
    assert (s.steps, s.sigma2, s.time_power) == (b.steps, b.sigma2, b.time_power)
    assert s.network == f"{(EXAMPLES / 'manywell32' / 'pairnet.py').resolve()}:PairDrift"
    assert pairs.pretrain.model_dump() == {**base.pretrain.model_dump(), "batch_size": 50, "box_weight": 0.0}
    assert pairs.finetune.model_dump() == {**base.finetune.model_dump(), "batch_size": 50, "lr": 1e-3}
