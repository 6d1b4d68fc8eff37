"""benchmarks/logweight_steps.py: a fine-tuned diffusers run's log-weight split by steps; the blocks' path KL adds up
to the whole, the shares and the reward's to 1, and the steps a run keeps the prior's (`--prior-tail-steps`) carry none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from tests.test_lora_cli import files, finetune  # noqa: E402,F401  (the tiny UNet folder, its task and reward)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "logweight_steps.py"


def test_blocks_add_up_and_the_prior_tail_carries_nothing(files, tmp_path):  # noqa: F811
    out = tmp_path / "run.safetensors"
    assert finetune(files, out, "--lora-rank", 2, "--prior-tail-steps", 1, "--lr", 0.05) == 0  # 4 sampling steps
    p = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--reward", f"{files / 'reward.py'}:log_reward", "-n", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    head, _, table = p.stdout.partition("\n\n")
    kl = float(head.split("path KL(policy || prior) ")[1].split(" nats")[0])
    rows = {ln.split(" | ")[0].strip("| "): [float(v) for v in ln.strip("| ").split(" | ")[1:]] for ln in table.splitlines()[2:]}
    assert list(rows) == ["0-0", "1-1", "2-2", "3-3", "beta log r"]  # K = 4: blocks of one step
    assert sum(v[0] for k, v in rows.items() if k != "beta log r") == pytest.approx(kl, abs=2e-3)
    assert sum(v[1] for v in rows.values()) == pytest.approx(1.0, abs=2e-3)
    assert abs(rows["3-3"][0]) < 1e-3 and abs(rows["3-3"][1]) < 1e-3  # the prior's own last step
    assert max(abs(rows[k][0]) for k in ("0-0", "1-1", "2-2")) > 1e-3  # the adapters moved the earlier ones
