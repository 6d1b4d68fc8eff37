"""The command line: smoke runs with tiny budgets, --help everywhere, one-line errors with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import strip_ansi
from rtbcli.cli import app, run

runner = CliRunner()
ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}


def command_paths() -> list[list[str]]:
    """Every command and subcommand of the app, walked from click's groups ([] is `rtbcli` itself)."""

    def walk(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, path + [name])

    return list(walk(typer.main.get_command(app), []))


COMMANDS = command_paths()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args], env=ENV)
    return r.exit_code, strip_ansi(r.stdout)


def test_the_walk_finds_every_command():
    names = {" ".join(p) for p in COMMANDS}
    assert {
        "",
        "pretrain",
        "finetune",
        "sample",
        "evaluate",
        "convert-params",
        "reproduce",
        "presets",
        "presets show",
        "presets init",
    } <= names


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda p: " ".join(p) or "rtbcli")
def test_every_help_page_shows_an_example(cmd):
    """Each command's --help ends with an Examples block whose lines run that command (unwrapped)."""
    code, out = invoke(*cmd, "--help")
    assert code == 0 and "Usage" in out
    lines = out.splitlines()
    assert "  Examples:" in lines, f"`rtbcli {' '.join(cmd)} --help` shows no example"
    block = lines[lines.index("  Examples:") + 1 :]
    block = [line.strip() for line in block[: next((i for i, line in enumerate(block) if not line.startswith("    ")), len(block))]]
    prefix = " ".join(["rtbcli", *cmd]) + " " if cmd else "rtbcli "
    assert block and all(line.startswith("rtbcli ") for line in block), block
    assert any((line + " ").startswith(prefix) for line in block), (prefix, block)


def test_top_level_help_lists_every_exit_code():
    code, out = invoke("--help")
    text = " ".join(out.split())
    assert code == 0 and "Exit codes: 0 success; 1 a run failed" in text
    assert all(f"{c} " in text for c in ("2", "3", "130", "143"))


def test_version():
    code, out = invoke("--version")
    assert code == 0 and out.startswith("rtbcli ")


def error_line(capsys, *argv) -> tuple[int, str]:
    code = run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, match, exit_code=2):
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtbcli: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def test_pretrain_sample_evaluate_smoke(tmp_path, tiny_preset_file, capsys):
    prior = tmp_path / "prior.safetensors"
    code, out = invoke("pretrain", "--preset", tiny_preset_file, "--steps", 3, "--batch-size", 16, "--out", prior, "--quiet")
    assert code == 0, out
    assert "pretrain" in out and prior.exists() and (tmp_path / "prior.jsonl").exists()

    code, out = invoke("sample", prior, "--n", 50, "--out", tmp_path / "s.npy", "--json")
    assert code == 0, out
    assert json.loads(out)["n"] == 50
    x = np.load(tmp_path / "s.npy", allow_pickle=False)
    assert x.shape == (50, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    code, out = invoke("sample", prior, "--n", 7, "--out", tmp_path / "s.csv")
    assert code == 0
    csv = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    assert csv.shape == (7, 2) and (tmp_path / "s.csv").read_text().startswith("x0,x1")
    # the same seed gives the same samples
    invoke("sample", prior, "--n", 50, "--out", tmp_path / "t.npy")
    assert np.array_equal(np.load(tmp_path / "t.npy"), x)

    code, out = invoke("evaluate", prior, "--n", 300, "--json", "--plot", tmp_path / "e.png")
    assert code == 0, out
    m = json.loads(out)
    for key in (
        "mode_coverage",
        "n_target_modes",
        "kl_mode",
        "kl_hist",
        "off_target",
        "floor",
        "log_z_is",
        "cells",
        "log_z_true",
        "elbo",
        "eubo",
        "ess_fraction",
        "n",
        "checkpoint",
        "kind",
        "algo",
        "sw2",
        "sw2_floor",
        "mmd2",
        "mmd2_floor",
    ):
        assert key in m, key
    assert "log_z_learned" not in m and "elbo_prior" not in m  # a prior learns no log Z and has no prior of its own
    assert m["n"] == 300 and m["kind"] == "prior" and m["n_target_modes"] == 25 and m["log_z_true"] == 0.0
    assert len(m["cells"]["modes"]) == 25 and set(m["cells"]["elsewhere"]) == {"target_mass", "frequency"}
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    code, out = invoke("evaluate", prior, "--n", 300)
    assert code == 0 and "mode-weight KL" in out and "floor" in out and "sliced W2" in out


@pytest.mark.parametrize("algo", ["rtb", "trust-pcl", "reinforce-kl", "legacy-rl"])
def test_finetune_smoke(tmp_path, tiny_prior, algo):
    out = tmp_path / "ft.safetensors"
    code, text = invoke(
        "finetune", "--prior", tiny_prior, "--algo", algo, "--steps", 3, "--batch-size", 16, "--out", out, "--quiet", "--json"
    )
    assert code == 0, text
    res = json.loads(text)
    assert res["algo"] == algo and res["steps"] == 3 and out.exists()
    code, text = invoke("evaluate", out, "--n", 200, "--json")
    m = json.loads(text)
    assert code == 0 and m["kind"] == "finetuned" and m["algo"] == algo and m["n_target_modes"] == 9
    assert ("log_z_learned" in m) == (algo in ("rtb", "trust-pcl"))


def test_alpha_is_one_over_beta(tmp_path, tiny_prior):
    out = tmp_path / "ft.safetensors"
    code, text = invoke("finetune", "--prior", tiny_prior, "--alpha", 2, "--steps", 2, "--batch-size", 8, "--out", out, "--quiet", "--json")
    assert code == 0 and json.loads(text)["beta"] == 0.5


def test_bad_input_is_one_line_exit_2(tmp_path, tiny_prior, tiny_preset_file, capsys):
    bad_preset = tmp_path / "bad.toml"
    bad_preset.write_text("colour = 'red'\n" + tiny_preset_file.read_text())
    not_ck = tmp_path / "notes.safetensors"
    not_ck.write_text("hello")
    cases = [
        (["pretrain", "--preset", "nope"], "unknown preset 'nope'"),
        (["pretrain", "--preset", bad_preset], "unknown key 'colour'"),
        (["pretrain", "--steps", 0], "--steps should be greater than 0"),
        (["pretrain", "--batch-size", -5], "--batch-size should be greater than 0"),
        (["pretrain", "--steps", "abc"], "'--steps'"),
        (["pretrain", "--device", "tpu"], "unknown device 'tpu'"),
        (["pretrain", "--out", tmp_path / "no" / "such" / "dir.safetensors"], "does not exist"),
        (["sample", tmp_path / "missing.safetensors"], "not found"),
        (["sample", not_ck], "not a readable safetensors file"),
        (["sample", tiny_prior, "--n", 0], "--n must be a positive"),
        (["sample", tiny_prior, "--out", tmp_path / "x.txt"], "must end in .npy or .csv"),
        (["evaluate", tmp_path / "missing.safetensors"], "not found"),
        (["evaluate", tiny_prior, "--n", -1], "--n must be a positive"),
        (["evaluate", tiny_prior, "--plot", tmp_path / "nodir" / "p.png"], "does not exist"),
        (["finetune", "--prior", tmp_path / "missing.safetensors"], "not found"),
        (["finetune", "--prior", not_ck], "not a readable safetensors file"),
        (["finetune", "--prior", tiny_prior, "--beta", 0], "--beta must be a positive finite number"),
        (["finetune", "--prior", tiny_prior, "--beta", "nan"], "--beta must be a positive finite number"),
        (["finetune", "--prior", tiny_prior, "--alpha", "inf"], "--alpha must be a positive finite number"),
        (["finetune", "--prior", tiny_prior, "--alpha", 2, "--beta", 1], "disagree"),
        (["finetune", "--prior", tiny_prior, "--algo", "ppo"], "'--algo'"),
        (["finetune", "--prior", tiny_prior, "--algo", "legacy-rl", "--beta", 0.5], "legacy-rl ignores beta"),
        (["finetune", "--prior", tiny_prior, "--preset", "reference"], "sampler settings differ"),
        (["finetune", "--prior", tiny_prior, "--out", tiny_prior], "--out is the prior checkpoint it starts from"),
        (["pretrain", "--bogus"], "No such option: --bogus"),
    ]
    for argv, match in cases:
        code, err = error_line(capsys, *argv)
        assert_one_line_error(code, err, match)


def test_device_cuda_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, err = error_line(capsys, "pretrain", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")


def test_finetuned_checkpoint_is_not_a_prior(tmp_path, tiny_prior, capsys):
    ft = tmp_path / "ft.safetensors"
    assert invoke("finetune", "--prior", tiny_prior, "--steps", 1, "--batch-size", 4, "--out", ft, "--quiet")[0] == 0
    code, err = error_line(capsys, "finetune", "--prior", ft)
    assert_one_line_error(code, err, "is a finetuned checkpoint, a prior one is needed")


def test_failed_runs_overwrite_nothing(tmp_path, tiny_prior, capsys):
    out = tmp_path / "prior.safetensors"
    out.write_bytes(b"precious")
    log = tmp_path / "prior.jsonl"
    log.write_text("old log")
    code, err = error_line(capsys, "pretrain", "--steps", 0, "--out", out)
    assert code == 2 and out.read_bytes() == b"precious" and log.read_text() == "old log"
    code, err = error_line(capsys, "finetune", "--prior", tiny_prior, "--beta", -1, "--out", out)
    assert code == 2 and out.read_bytes() == b"precious"
    code, err = error_line(capsys, "sample", tiny_prior, "--n", -3, "--out", out)
    assert code == 2 and out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.jsonl", "prior.safetensors"]


def test_presets_command():
    code, out = invoke("presets", "--json")
    assert code == 0 and any(p["name"] == "reference" for p in json.loads(out))
    code, out = invoke("presets", "show", "reference", "--json")
    assert code == 0 and json.loads(out)["beta"] == 1.0


def test_reproduce_end_to_end(tmp_path, tiny_prior, tiny_preset_file):
    out = tmp_path / "rep"
    code, text = invoke(
        "reproduce",
        "--preset",
        tiny_preset_file,
        "--prior",
        tiny_prior,
        "--steps",
        3,
        "--batch-size",
        16,
        "--n",
        200,
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, text
    assert "reproduce" in text and "exact sampler (floor)" in text
    names = {p.name for p in out.iterdir()}
    methods = ["rtb", "trust-pcl", "reinforce-kl", "reinforce-kl-on-policy", "legacy-rl"]
    for m in methods:
        assert {f"{m}.safetensors", f"{m}.jsonl"} <= names and m in text
    assert {"prior.safetensors", "figure.png", "summary.json"} <= names
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == methods and summary["eval_n"] == 200
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.evaluate import evaluate

    for row in summary["rows"]:
        ck = load_checkpoint(row["checkpoint"])
        assert ck.algo == row["algo"] and json.loads(ck.meta["run"])["on_policy"] == row["on_policy"] and ck.step == 3
        m = evaluate(ck, 200, summary["seed"]).metrics  # each row is its checkpoint's evaluation at the summary's n and seed
        assert (row["kl_mode"], row["off_target"], row["mode_coverage"]) == (m["kl_mode"], m["off_target"], m["mode_coverage"])
        assert row["n_target_modes"] == 9
        assert (row["log_z_learned"] is None) == (row["algo"] not in ("rtb", "trust-pcl"))
    assert summary["floor"]["mode_coverage"] == 9
    # --json prints the same summary; a second run into the same folder needs --overwrite
    code, text = invoke(
        "reproduce",
        "--preset",
        tiny_preset_file,
        "--prior",
        tiny_prior,
        "--steps",
        2,
        "--batch-size",
        8,
        "--n",
        100,
        "--out",
        out,
        "--quiet",
        "--json",
        "--overwrite",
    )
    assert code == 0 and json.loads(text)["rows"][0]["method"] == "rtb"


def test_reproduce_reports_a_diverged_method_and_goes_on(tmp_path, tiny_prior, tiny_preset_file, monkeypatch):
    """A method whose loss turns NaN is a row marked diverged (with the reason in summary.json); the others are scored."""
    from rtbcli import objectives

    real = objectives.legacy_rl_loss
    monkeypatch.setattr(objectives, "legacy_rl_loss", lambda *a, **kw: real(*a, **kw) * float("nan"))
    out = tmp_path / "rep"
    code, text = invoke(
        "reproduce",
        "--preset",
        tiny_preset_file,
        "--prior",
        tiny_prior,
        "--steps",
        3,
        "--batch-size",
        8,
        "--n",
        100,
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, text
    legacy_line = next(line for line in text.splitlines() if "legacy-rl" in line)
    assert "diverged" in legacy_line
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert "non-finite" in rows["legacy-rl"]["diverged"] and rows["legacy-rl"]["checkpoint"] is None
    assert all(r.get("diverged") is None and r["kl_mode"] is not None for m, r in rows.items() if m != "legacy-rl")


def test_reproduce_bad_input(tmp_path, tiny_prior, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = error_line(capsys, "reproduce", "--out", out, "--quick")
    assert_one_line_error(code, err, "already holds files")
    code, err = error_line(capsys, "reproduce", "--prior", tiny_prior, "--out", tmp_path / "new")
    assert_one_line_error(code, err, "sampler settings differ")
    assert not (tmp_path / "new").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = error_line(capsys, "reproduce", "--out", blocker / "sub", "--quick")
    assert_one_line_error(code, err, "cannot be created")
    code, err = error_line(capsys, "reproduce", "--steps", 0)
    assert_one_line_error(code, err, "--steps must be positive")
    assert (out / "keep.txt").read_text() == "precious" and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_finetune_warm_start_and_resume_cli(tmp_path, tiny_prior, capsys):
    from rtbcli.checkpoint import load_checkpoint

    first, second, third = (tmp_path / f"{k}.safetensors" for k in "abc")
    assert invoke("finetune", "--prior", tiny_prior, "--steps", 2, "--batch-size", 8, "--out", first, "--quiet")[0] == 0
    assert (tmp_path / "a.state.safetensors").exists() and not (tmp_path / "a.partial.safetensors").exists()
    # --warm-start: a new run (here under the other objective) from a finetuned checkpoint
    code, text = invoke(
        "finetune", "--warm-start", first, "--algo", "trust-pcl", "--steps", 2, "--batch-size", 8, "--out", second, "--quiet", "--json"
    )
    assert code == 0, text
    assert load_checkpoint(second).step == 4 and load_checkpoint(second).algo == "trust-pcl"
    # --resume of a finished run: the same run continued to a new total, into a new file
    code, text = invoke("finetune", "--resume", first, "--steps", 3, "--out", third, "--quiet", "--json")
    assert code == 0, text
    assert json.loads(text)["resumed_at"] == 2 and load_checkpoint(third).step == 3 and load_checkpoint(third).algo == "rtb"
    cases = [
        (["finetune"], "exactly one of --prior"),
        (["finetune", "--prior", tiny_prior, "--resume", first], "exactly one of --prior"),
        (["finetune", "--resume", tiny_prior], "is a prior checkpoint, a finetuned one is needed"),
        (["finetune", "--resume", first, "--steps", 3], "is a finished run: give --out"),
        (
            ["finetune", "--resume", first, "--algo", "trust-pcl", "--steps", 3, "--out", tmp_path / "x.safetensors"],
            "resume it with --algo rtb",
        ),
        (["finetune", "--resume", first, "--steps", 2, "--out", tmp_path / "x.safetensors"], "give a larger total"),
        (
            ["finetune", "--resume", first, "--steps", 3, "--on-policy", "--out", tmp_path / "x.safetensors"],
            "--on-policy cannot change when resuming",
        ),
        (
            ["finetune", "--resume", first, "--steps", 3, "--lr", 0.5, "--out", tmp_path / "x.safetensors"],
            "the preset given differs (finetune.lr 0.001 vs 0.5)",
        ),
        (["finetune", "--resume", second, "--steps", 5, "--out", tmp_path / "x.safetensors"], "no resumable state"),
        (["finetune", "--warm-start", first, "--out", first], "--out is the finetuned checkpoint it starts from"),
    ]
    (tmp_path / "b.state.safetensors").unlink()
    for argv, match in cases:
        code, err = error_line(capsys, *argv)
        assert_one_line_error(code, err, match)
    assert not (tmp_path / "x.safetensors").exists()


def test_pretrain_estimator_and_schedule_options(tmp_path, tiny_preset_file):
    from rtbcli.checkpoint import load_checkpoint

    out = tmp_path / "p.safetensors"
    code, text = invoke(
        "pretrain",
        "--preset",
        tiny_preset_file,
        "--steps",
        2,
        "--batch-size",
        8,
        "--estimator",
        "trajectory",
        "--lr-schedule",
        "constant",
        "--lr",
        1e-3,
        "--out",
        out,
        "--quiet",
        "--json",
    )
    assert code == 0, text
    cfg = load_checkpoint(out).preset.pretrain
    assert (cfg.estimator, cfg.lr_schedule, cfg.lr, cfg.steps) == ("trajectory", "constant", 1e-3, 2)


def test_progress_lines_when_not_a_terminal(tmp_path, tiny_preset_file):
    import subprocess
    import sys

    out = tmp_path / "p.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rtbcli",
            "pretrain",
            "--preset",
            str(tiny_preset_file),
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "100"},
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pretrain ")]
    assert lines and lines[-1].startswith("pretrain 20/20")
