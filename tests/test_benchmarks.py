"""The shipped benchmarks beyond 2-D (issue 11), through the command line: each preset's whole
`rtbcli reproduce --quick` pipeline on a tiny budget from its shipped prior, and their bad input."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.datasets import digits as dd
from rtbcli.presets_loader import load_preset, shipped_presets
from rtbcli.reproduce import shipped_prior
from test_cli import assert_one_line_error, error_line

pytestmark = pytest.mark.usefixtures("one_thread")

SUITE_KEYS = {
    "digits": (
        "class_fraction",
        "class_fraction_target",
        "diversity",
        "diversity_target",
        "nearest_train_distance",
        "sw2",
        "mmd2",
        "log_z_is",
        "ess_fraction",
    ),
    "manywell32": ("well_mass_mean_abs_err", "well_mass_max_abs_err", "sw2", "mmd2", "log_z_is", "elbo", "eubo"),
}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["digits", "manywell32"])
def test_reproduce_quick_pipeline_from_the_shipped_prior(tmp_path, capsys, monkeypatch, name):
    if name == "digits":
        pytest.importorskip("sklearn")
    preset, _ = load_preset(name)
    out = tmp_path / "rep"
    code = run(
        ["reproduce", "--preset", name, "--quick", "--steps", "2", "--batch-size", "8", "-n", "300", "--out", str(out), "--quiet", "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["preset"] == name and summary["quick"] and summary["prior_source"] == "shipped"
    assert sha(out / "prior.safetensors") == sha(shipped_prior(preset.reproduce.shipped_prior))
    assert list(dict.fromkeys(r["algo"] for r in summary["rows"])) == list(preset.reproduce.methods)
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    for row in summary["rows"]:
        ck = load_checkpoint(row["checkpoint"])
        assert ck.step == 2 and ck.preset.dim == preset.dim and ck.algo == row["algo"]
        for key in SUITE_KEYS[name]:
            if (
                key in ("class_fraction_target", "diversity_target")
                or row["algo"] != "legacy-rl"
                or key not in ("log_z_is", "ess_fraction")
            ):
                assert row.get(key) is not None, (row["method"], key)
    prior = summary["prior_row"]
    # a few samples far out (the digits prior draws 1-3% with a pixel beyond +-3 on the [-1, 1] scale), not all of them
    assert all(0 <= r["n_far"] <= 0.05 * 300 for r in [prior, *summary["rows"]])
    if name == "manywell32":
        assert prior["log_z_true"] == pytest.approx(0.0, abs=1e-6)  # the tilted target's exact log Z at beta = 1
        assert summary["floor"]["well_mass_mean_abs_err"] < 0.05
    else:
        assert summary["floor"]["class_fraction"] >= 0.9  # the held-out real images of the class
        # evaluate --plot: the samples, the real images of the class and the frozen prior, as image grids
        drawn = []
        monkeypatch.setattr(
            "rtbcli.datasets.digits_plots.plot_digit_grids",
            lambda path, panels, title=None, n=64: drawn.append([(t, x.shape) for t, x in panels]),
        )
        assert run(["evaluate", str(out / "rtb.safetensors"), "-n", "100", "--plot", str(tmp_path / "ev.png"), "--json"]) == 0
        capsys.readouterr()
        ((samples, real, prior_grid),) = drawn
        assert samples[1] == (100, 64) and real[0] == "reference" and prior_grid == ("its prior (no fine-tuning)", (64, 64))


def test_reproduce_unknown_preset_is_bad_input(tmp_path, capsys):
    code, err = error_line(capsys, "reproduce", "--preset", "nope", "--quick", "--out", tmp_path / "o")
    assert_one_line_error(code, err, f"unknown preset 'nope': choose one of {', '.join(sorted(shipped_presets()))}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("digit", ["12", "-1", "3.5", "three"])
def test_digit_outside_0_to_9_is_bad_input(tmp_path, capsys, digit):
    pytest.importorskip("sklearn")
    prior = shipped_prior("prior-digits.safetensors")
    out = tmp_path / "ft.safetensors"
    code, err = error_line(capsys, "finetune", "--prior", prior, "--reward-arg", f"digit={digit}", "--steps", "1", "--out", out)
    assert_one_line_error(code, err, "digit")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    code, err = error_line(capsys, "evaluate", prior, "--reward", "rtbcli.rewards.digits:log_p_class", "--reward-arg", f"digit={digit}")
    assert_one_line_error(code, err, "digit")


def test_digits_without_scikit_learn_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    dd._load.cache_clear()
    try:
        code, err = error_line(capsys, "reproduce", "--preset", "digits", "--quick", "--steps", "1", "--out", tmp_path / "o")
    finally:
        dd._load.cache_clear()
    assert_one_line_error(code, err, 'the digits benchmark needs scikit-learn: pip install "rtbcli[digits]"')
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["reference", "digits", "manywell32"])
def test_shipped_priors_carry_their_preset(name):
    """Each shipped prior was made by `rtbcli pretrain` under its preset, to the recorded number of steps, fits the
    preset (data and sampler), and hands on the preset's current fine-tuning settings to a `finetune --prior` without
    --preset (`python scripts/refresh_prior_config.py NAME` brings them up to date after a preset changes)."""
    from rtbcli.finetune import check_compatible

    preset, _ = load_preset(name)
    ck = load_checkpoint(shipped_prior(preset.reproduce.shipped_prior))
    run_meta = json.loads(ck.meta["run"])
    assert ck.kind == "prior" and ck.meta["preset"] == name and run_meta["command"] == "pretrain"
    assert ck.step == run_meta.get("steps", ck.step) == ck.preset.pretrain.steps and ck.meta["seed"] == "0"  # (older runs: no "steps")
    check_compatible(ck, preset)
    for section in ("finetune", "evaluate", "reproduce"):
        assert getattr(ck.preset, section) == getattr(preset, section), section
    assert (ck.preset.beta, ck.preset.reward) == (preset.beta, preset.reward)


def test_summary_table_markdown_reads_the_registry():
    """benchmarks/summary_table.py prints the columns and formats `rtbcli reproduce` prints: the registry's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "summary_table.py"
    spec = importlib.util.spec_from_file_location("summary_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = {
        "mode_coverage": 9,
        "n_target_modes": 9,
        "kl_mode": 0.01234,
        "off_target": 0.0712,
        "kl_hist": 0.0751,
        "sw2": 0.5,
        "log_z_learned": 0.0213,
        "log_z_is": 0.0187,
        "elbo": -0.1,
        "eubo": 0.2,
    }
    summary = {
        "prior_row": {"method": "prior (no fine-tuning)", **row},
        "rows": [{"method": "rtb", **row, "train_seconds": 61.4}, {"method": "legacy-rl", "diverged": "non-finite loss"}],
        "floor": {"method": "exact sampler (floor)", "kl_mode": 0.0006},
    }
    lines = mod.markdown(summary).splitlines()
    assert lines[0] == "| method | modes | mode KL | off-target | hist KL | log Z | log Z (IS) | ELBO | train s |"  # sw2, eubo: json only
    assert lines[3] == "| rtb | 9/9 | 0.0123 | 7.1% | 0.075 | 0.021 | 0.019 | -0.100 | 61 |"
    assert lines[4] == "| legacy-rl | diverged | - | - | - | - | - | - | - |"
    assert lines[5].startswith("| exact sampler (floor) | - | 0.0006 | - |")
    every = mod.markdown(summary, every=True).splitlines()
    assert every[0] == ("| method | modes | mode KL | off-target | hist KL | sliced W2 | log Z | log Z (IS) | ELBO | EUBO | train s |")
    assert every[3] == "| rtb | 9/9 | 0.0123 | 7.1% | 0.075 | 0.500 | 0.021 | 0.019 | -0.100 | 0.200 | 61 |"


def test_summary_table_of_separate_evaluations(tiny_prior, tmp_path, capsys, one_thread):
    """`summary_table.py --evals LABEL=FILE ...`: `rtbcli evaluate --json` reports of separate runs as reproduce's table,
    each row under its label with the training seconds of its log, the floor row from the first report."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "summary_table.py"
    spec = importlib.util.spec_from_file_location("summary_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ft = tmp_path / "ft.safetensors"
    assert run(["finetune", "--prior", str(tiny_prior), "--steps", "2", "--batch-size", "8", "--out", str(ft), "-q"]) == 0
    reports = {}
    for name, ck in (("prior", tiny_prior), ("rtb", ft)):
        capsys.readouterr()
        assert run(["evaluate", str(ck), "-n", "300", "--json", *(["--beta", "1"] if name == "prior" else [])]) == 0
        out = capsys.readouterr().out
        (tmp_path / f"{name}.json").write_text(out)
        reports[name] = json.loads(out)
    summary = mod.from_evaluations([f"the prior={tmp_path / 'prior.json'}", f"rtb={tmp_path / 'rtb.json'}"])
    assert [summary["prior_row"]["method"], summary["rows"][0]["method"]] == ["the prior", "rtb"]
    prior_log = tiny_prior.with_suffix(".jsonl")
    assert summary["prior_row"]["train_seconds"] == (
        json.loads(prior_log.read_text().splitlines()[-1])["seconds"] if prior_log.exists() else None
    )
    assert summary["rows"][0]["train_seconds"] == json.loads(ft.with_suffix(".jsonl").read_text().splitlines()[-1])["seconds"] > 0
    assert summary["rows"][0]["kl_mode"] == reports["rtb"]["kl_mode"] != reports["prior"]["kl_mode"]
    assert summary["floor"]["kl_mode"] == reports["prior"]["floor"]["kl_mode"]
    other = dict(reports["prior"], target="another target")
    (tmp_path / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.from_evaluations([f"a={tmp_path / 'rtb.json'}", f"b={tmp_path / 'other.json'}"])
    assert e.value.code == 2 and "scores another target (another target) than the first report" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as e:
            mod.from_evaluations([f"a={bad}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--evals: cannot read" in err and "as an `rtbcli evaluate --json` report" in err
    for bad_args in (["--help2"], [str(tmp_path / "missing.json")], [str(tmp_path / "bad.json")], [str(tmp_path / "rtb.json")]):
        with pytest.raises(SystemExit) as e:
            mod.main(bad_args)  # an unknown option, an unreadable file, an evaluate report given as a summary
        assert e.value.code == 2
    lines = mod.markdown(summary).splitlines()
    assert lines[0].startswith("| method | modes | mode KL |") and lines[0].endswith("| train s |")
    assert lines[2].startswith("| the prior |") and lines[3].startswith("| rtb |") and lines[4].startswith("| exact sampler (floor) |")


def test_reproduce_of_an_energy_preset_refuses_a_prior_it_would_not_use(tmp_path, capsys):
    """Energy presets train from the Brownian prior (tests/test_reproduce_energy.py runs them): --prior is bad input."""
    code, err = error_line(capsys, "reproduce", "--preset", "gmm25-energy", "--quick", "--prior", tmp_path / "p", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "preset 'gmm25-energy' samples a target from the Brownian prior: drop --prior")
    assert not (tmp_path / "o").exists()


def test_seeds_is_for_energy_presets(tmp_path, capsys):
    code, err = error_line(capsys, "reproduce", "--preset", "digits", "--quick", "--seeds", "2", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--seeds runs several seeds of an energy preset")


def test_profile_steps_groups_a_step_s_kernels(one_thread):
    """benchmarks/profile_steps.py: per loop the median step, the profiled kernel time and its split into GEMMs, GELU
    and the rest (the split adds up), and the top kernels; a bad --threads is one line and exit 2."""
    from test_bench_peer import run_script

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_steps.py"
    p = run_script(script, ["--threads", "1", "--steps", "1", "--warmup", "0", "--json"])
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    for loop in ("finetune", "pretrain"):
        r = rep[loop]
        assert r["wall_ms"] > 0 and set(r["groups_ms"]) == {"gemm", "gelu", "other"}
        assert sum(r["groups_ms"].values()) == pytest.approx(r["profiled_ms"])
        assert r["groups_ms"]["gemm"] > 0 and r["groups_ms"]["gelu"] > 0
        assert any(row["kernel"] == "aten::gelu_backward" for row in r["top"])  # the hand-written backward's GELU derivative
    p = run_script(script, ["--threads", "0"])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--threads" in p.stderr
