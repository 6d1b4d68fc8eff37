"""benchmarks/manywell_gap.py: a ManyWell-32 sampler's -ELBO split by pair and by the number of tilted pairs in the left
well; the pairs' terms add up to the library's own lpf - lpb - log pi, for the shipped prior and a fine-tuned run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rtbcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "manywell_gap.py"
PRIOR = ROOT / "rtbcli" / "data" / "prior-manywell32.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)


def parse(stdout: str) -> tuple[float, float, dict[int, list[str]]]:
    head, pairs, by_k = stdout.split("\n\n")[:3]
    parts = head.split("-ELBO ")[1]
    total, whole = float(parts.split(" ")[0]), float(parts.split("lpf - lpb - log pi: ")[1].split(")")[0])
    rows = {int(ln.split(" | ")[0].strip("| ")): ln.strip("| ").split(" | ") for ln in by_k.splitlines()[2:]}
    return total, whole, rows


@pytest.mark.parametrize("kind", ["prior", "finetuned"])
def test_the_pairs_add_up_to_the_whole_gap(kind, tmp_path):
    ck = PRIOR
    if kind == "finetuned":
        ck = tmp_path / "ft.safetensors"
        r = CliRunner().invoke(
            app, ["finetune", "--preset", "manywell32", "--prior", str(PRIOR), "--steps", "2", "--batch-size", "8", "--out", str(ck), "-q"]
        )
        assert r.exit_code == 0, r.stderr
    p = run(ck, "-n", 300)
    assert p.returncode == 0, p.stderr
    total, whole, rows = parse(p.stdout)
    assert total == pytest.approx(whole, abs=2e-3) and 0 < total < 50
    assert list(rows) == list(range(9))  # k = 0..8 of the first 8 pairs
    assert sum(float(r[1]) for r in rows.values()) == pytest.approx(1.0, abs=1e-4)  # the samples' shares
    assert sum(float(r[2]) for r in rows.values()) == pytest.approx(1.0, abs=1e-4)  # the exact target's binomial
    assert ("p_data r^beta" in p.stdout) == (kind == "finetuned")
    exact = [float(r[2]) for r in rows.values()]
    assert (exact.index(max(exact)) >= 5) == (kind == "finetuned")  # the tilt moves the target's pairs to the left well


def test_a_checkpoint_of_another_task_is_a_one_line_error():
    p = run(ROOT / "rtbcli" / "data" / "prior-reference.safetensors")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "manywell32" in p.stderr
