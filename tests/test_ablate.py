"""benchmarks/ablate.py: every (variant, algorithm) pair fine-tuned and evaluated through the CLI, one table row
each with the variant's options in effect, and finished runs reused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rtbcli.checkpoint import load_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablate.py"


def test_ablate_runs_each_variant_and_reuses_finished_runs(tiny_preset_file, tiny_prior, tmp_path):
    out = tmp_path / "abl"
    cmd = [sys.executable, str(SCRIPT), "--preset", str(tiny_preset_file), "--prior", str(tiny_prior), "--algos", "vargrad"]
    cmd += ["--variant", "before=--steps 2 --batch-size 8", "--variant", "cosine lr=--steps 3 --batch-size 8 --lr-schedule cosine"]
    cmd += ["--metrics", "elbo,log_z_is", "--run-metrics", "trainable_parameters", "--eval-args", "--n 200", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["variant"], r["algo"]) for r in rows] == [("before", "vargrad"), ("cosine lr", "vargrad")]
    assert all(r["elbo"] is not None for r in rows)
    assert all(r["trainable_parameters"] == rows[0]["trainable_parameters"] > 0 for r in rows)  # from finetune --json
    ck = load_checkpoint(out / "cosine-lr-vargrad.safetensors")
    assert ck.step == 3 and ck.preset.finetune.lr_schedule == "cosine" and ck.algo == "vargrad"
    assert "| cosine lr | `--steps 3 --batch-size 8 --lr-schedule cosine` | vargrad |" in p.stdout
    mtime = (out / "before-vargrad.safetensors").stat().st_mtime_ns
    p2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0 and (out / "before-vargrad.safetensors").stat().st_mtime_ns == mtime  # reused, not trained again
    assert p2.stdout.splitlines()[2:] == p.stdout.splitlines()[2:]  # and its evaluation with it: the same table


def test_ablate_pretrain_mode_pretrains_each_variant_with_its_options(tiny_preset_file, tmp_path):
    """--pretrain: each variant is `rtbcli pretrain --preset T <options>`, scored as a prior (here --sigma2 reaches the run)."""
    out = tmp_path / "thin"
    cmd = [sys.executable, str(SCRIPT), "--pretrain", "--preset", str(tiny_preset_file), "--variant", "default=--steps 2"]
    cmd += [
        "--variant",
        "sigma2 1=--steps 2 --sigma2 1",
        "--metrics",
        "sw2,nn_dist,nn_dist_floor",
        "--eval-args",
        "--n 200",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["variant"], r["algo"]) for r in rows] == [("default", "prior"), ("sigma2 1", "prior")]
    assert all(r["nn_dist"] > 0 and r["train_seconds"] > 0 for r in rows)
    sigma2 = [load_checkpoint(out / f"{s}-prior.safetensors").preset.sampler.sigma2 for s in ("default", "sigma2-1")]
    assert sigma2[1] == 1.0 and sigma2[0] != 1.0
    assert "pretraining on its data" in p.stdout and "| sigma2 1 | `--steps 2 --sigma2 1` | prior |" in p.stdout
