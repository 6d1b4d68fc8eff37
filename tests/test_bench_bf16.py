"""benchmarks/bench_bf16.py: one JSON object with the float32 / bfloat16 GEMM ratio; bad counts exit 2 in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bf16.py"


def test_bench_bf16_reports_medians_and_per_round_ratios():
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--threads", "1", "--rounds", "2", "--reps", "1", "--batch", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["shape"] == [2000, 64, 64] and len(r["per_round_ratios"]) == 2 and r["ratio_float32_over_bf16"] > 0
    assert set(r["median_ms"]) == {"float32", "bfloat16"}


def test_a_bad_thread_count_is_a_one_line_error():
    p = subprocess.run([sys.executable, str(SCRIPT), "--threads", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--threads" in p.stderr
