"""`evaluate` on the shipped prior and on a finetuned checkpoint, against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.evaluate import evaluate
from rtbcli.finetune import finetune
from rtbcli.reproduce import shipped_prior
from test_metrics import independent_metrics

N = 3000


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(shipped_prior())


def check_against_independent(ev, means, weights, std):
    x = ev.samples.numpy().astype(np.float64)
    ref = independent_metrics(x, means, weights, std)
    m = ev.metrics
    assert m["mode_coverage"] == ref["mode_coverage"]
    for key in ("kl_mode", "off_target", "kl_hist"):
        assert m[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    floor = independent_metrics(ev.target_samples.numpy().astype(np.float64), means, weights, std)
    for key in ("kl_mode", "off_target", "kl_hist"):
        assert m["floor"][key] == pytest.approx(floor[key], rel=1e-9, abs=1e-12), key


def test_shipped_prior_evaluation(shipped):
    ev = evaluate(shipped, n=N, seed=0)
    means = ev.target.cell_means.numpy()
    check_against_independent(ev, means, np.full(25, 1 / 25), math.sqrt(0.3))
    m = ev.metrics
    assert m["kind"] == "prior" and m["n_target_modes"] == 25 and m["log_z_true"] == 0.0
    assert m["elbo"] <= m["log_z_is_data"] + 0.05 and m["elbo"] <= 0.0 <= m["eubo"] + 1e-9  # the sandwich
    assert 0 < m["ess"] <= 1
    # what the provenance promises: made by `rtbcli pretrain` with the reference preset's defaults
    assert shipped.meta["kind"] == "prior" and shipped.meta["preset"] == "reference" and shipped.step == 10_000


def test_finetuned_evaluation(tmp_path, shipped):
    out = tmp_path / "ft.safetensors"
    finetune(shipped, shipped.preset.updated("finetune", steps=5, batch_size=64), "reference", "rtb", out, progress=False)
    ck = load_checkpoint(out)
    ev = evaluate(ck, n=N, seed=1)
    w = np.zeros(25)
    w9 = {(-10, -5): 4, (-5, -10): 10, (-5, 0): 4, (10, -5): 5, (0, 0): 10, (0, 5): 5, (5, -5): 4, (5, 0): 15, (5, 10): 4}
    means = ev.target.cell_means.numpy()
    for k, mu in enumerate(means):
        w[k] = w9.get((int(mu[0]), int(mu[1])), 0) / 61
    check_against_independent(ev, means, w, math.sqrt(0.3))
    m = ev.metrics
    assert m["kind"] == "finetuned" and m["algo"] == "rtb" and m["n_target_modes"] == 9
    assert m["log_z_learned"] == pytest.approx(ck.scalar("log_z"))
    assert m["elbo"] <= m["eubo"]
