"""benchmarks/time_to_quality.py (issue 22): rtbcli's and torchgfn's RTB fine-tuning on the reference task, one recipe,
each policy scored by the same function every few steps; the time ratio to a mode-weight KL.

The run needs torchgfn (the `bench` extra), which CI does not install: skipped there. Its missing-package message and
bad input are checked everywhere.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_bench_peer import run_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_quality.py"
TINY = ["--steps", "4", "--batch", "8", "--every", "2", "--n", "300", "--threads", "1"]


def run(args: list[str], *, hide_gfn: bool = False) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, hide_gfn=hide_gfn)


def test_tiny_run_gives_both_curves_and_the_ratio():
    pytest.importorskip("gfn", reason="torchgfn is not installed (pip install 'rtbcli[bench]')")
    pytest.importorskip("scipy", reason="torchgfn's diffusion environment needs scipy (pip install 'rtbcli[bench]')")
    p = run([*TINY, "--threshold", "50", "--json"])  # a threshold any policy meets: reached at the first point
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    for side in ("rtbcli", "torchgfn"):
        curve = rep["curves"][side]
        assert [c["step"] for c in curve] == [2, 4], side
        assert 0 < curve[0]["seconds"] < curve[1]["seconds"], side
        assert all(0 <= c["kl_mode"] < 50 and 0 <= c["off_target"] <= 1 for c in curve), side
        assert rep[f"{side}_reached"] == curve[0]
    assert rep["time_to_quality_ratio"] == pytest.approx(rep["curves"]["torchgfn"][0]["seconds"] / rep["curves"]["rtbcli"][0]["seconds"])
    assert rep["step_time_ratio"] > 0 and rep["copied_drift_max_abs_diff"] < 1e-4  # the scored copy is torchgfn's policy (float32)
    assert rep["recipe"]["steps"] == 4 and rep["recipe"]["batch"] == 8 and rep["threads"] == 1
    # the peer trained: its policy moved off the prior's (the same starting weights score the same on the same draw)
    assert rep["curves"]["torchgfn"][1]["kl_mode"] != rep["curves"]["rtbcli"][1]["kl_mode"]

    p = run([*TINY, "--threshold", "1e-9", "--json"])
    rep = json.loads(p.stdout)
    assert rep["rtbcli_reached"] is None and rep["time_to_quality_ratio"] is None


def test_without_torchgfn_it_names_the_extra_and_exits_2():
    p = run(TINY, hide_gfn=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'rtbcli[bench]'" in lines[0]


@pytest.mark.parametrize("args, says", [(["--steps", "0"], "--steps"), (["--every", "0"], "--every"), (["--lr", "-1"], "--lr")])
def test_bad_input_is_one_line(args, says):
    p = run(args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]
