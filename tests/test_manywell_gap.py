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
    head, pairs, wells, by_k = stdout.split("\n\n")[:4]
    parts = head.split("-ELBO ")[1]
    total, whole = float(parts.split(" ")[0]), float(parts.split("lpf - lpb - log pi: ")[1].split(")")[0])
    rows = {int(ln.split(" | ")[0].strip("| ")): ln.strip("| ").split(" | ") for ln in by_k.splitlines()[2:]}
    return total, whole, rows


def parse_wells(stdout: str) -> list[list[str]]:
    """The rows of the per-well table: pairs, well, share of their terms, exact share, -ELBO per pair term."""
    wells = stdout.split("\n\n")[2]
    return [ln.strip("| ").split(" | ") for ln in wells.splitlines()[2:]]


@pytest.mark.parametrize("kind", ["prior", "finetuned", "langevin"])
def test_the_pairs_add_up_to_the_whole_gap(kind, tmp_path):
    """Also for a Langevin policy, which the script gives its reward's gradient again (a checkpoint holds no code)."""
    ck = PRIOR
    if kind != "prior":
        ck = tmp_path / "ft.safetensors"
        lp = ["--langevin"] if kind == "langevin" else []
        r = CliRunner().invoke(
            app,
            ["finetune", "--preset", "manywell32", "--prior", str(PRIOR), *lp, "--steps", "2", "--batch-size", "8", "--out", str(ck), "-q"],
        )
        assert r.exit_code == 0, r.stderr
    p = run(ck, "-n", 300)
    assert p.returncode == 0, p.stderr
    total, whole, rows = parse(p.stdout)
    assert total == pytest.approx(whole, abs=2e-3) and 0 < total < 50
    assert list(rows) == list(range(9))  # k = 0..8 of the first 8 pairs
    assert sum(float(r[1]) for r in rows.values()) == pytest.approx(1.0, abs=1e-4)  # the samples' shares
    assert sum(float(r[2]) for r in rows.values()) == pytest.approx(1.0, abs=1e-4)  # the exact target's binomial
    assert ("p_data r^beta" in p.stdout) == (kind != "prior")
    exact = [float(r[2]) for r in rows.values()]
    assert (exact.index(max(exact)) >= 5) == (kind != "prior")  # the tilt moves the target's pairs to the left well
    wells = parse_wells(p.stdout)  # the gap per pair term in each well: the whole is their mixture over the 16 pairs
    assert [(w[0], w[1]) for w in wells] == [("first 8", "left"), ("first 8", "right"), ("other 8", "left"), ("other 8", "right")]
    assert float(wells[0][2]) + float(wells[1][2]) == pytest.approx(1.0, abs=2e-4)
    assert float(wells[2][3]) == pytest.approx(0.1557, abs=1e-4)  # an untilted pair's left-well mass
    assert (float(wells[0][3]) > 0.8) == (kind != "prior")
    mix = sum(8 * float(w[2]) * float(w[4]) for w in wells if w[4] != "-")
    assert mix == pytest.approx(total, abs=0.02)
    if kind == "prior":  # the shipped prior's left-well terms are about twice its right-well ones (README: 0.216 vs 0.098)
        assert float(wells[0][4]) > 1.5 * float(wells[1][4]) and float(wells[2][4]) > 1.5 * float(wells[3][4])


def test_a_checkpoint_of_another_task_is_a_one_line_error():
    p = run(ROOT / "rtbcli" / "data" / "prior-reference.safetensors")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "manywell32" in p.stderr


def test_a_prior_of_a_user_network_is_split_when_its_class_is_named_again(tmp_path):
    """--network names a user's network class again (a checkpoint never imports code): without it, one line, exit 2."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Drift(nn.Module):\n    def __init__(self, dim=32):\n"
        "        super().__init__()\n        self.lin = nn.Linear(dim + 1, dim)\n\n"
        "    def forward(self, x, t):\n        return self.lin(torch.cat([x, t[:, None]], -1))\n"
    )
    ck = tmp_path / "p.safetensors"
    args = ["pretrain", "--preset", "manywell32", "--network", f"{tmp_path / 'net.py'}:Drift", "--steps", "2", "--batch-size", "4"]
    r = CliRunner().invoke(app, [*args, "--out", str(ck), "-q"])
    assert r.exit_code == 0, r.stderr
    p = run(ck, "-n", 200)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--network" in p.stderr, p.stderr
    p = run(ck, "-n", 200, "--network", f"{tmp_path / 'net.py'}:Drift")
    assert p.returncode == 0, p.stderr
    total, whole, rows = parse(p.stdout)
    assert total == pytest.approx(whole, abs=2e-3) and list(rows) == list(range(9))
