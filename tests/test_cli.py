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


def test_a_training_run_s_out_is_checked_before_it_runs(tmp_path, tiny_prior, tiny_preset_file, capsys):
    """--out of pretrain/finetune: a .safetensors name (else the log, X.jsonl, went over the checkpoint: `--out x.jsonl`
    exited 0 with no checkpoint), never a file other than an rtbcli checkpoint (a data or reward file was replaced),
    never the checkpoint a resumed run starts from, never a FIFO or device; each refused with exit 2, nothing touched."""
    import hashlib
    import os

    rows = tmp_path / "rows.safetensors"  # a data file of the safetensors kind
    from safetensors.numpy import save_file

    save_file({"x": np.random.default_rng(0).normal(size=(64, 2))}, str(rows))
    reward = tmp_path / "rw.py"
    reward.write_text("def ok(x):\n    return -x.pow(2).sum(-1)\n")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    prior = tmp_path / "p.safetensors"
    assert invoke("pretrain", "--preset", tiny_preset_file, "--steps", 2, "--out", prior, "--quiet")[0] == 0
    before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in (rows, reward, prior)}
    tiny = ["--steps", 2, "--batch-size", 8, "--quiet"]
    cases = [
        (["finetune", "--prior", tiny_prior, *tiny, "--out", tmp_path / "x.jsonl"], "must be a .safetensors file name"),
        (["pretrain", "--preset", tiny_preset_file, *tiny, "--out", tmp_path / "x.jsonl"], "must be a .safetensors file name"),
        (["finetune", "--prior", tiny_prior, *tiny, "--reward", f"{reward}:ok", "--out", reward], "must be a .safetensors file name"),
        (["pretrain", "--data", rows, *tiny, "--out", rows], "exists and is not an rtbcli checkpoint"),
        (["pretrain", "--resume", prior, "--steps", 4, "--out", prior], "--out is the prior checkpoint it starts from"),
        (["pretrain", "--preset", tiny_preset_file, *tiny, "--out", fifo], "exists and is not a regular file"),
    ]
    for argv, match in cases:
        code, err = error_line(capsys, *argv)
        assert_one_line_error(code, err, match)
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in before} == before
    assert not (tmp_path / "x.jsonl").exists() and fifo.is_fifo()
    # an earlier run's checkpoint is still replaced, as before
    assert invoke("pretrain", "--preset", tiny_preset_file, "--steps", 3, "--out", prior, "--quiet")[0] == 0


def test_bad_seeds_and_beta_and_damaged_metadata_are_bad_input(tmp_path, tiny_prior, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    for argv in (["evaluate", tiny_prior, "--n", 10], ["sample", tiny_prior, "--n", 5], ["pretrain", "--steps", 1]):
        code, err = error_line(capsys, *argv, "--seed", 2**64 - 1)  # a seed torch's generators cannot take
        assert_one_line_error(code, err, "--seed")
    for beta in ("nan", "inf", "-1"):
        code, err = error_line(capsys, "evaluate", tiny_prior, "--n", 10, "--beta", beta)
        assert_one_line_error(code, err, "a finite beta > 0")
    ft = tmp_path / "ft.safetensors"
    assert invoke("finetune", "--prior", tiny_prior, "--algo", "trust-pcl", "--steps", 1, "--batch-size", 4, "--out", ft, "-q")[0] == 0
    with safe_open(str(ft), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    for key in ("step", "alpha"):
        damaged = tmp_path / f"damaged-{key}.safetensors"
        save_file(tensors, str(damaged), {**meta, key: "abc"})
        code, err = error_line(capsys, "evaluate", damaged, "--n", 10)
        assert_one_line_error(code, err, f"its '{key}' is not a")


def test_code_of_yours_calling_sys_exit_fails_the_run(tmp_path, tiny_prior, capsys):
    """A reward that calls sys.exit() ended finetune with exit 0, no checkpoint and no message: now it is the reward's
    failure (up front: bad input, exit 2; during the run: exit 1)."""
    reward = tmp_path / "rw.py"
    reward.write_text(
        "import sys\ncalls = [0]\n"
        "def at_once(x):\n    sys.exit(0)\n"
        "def later(x):\n    calls[0] += 1\n    if calls[0] > 2:\n        sys.exit(0)\n    return -x.pow(2).sum(-1)\n"
    )
    out = tmp_path / "f.safetensors"
    base = ["finetune", "--prior", tiny_prior, "--steps", 4, "--batch-size", 8, "--out", out, "--quiet"]
    code, err = error_line(capsys, *base, "--reward", f"{reward}:at_once")
    assert_one_line_error(code, err, "raised SystemExit")
    code, err = error_line(capsys, *base, "--reward", f"{reward}:later")
    assert code == 1 and "raised SystemExit" in err and not out.exists(), err


def test_no_command_prints_the_help_and_a_folder_is_no_preset(tmp_path, capsys):
    assert run([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: rtbcli") and "rtbcli: error" not in err and "finetune" in err
    (tmp_path / "dir.toml").mkdir()
    code, err = error_line(capsys, "presets", "show", tmp_path / "dir.toml")
    assert_one_line_error(code, err, "is a directory")


def test_outputs_never_replace_an_input_or_a_non_checkpoint(tmp_path, tiny_prior, capsys):
    """`sample --out` and `evaluate --plot` named (any name) as the checkpoint read replaced it (exit 0);
    `convert-params --out` replaced any existing file. Each is now exit 2, nothing touched."""
    import shutil

    ft = tmp_path / "ft.safetensors"
    assert invoke("finetune", "--prior", tiny_prior, "--steps", 1, "--batch-size", 4, "--out", ft, "--quiet")[0] == 0
    as_npy, as_png, notes = tmp_path / "ck.npy", tmp_path / "ck.png", tmp_path / "notes.txt"
    shutil.copy(ft, as_npy)
    shutil.copy(ft, as_png)
    notes.write_text("important")
    cases = [
        (["sample", as_npy, "--n", 5, "--out", as_npy], "is the checkpoint itself"),
        (["evaluate", as_png, "--n", 50, "--plot", as_png], "is the checkpoint itself"),
        (["convert-params", ft, "--to", "trust-pcl", "--out", notes], "must be a .safetensors file name"),
    ]
    for argv, match in cases:
        code, err = error_line(capsys, *argv)
        assert_one_line_error(code, err, match)
    assert as_npy.read_bytes() == ft.read_bytes() == as_png.read_bytes() and notes.read_text() == "important"


def test_csv_samples_are_the_npy_samples_exactly(tmp_path, tiny_prior):
    """float32 written with 7 significant digits did not read back (47 of 100 values differed): 9 digits do."""
    assert invoke("sample", tiny_prior, "--n", 200, "--out", tmp_path / "s.csv")[0] == 0
    assert invoke("sample", tiny_prior, "--n", 200, "--out", tmp_path / "s.npy")[0] == 0
    csv = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1, dtype=np.float32)
    assert np.array_equal(csv, np.load(tmp_path / "s.npy"))


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
