"""`rtbcli reproduce` on an energy preset: every configuration trained from the Brownian prior and scored on a tiny
budget, the table's rows and keys, summary.json, and the published rows beside them."""

from __future__ import annotations

import json

from rich.console import Console

from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.presets_loader import load_preset
from rtbcli.reproduce import Budget, budget_for
from rtbcli.reproduce_energy import CONFIGS, METRICS, QUICK_CONFIGS, aggregate, energy_table, exploration_end_step, reproduce_energy

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


def test_every_configuration_runs_for_two_seeds_and_prints_a_table(tmp_path):
    preset, ref = load_preset("gmm25-energy")
    summary = reproduce_energy(
        preset, ref, tmp_path, Budget(2, 8, 64, None), quick=False, seeds=2, progress=False, console=Console(file=None, quiet=True)
    )
    assert [r["config"] for r in summary["rows"]] == list(CONFIGS)
    assert len(summary["runs"]) == 2 * len(CONFIGS) and {r["seed"] for r in summary["runs"]} == {0, 1}
    for row in summary["rows"]:
        assert row["seeds"] == 2 and row["delta_log_z"] is not None or row["diverged"]
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
