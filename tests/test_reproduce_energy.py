"""`rtbcli reproduce` on an energy preset: every configuration trained from the Brownian prior and scored on a tiny
budget, the table's rows and keys, summary.json, and the published rows beside them."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.errors import InputError
from rtbcli.presets_loader import load_preset
from rtbcli.reproduce import Budget, budget_for
from rtbcli.reproduce_energy import (
    CONFIGS,
    METRICS,
    QUICK_CONFIGS,
    aggregate,
    energy_table,
    exploration_end_step,
    goal_table,
    preset_for,
    published_goals,
    reproduce_energy,
    reusable_seconds,
    seconds_to_goal,
)

TINY = ["--steps", "2", "--batch-size", "8", "-n", "64", "--quiet"]


def test_quick_energy_reproduce_writes_the_rows_and_the_published_table(tmp_path, capsys):
    out = tmp_path / "rep"
    code = run(["reproduce", "--preset", "gmm25-energy", "--quick", *TINY, "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "energy" and summary["target"] == "gmm25" and summary["seeds"] == [0]
    assert [r["config"] for r in summary["rows"]] == list(QUICK_CONFIGS)
    for row in summary["rows"]:
        assert row["seeds"] == 1 and row["diverged"] == 0
        for key in (*METRICS, "train_seconds"):
            mean, std = row[key]
            assert isinstance(mean, float) and std == 0.0
    for r in summary["runs"]:
        ck = load_checkpoint(r["checkpoint"])
        config, f = CONFIGS[r["config"]], ck.preset.finetune
        assert ck.step == 2 and ck.algo == config.algo
        assert (f.exploration, f.exploration_end_step) == ((0.2, 1) if config.explore else (0.0, None))
        assert (f.replay, f.local_search) == ((True, True) if r["config"] == "TB+Expl+LS" else (False, False))
    assert {r["method"] for r in summary["published"]} >= {"TB", "TB + Expl. + LS", "VarGrad + Expl."}
    assert summary["published_citation"]["arxiv"] == "2402.05098"
    assert "i.i.d." in summary["w2_samples"] and "stratified" in summary["w2_samples"]
    assert summary["budget"]["finetune_steps"] == 2 and summary["budget"]["exploration_end_step"] == 1
    assert (out / "figure.png").stat().st_size > 0 and summary["figure"] == str(out / "figure.png")
    for r in summary["runs"]:  # the in-loop evaluations (eval_every 1 at 2 steps, K = the budget's n): the curve
        assert [c["step"] for c in r["curve"]] == [1, 2] and all(c["w2"] and c["w2_stratified"] for c in r["curve"])
        assert load_checkpoint(r["checkpoint"]).preset.evaluate.n == 64
        assert set(r["seconds_to_goal"]) == {"delta_log_z", "delta_log_z_rw", "w2_stratified"}  # 25GMM's W2 goal: the paper's way
        assert r["w2_stratified"] > 0 and r["w2_stratified_floor"] > 0
    assert summary["goals"] == published_goals("gmm25")


def test_configs_chooses_rows_and_lp_rows_train_the_papers_share(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["reproduce", "--preset", "gmm25-energy", "--steps", "5", "--batch-size", "8", "-n", "32", "--seeds", "2", "--quiet"]
    code = run([*argv, "--configs", "VarGrad+Expl+LP+LS, TB", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert [r["config"] for r in summary["rows"]] == ["VarGrad+Expl+LP+LS", "TB"]
    assert [(r["config"], r["seed"]) for r in summary["runs"]] == [
        ("VarGrad+Expl+LP+LS", 0),
        ("VarGrad+Expl+LP+LS", 1),
        ("TB", 0),
        ("TB", 1),
    ]
    assert all(row["seeds"] == 2 and row["delta_log_z"][1] >= 0 for row in summary["rows"])
    lp, tb = summary["runs"][0], summary["runs"][2]
    assert (lp["steps"], tb["steps"]) == (2, 5)  # the LP rows: 40% of the steps, as the paper's 10,000 of 25,000
    f = load_checkpoint(lp["checkpoint"]).preset.finetune
    assert (f.langevin, f.replay, f.local_search, f.steps) == (True, True, True, 2)
    console = Console(width=200, record=True)
    console.print(energy_table(summary))  # the title says what the LP rows ran, not only the budget
    assert "gmm25-energy: 5 steps (LP rows: 2), batch 8" in console.export_text()


def test_bad_configs_are_refused_before_anything_is_written(tmp_path, capsys):
    for configs, match in (("TB,Nope", "unknown configuration(s) Nope: choose from TB, TB+Expl"), ("TB,TB", "names a configuration twice")):
        out = tmp_path / "x"
        code = run(["reproduce", "--preset", "gmm25-energy", "--configs", configs, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code = run(["reproduce", "--quick", "--configs", "TB", "--out", str(tmp_path / "y")])
    assert code == 2 and "--configs applies to an energy preset" in capsys.readouterr().err


def test_time_to_goal_reads_the_first_evaluation_at_or_below_it():
    goals = {"delta_log_z": 0.171, "delta_log_z_rw": 0.015, "w2": 1.13}
    assert published_goals("gmm25") == {"delta_log_z": 0.171, "delta_log_z_rw": 0.015, "w2_stratified": 1.13}
    assert published_goals("funnel") == {"delta_log_z": 0.424, "delta_log_z_rw": 0.051 + 0.616, "w2": 20.7}
    assert published_goals(None) == {}
    curve = [
        {"step": 10, "seconds": 1.0, "delta_log_z": 0.5, "delta_log_z_rw": 0.015, "w2": 2.0},
        {"step": 20, "seconds": 2.0, "delta_log_z": 0.171, "delta_log_z_rw": 0.2, "w2": None},
        {"step": 30, "seconds": 3.0, "delta_log_z": 0.1, "delta_log_z_rw": 0.0, "w2": 1.5},
    ]
    assert seconds_to_goal(curve, goals) == {"delta_log_z": 2.0, "delta_log_z_rw": 1.0, "w2": None}
    runs = [
        {"checkpoint": "a", "seconds_to_goal": {"delta_log_z": 2.0, "delta_log_z_rw": None, "w2": None}},
        {"checkpoint": "b", "seconds_to_goal": {"delta_log_z": 4.0, "delta_log_z_rw": None, "w2": None}},
    ]
    row = aggregate("TB", runs)
    assert row["seconds_to_goal"]["delta_log_z"] == {"runs": 2, "of": 2, "median_seconds": 3.0}
    assert row["seconds_to_goal"]["w2"] == {"runs": 0, "of": 2, "median_seconds": None}
    console = Console(width=200, record=True)
    console.print(goal_table({"goals": goals, "rows": [row]}))
    text = console.export_text()
    assert "3 s (2/2)" in text and "not reached (0/2)" in text


def test_every_configuration_runs_and_prints_a_table(tmp_path):
    preset, ref = load_preset("gmm25-energy")
    summary = reproduce_energy(
        preset, ref, tmp_path, Budget(2, 8, 64, None), quick=False, seeds=1, progress=False, console=Console(file=None, quiet=True)
    )
    assert [r["config"] for r in summary["rows"]] == list(CONFIGS)
    assert len(summary["runs"]) == len(CONFIGS)
    for r in summary["runs"]:  # each run trained with its configuration's tools and exploration (e.g. TB+LP+LS: none)
        config, f = CONFIGS[r["config"]], load_checkpoint(r["checkpoint"]).preset.finetune
        assert all(getattr(f, k) == v for k, v in config.overrides.items()) and (f.exploration > 0) == config.explore, r["config"]
        if r["config"] == "TB+LP+LS":  # the ManyWell row that kept its ELBO: LP and LS, no exploration
            assert (f.langevin, f.replay, f.local_search, f.exploration) == (True, True, True, 0.0)
    for row in summary["rows"]:
        assert row["seeds"] == 1 and row["delta_log_z"] is not None or row["diverged"]
    console = Console(width=200, record=True)
    console.print(energy_table(summary))
    text = console.export_text()
    for name in (*CONFIGS, "exact sampler (W2 floor)", "TB + Expl. + LS", "GGNS (MCMC)", "2402.05098"):
        assert name in text


def test_energy_budgets_and_aggregation():
    preset, _ = load_preset("gmm25-energy")
    assert budget_for(preset, True) == Budget(1_000, 300, 2_000, None)
    assert budget_for(preset, False) == Budget(25_000, 300, 2_000, None)
    assert exploration_end_step(25_000) == 5_000 and exploration_end_step(1_000) == 200
    row = aggregate("TB", [{"checkpoint": "a", "w2": 1.0, "train_seconds": 2.0}, {"checkpoint": "b", "w2": 3.0, "train_seconds": 2.0}])
    assert row["w2"] == [2.0, 2**0.5] and row["train_seconds"] == [2.0, 0.0] and row["eubo"] is None
    assert aggregate("TB", [{"checkpoint": None, "diverged": "nan"}])["diverged"] == 1


def test_reuse_collects_seeds_run_as_separate_commands_and_refuses_other_settings(tmp_path, capsys):
    """Seed 1 run alone, then seeds 0-1 with --reuse into the same folder: seed 1 is evaluated again (same numbers, same
    file), not trained; seed 0 is trained. A finished run of other settings is refused, nothing retrained over it."""
    out = tmp_path / "rep"
    base = ["reproduce", "--preset", "gmm25-energy", "--configs", "TB", "--steps", "3", "--batch-size", "8", "-n", "32", "--quiet"]
    assert run([*base, "--seed", "1", "--seeds", "1", "--out", str(out), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["runs"][0]
    ck = out / "TB-seed1.safetensors"
    before = ck.read_bytes()
    code = run([*base, "--seeds", "2", "--reuse", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    runs = {r["seed"]: r for r in json.loads(captured.out)["runs"]}
    assert (runs[0]["reused"], runs[1]["reused"]) == (False, True) and ck.read_bytes() == before
    assert runs[1]["train_seconds"] == first["train_seconds"] and runs[1]["delta_log_z"] == first["delta_log_z"]
    assert runs[1]["curve"] == first["curve"]
    # the in-loop evaluations' period is not a setting (a `finetune --eval-every N` run is reused); the lr is
    p1 = preset_for(load_preset("gmm25-energy")[0], CONFIGS["TB"], Budget(3, 8, 32, None))
    assert p1.finetune.eval_every == 1
    log = out / "TB-seed1.jsonl"
    assert round(reusable_seconds(ck, log, p1.updated("finetune", eval_every=7), CONFIGS["TB"], 1), 1) == first["train_seconds"]
    with pytest.raises(InputError, match="other settings"):
        reusable_seconds(ck, log, p1.updated("finetune", lr=2e-3), CONFIGS["TB"], 1)

    other = ["reproduce", "--preset", "gmm25-energy", "--configs", "TB", "--steps", "4", "--batch-size", "8", "-n", "32", "--quiet"]
    code = run([*other, "--seeds", "2", "--reuse", "--out", str(out)])
    err = capsys.readouterr().err
    assert (
        code == 2 and "TB-seed0.safetensors holds a run with other settings than TB, seed 0" in err and len(err.strip().splitlines()) == 1
    )
    assert ck.read_bytes() == before
    code = run(["reproduce", "--quick", "--reuse", "--out", str(tmp_path / "y")])
    assert code == 2 and "--reuse applies to an energy preset" in capsys.readouterr().err
