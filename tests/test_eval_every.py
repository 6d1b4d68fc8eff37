"""`eval_every` (finetune --eval-every): Table 1's metrics logged during an energy-mode run (data mode: the mode
metrics of the reference task), with the training wall time to each, so that the time to reach a number can be read
off the log (issue 18: time-to-target; issue 22: time-to-quality against torchgfn).

Checked where it is used: the loop writes the records at the right steps, with the numbers `rtbcli.energy.table_metrics`
gives for the policy at that step, without touching the run's random streams (the trained weights are bit-identical
with and without it) and with its own time left out of the run's."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from rtbcli.checkpoint import load_checkpoint
from rtbcli.energy import get_target, table_metrics
from rtbcli.finetune import _mix
from rtbcli.runtime import make_generator
from tests.test_energy_cli import cli, one_line_error, tiny_energy, write_target

KEYS = {"k", "elbo", "log_z_rw", "log_z_true", "delta_log_z", "delta_log_z_rw", "eubo", "w2", "w2_stratified"}


def _evals(log):
    return [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]


def test_the_loop_logs_the_table_every_n_steps_and_leaves_training_unchanged(tmp_path, capsys):
    preset = tiny_energy(tmp_path, steps=10, n=200)
    with_eval, without = tmp_path / "e.safetensors", tmp_path / "n.safetensors"
    code, _, err = cli(capsys, "finetune", "--preset", preset, "--eval-every", 4, "--out", with_eval, "--quiet")
    assert code == 0, err
    assert cli(capsys, "finetune", "--preset", preset, "--out", without, "--quiet")[0] == 0
    a, b = load_file(with_eval), load_file(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # its own generator: the run is the same

    evals = _evals(tmp_path / "e.jsonl")
    assert [e["step"] for e in evals] == [4, 8, 10]  # every 4 steps and at the last
    assert all(set(e["eval"]) == KEYS and e["eval"]["k"] == 200 for e in evals)
    assert all(math.isfinite(v) for e in evals for v in e["eval"].values())
    secs = [e["seconds"] for e in evals]
    assert secs == sorted(secs) and secs[0] > 0
    assert not _evals(tmp_path / "n.jsonl")

    # the last record is table_metrics of the finished policy, from the generator the recipe seeds for that step
    ck = load_checkpoint(with_eval)
    policy = ck.sampler("policy")
    want = table_metrics(policy, get_target("gmm25"), 200, make_generator(_mix(0, 10, 2), torch.device("cpu")))
    for key in KEYS:
        assert math.isclose(evals[-1]["eval"][key], want[key], rel_tol=1e-5, abs_tol=1e-6), key


def test_evaluation_time_is_not_training_time(tmp_path, capsys, monkeypatch):
    """A slow evaluation (1,000 s each, on a clock the stub moves on, so a loaded machine cannot blur it) adds nothing to
    the run's reported seconds."""
    import time

    import rtbcli.finetune as ft

    real, clock, offset = ft.table_metrics, time.perf_counter, [0.0]

    def slow(*a, **k):
        offset[0] += 1000.0
        return real(*a, **k)

    monkeypatch.setattr(time, "perf_counter", lambda: clock() + offset[0])
    monkeypatch.setattr(ft, "table_metrics", slow)
    out = tmp_path / "s.safetensors"
    code, text, err = cli(
        capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=4, n=50), "--eval-every", 2, "--out", out, "--json", "--quiet"
    )
    assert code == 0, err
    assert offset[0] == 2000.0  # two evaluations
    assert json.loads(text)["seconds"] < 100  # 4 tiny steps; with the evaluations counted, > 2,000
    evals = _evals(tmp_path / "s.jsonl")
    assert len(evals) == 2 and evals[1]["seconds"] - evals[0]["seconds"] < 100


def test_a_user_target_without_exact_samples_logs_the_bounds_only(tmp_path, capsys):
    ref = write_target(tmp_path, "return -0.5 * x.pow(2).sum(-1)")
    out = tmp_path / "u.safetensors"
    code, _, err = cli(
        capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=2, n=50), "--target", ref, "--eval-every", 1, "--out", out, "--quiet"
    )
    assert code == 0, err
    evals = _evals(tmp_path / "u.jsonl")
    assert len(evals) == 2 and all(set(e["eval"]) == {"k", "elbo", "log_z_rw"} for e in evals)


def test_a_negative_eval_every_is_refused(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, _, err = cli(capsys, "finetune", "--preset", tiny_energy(tmp_path), "--eval-every", -1, "--out", out)
    one_line_error(code, err, "--eval-every should be greater than or equal to 0")
    assert not out.exists()


def test_data_mode_logs_the_mode_metrics_of_the_policy(tmp_path, capsys, tiny_preset_file, tiny_prior):
    """The reference task (exact target p_data r): log_r_mean and the mode metrics, the numbers `sample_metrics` gives
    for the policy at that step from the recipe's generator; training unchanged by it."""
    from rtbcli.metrics import sample_metrics
    from rtbcli.suites import tilted_target
    from rtbcli.tasks import Task

    base = ["finetune", "--preset", tiny_preset_file, "--prior", tiny_prior, "--quiet"]
    with_eval, without = tmp_path / "e.safetensors", tmp_path / "n.safetensors"
    code, _, err = cli(capsys, *base, "--eval-every", 3, "--out", with_eval)
    assert code == 0, err
    assert cli(capsys, *base, "--out", without)[0] == 0
    a, b = load_file(with_eval), load_file(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    evals = _evals(tmp_path / "e.jsonl")
    assert [e["step"] for e in evals] == [3, 4]
    keys = {"n", "log_r_mean", "mode_coverage", "n_target_modes", "kl_mode", "off_target", "kl_hist"}
    assert all(set(e["eval"]) == keys and e["eval"]["n"] == 400 for e in evals)

    ck = load_checkpoint(with_eval)
    x = ck.sampler("policy").sample(400, 0.0, make_generator(_mix(0, 4, 2), torch.device("cpu")))[-1]
    task = Task(ck.preset, ck.preset.beta)
    want = sample_metrics(x, tilted_target(task, ck.preset.beta))
    for key in ("kl_mode", "off_target", "mode_coverage", "kl_hist"):
        assert math.isclose(evals[-1]["eval"][key], want[key], rel_tol=1e-5, abs_tol=1e-7), key
    assert math.isclose(evals[-1]["eval"]["log_r_mean"], float(task.log_reward(x).double().mean()), rel_tol=1e-5)
