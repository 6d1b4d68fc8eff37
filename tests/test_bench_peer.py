"""benchmarks/bench_peer.py (issue 22): rtbcli's steps against torchgfn's, at a tiny size.

The timing run needs torchgfn (the `bench` extra), which CI does not install: it is skipped there.
The message for a missing torchgfn is checked everywhere, by hiding the package from the script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"
TINY = [
    "--batch",
    "8",
    "--steps-T",
    "5",
    "--rounds",
    "1",
    "--steps",
    "2",
    "--peer-steps",
    "2",
    "--warmup",
    "1",
    "--floor-reps",
    "2",
    "--threads",
    "1",
    "--batch-d32",
    "6",
]


def run_script(script: Path, args: list[str], *, hide_gfn: bool = False) -> subprocess.CompletedProcess:
    """Run a benchmark script; `hide_gfn`: `import gfn` raises ImportError in it, as where torchgfn is not installed."""
    if hide_gfn:
        code = f"import runpy, sys; sys.modules['gfn'] = None; sys.argv = {[str(script), *args]!r}; runpy.run_path({str(script)!r}, run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def run(args: list[str], *, hide_gfn: bool = False) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, hide_gfn=hide_gfn)


def test_tiny_run_reports_positive_ratios_and_the_machine():
    pytest.importorskip("gfn", reason="torchgfn is not installed (pip install 'rtbcli[bench]')")
    pytest.importorskip("scipy", reason="torchgfn's diffusion environment needs scipy (pip install 'rtbcli[bench]')")
    p = run([*TINY, "--json"])
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    for key in (
        "finetune_ratio",
        "pretrain_ratio",
        "pretrain_trajectory_ratio",
        "finetune_floor_ratio",
        "d32_finetune_ratio",
        "finetune_bf16_ratio",
        "finetune_bf16_floor_ratio",
        "pretrain_bf16_ratio",
    ):
        assert rep[key] > 0, key
        assert len(rep["per_round"][key]) == 1 and rep["per_round"][key][0] > 0, key
    for key in (
        "rtbcli finetune",
        "rtbcli finetune bf16",
        "torchgfn finetune",
        "rtbcli pretrain",
        "rtbcli pretrain trajectory",
        "rtbcli pretrain bf16",
        "torchgfn pretrain",
        "gemm floor",
        "rtbcli finetune d32",
        "torchgfn finetune d32",
    ):
        assert rep["median_s"][key] > 0, key
    assert rep["batch"] == 8 and rep["T"] == 5 and rep["threads"] == 1 and rep["d32_batch"] == 6
    assert rep["params_d32"]["rtbcli"] == rep["params_d32"]["torchgfn"] > 21_122  # the same network at d = 32
    assert rep["cpu_capability"] and rep["torch"] and rep["torchgfn"] and rep["date"] and isinstance(rep["isa_env"], dict)
    assert rep["params"]["rtbcli"] == rep["params"]["torchgfn"] == 21_122
    assert rep["drift_max_abs_diff"] < 1e-5  # the two networks compute the same function
    assert rep["peer_estimator_calls_per_trajectory"] == 5  # T network calls per trajectory on both sides
    ops = rep["gemm_floor"]["ops"]
    assert rep["gemm_floor"]["gflop"] == pytest.approx(sum(op["gflop"] for op in ops))
    assert any(op["calls"] == 5 and op["m"] == 8 for op in ops)  # the sampling loop: T calls of B rows
    assert any(op["m"] == 40 for op in ops)  # the prior's forward over T*B states
    assert set(rep["step_contents"]) == {
        "rtbcli finetune",
        "rtbcli finetune bf16",
        "torchgfn finetune",
        "rtbcli pretrain",
        "rtbcli pretrain trajectory",
        "rtbcli pretrain bf16",
        "torchgfn pretrain",
        "rtbcli finetune d32",
        "torchgfn finetune d32",
    }


def test_without_torchgfn_it_names_the_extra_and_exits_2():
    p = run(TINY, hide_gfn=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'rtbcli[bench]'" in lines[0]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--threads", "0"], "--threads"),
        (["--device", "tpu"], "unsupported device"),
        (["--batch", "0"], "--batch"),
        (["--batch-d32", "0"], "--batch-d32"),
    ],
)
def test_bad_input_is_one_line(args, says):
    p = run(args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]


def test_no_d32_leaves_the_d32_keys_out():
    pytest.importorskip("gfn", reason="torchgfn is not installed (pip install 'rtbcli[bench]')")
    pytest.importorskip("scipy", reason="torchgfn's diffusion environment needs scipy (pip install 'rtbcli[bench]')")
    p = run([*TINY, "--no-d32", "--json"])
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["d32_finetune_ratio"] is None and "d32_finetune_ratio" not in rep["per_round"]
    p = run([*TINY, "--no-d32", "--no-bf16", "--json"])
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["finetune_bf16_ratio"] is None and "finetune_bf16_ratio" not in rep["per_round"]
    assert rep["pretrain_bf16_ratio"] is None and "pretrain_bf16_ratio" not in rep["per_round"]
    assert "rtbcli finetune bf16" not in rep["median_s"] and "rtbcli pretrain bf16" not in rep["median_s"]
    assert "rtbcli finetune d32" not in rep["median_s"]
