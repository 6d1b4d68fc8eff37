"""The repository's scripts (benchmarks/, scripts/) meet bad input as the command line does: one line and exit 2
(`rtbcli.script_support`), not a traceback with exit 1 (a review found 30 such cases). Run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("benchmarks/bench_steps.py", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (
        "benchmarks/bench_steps.py",
        ["--prior", "nope.safetensors", "--steps", "1", "--rounds", "1"],
        "checkpoint 'nope.safetensors' not found",
    ),
    ("benchmarks/bench_backward.py", ["--device", "bogus"], "unknown device 'bogus'"),
    ("benchmarks/bench_scaling.py", ["--processes", "0"], "argument --processes: must be at least 1, got 0"),
    ("benchmarks/bench_bf16.py", ["--batch", "-1"], "argument --batch: must be at least 1, got -1"),
    ("benchmarks/manywell_gap.py", ["nope.safetensors"], "checkpoint 'nope.safetensors' not found"),
    ("benchmarks/profile_steps.py", ["--warmup", "-5"], "argument --warmup: must be at least 0, got -5"),
    ("scripts/refresh_prior_config.py", ["nosuchpreset"], "unknown preset 'nosuchpreset'"),
]


@pytest.mark.parametrize(("script", "args", "match"), CASES, ids=[f"{Path(c[0]).stem}-{c[1][0]}" for c in CASES])
def test_a_script_s_bad_input_is_one_line_and_exit_2(script, args, match, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{Path(script).name}: error: ") and match in lines[0], lines
