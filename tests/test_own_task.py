"""Your own task: data files, Python rewards, any dimension, evaluation without a closed-form target (issue 10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from typer.testing import CliRunner

from conftest import strip_ansi
from rtbcli.cli import app, run
from rtbcli.data import load_array
from rtbcli.errors import InputError
from rtbcli.hashing import sha256_file
from rtbcli.presets_loader import load_preset
from rtbcli.tasks import Task

runner = CliRunner()
ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
TINY = ["--steps", "3", "--batch-size", "8", "--quiet"]


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args], env=ENV)
    return r.exit_code, strip_ansi(r.stdout), strip_ansi(r.stderr)


def one_line_error(capsys, *argv, code=2) -> str:
    rc = run([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtbcli: error: ") and "Traceback" not in err, err
    return lines[0]


def rows(n=300, d=2, seed=0):
    g = np.random.default_rng(seed)
    centres = np.array([[-2.0] * d, [2.0] * d])
    return (centres[g.integers(0, 2, n)] + 0.3 * g.standard_normal((n, d))).astype(np.float32)


REWARD = """import torch
LOADED = True
def log_reward(x, scale=1.0, centre=2.0):
    return -scale * (x - centre).pow(2).sum(-1)
"""


@pytest.fixture
def task_files(tmp_path):
    """A 2-D data file, a reward file, and a preset naming both by relative paths."""
    np.save(tmp_path / "data.npy", rows())
    (tmp_path / "rewards.py").write_text(REWARD)
    (tmp_path / "task.toml").write_text(
        'name = "mine"\n[prior_data]\npath = "data.npy"\n[reward]\ntype = "python"\nfunction = "rewards.py:log_reward"\n'
        "[reward.kwargs]\nscale = 0.5\n[sampler]\nsteps = 10\nhidden = 16\ntime_features = 8\n[evaluate]\nn = 200\n"
    )
    return tmp_path


# ----------------------------------------------------------------------------- data files
def test_every_data_format_reads_the_same_rows(tmp_path):
    x = rows(50, 3).astype(np.float64)
    np.save(tmp_path / "a.npy", x)
    np.savetxt(tmp_path / "b.csv", x, delimiter=",", header="u,v,w", comments="")
    np.savetxt(tmp_path / "c.csv", x, delimiter=",")
    save_file({"x": x}, str(tmp_path / "d.safetensors"))
    ref = load_array(tmp_path / "a.npy")[0]
    assert ref.shape == (50, 3) and ref.dtype == torch.float64
    for name in ("b.csv", "c.csv", "d.safetensors"):
        torch.testing.assert_close(load_array(tmp_path / name)[0], ref, rtol=1e-7, atol=1e-7)
    np.savetxt(tmp_path / "one.csv", x[:, :1], delimiter=",")
    assert load_array(tmp_path / "one.csv")[0].shape == (50, 1)  # a single column is 1-D data


def test_a_preset_s_paths_are_relative_to_it(task_files, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    p, _ = load_preset(str(task_files / "task.toml"))
    assert p.prior_data.path == str(task_files / "data.npy") and p.dim == 2
    assert p.prior_data.sha256 == sha256_file(task_files / "data.npy")
    assert p.reward.function == f"{task_files / 'rewards.py'}:log_reward" and p.reward.kwargs == {"scale": 0.5}
    x = torch.tensor([[2.0, 2.0], [0.0, 2.0]])
    torch.testing.assert_close(Task(p).log_reward(x), torch.tensor([0.0, -2.0]))  # -0.5 |x - 2|^2


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "not found"),
        ("dir", "is a directory"),
        (b"\x93NUMPY garbage", "cannot be read as .npy"),
        (np.zeros(5), "shape (5,)"),
        (np.zeros((0, 2)), "0 row(s)"),
        (np.zeros((1, 2)), "at least 2 rows"),
        (np.array([[0.0, 1.0], [np.nan, 1.0]]), "NaN or inf in 1 of 2 rows"),
        (np.array([["a", "b"], ["c", "d"]]), "holds <U1 values"),
    ],
)
def test_bad_data_files(tmp_path, capsys, content, match):
    path = tmp_path / "bad.npy"
    if isinstance(content, str) and content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(InputError, match=match.replace("(", r"\(").replace(")", r"\)")):
        load_array(path)
    out = tmp_path / "p.safetensors"
    assert match in one_line_error(capsys, "pretrain", "--data", path, "--out", out)
    assert not out.exists()


def test_bad_data_in_presets(tmp_path, capsys):
    np.save(tmp_path / "d3.npy", rows(20, 3))
    (tmp_path / "dim.toml").write_text('name = "x"\n[prior_data]\npath = "d3.npy"\ndim = 2\n')
    assert "has dimension 3 but preset" in one_line_error(capsys, "pretrain", "--preset", tmp_path / "dim.toml")
    (tmp_path / "both.toml").write_text('name = "x"\n[prior_data]\npath = "d3.npy"\nmeans = [[0.0, 0.0]]\nvariance = 1.0\n')
    assert "has both 'means' and 'path'" in one_line_error(capsys, "pretrain", "--preset", tmp_path / "both.toml")
    (tmp_path / "rmix.toml").write_text(
        'name = "x"\n[prior_data]\npath = "d3.npy"\n[reward]\ntype = "mixture"\n[reward.mixture]\nmeans = [[0.0, 0.0]]\nvariance = 1.0\n'
    )
    assert "reward.mixture has dimension 2, prior_data has 3" in one_line_error(capsys, "pretrain", "--preset", tmp_path / "rmix.toml")
    assert "is a data file, not a preset" in one_line_error(capsys, "pretrain", "--preset", tmp_path / "d3.npy")
    assert "must end in" in one_line_error(capsys, "pretrain", "--data", tmp_path / "dim.toml")


def test_data_far_from_the_sampler_scale_warns_with_a_fitting_sigma2(tmp_path):
    np.save(tmp_path / "far.npy", rows(100, 2) * 1000)
    code, out, err = invoke("pretrain", "--data", tmp_path / "far.npy", "--out", tmp_path / "p.safetensors", *TINY)
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if ln.startswith("rtbcli: warning:")]
    assert len(warning) == 1 and "sampler.sigma2 = 5" in warning[0] and "near sigma2 = " in warning[0]
    np.save(tmp_path / "near.npy", rows(100, 2) * 3)
    code, out, err = invoke("pretrain", "--data", tmp_path / "near.npy", "--out", tmp_path / "q.safetensors", *TINY)
    assert code == 0 and "warning" not in err


def test_pretrain_sigma2_sets_the_samplers_variance_and_names_a_bad_one(tmp_path, capsys):
    """`pretrain --data F --sigma2 S`: the run (its checkpoint's preset, and the scale warning) uses S; S <= 0 is refused."""
    from rtbcli.checkpoint import load_checkpoint

    np.save(tmp_path / "x.npy", rows(100, 2) * 0.05)  # mean square 0.01 per coordinate: 0.002 sigma2 = 5 (warned), 1 sigma2 = 0.01
    code, out, err = invoke("pretrain", "--data", tmp_path / "x.npy", "--sigma2", "0.01", "--out", tmp_path / "p.safetensors", *TINY)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "p.safetensors").preset.sampler.sigma2 == 0.01
    assert "warning" not in err  # the scale advice is about sigma2 = 0.01, which fits these data; 5 would not
    msg = one_line_error(capsys, "pretrain", "--data", tmp_path / "x.npy", "--sigma2", "0", "--out", tmp_path / "q.safetensors")
    assert "--sigma2" in msg and not (tmp_path / "q.safetensors").exists()


def test_pretraining_minibatches_are_rows_fixed_by_the_seed():
    from rtbcli.data import EmpiricalData

    data = EmpiricalData(torch.arange(10.0, dtype=torch.float64)[:, None].repeat(1, 2), "ten rows")
    a = data.sample(1000, torch.Generator().manual_seed(3))
    b = data.sample(1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and set(a[:, 0].tolist()) == set(range(10))  # with replacement: every row, some twice


# ----------------------------------------------------------------------------- Python rewards
def test_python_reward_from_a_module_with_kwargs(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from rtbcli.evaluate import with_reward

    p = with_reward(load_preset("reference")[0], "mypkg.rewards:log_reward", {"scale": 2.0, "centre": 0.0})
    assert p.reward.function == "mypkg.rewards:log_reward" and p.reward.kwargs == {"scale": 2.0, "centre": 0.0}
    torch.testing.assert_close(Task(p).log_reward(torch.tensor([[1.0, 1.0]])), torch.tensor([-4.0]))


@pytest.mark.parametrize(
    "source,spec,match",
    [
        (None, "missing.py:log_reward", "reward file"),
        ("raise RuntimeError('boom')\n", "r.py:log_reward", "failed to import (RuntimeError: boom)"),
        ("x = 1\n", "r.py:log_reward", "has no 'log_reward'"),
        ("log_reward = 3\n", "r.py:log_reward", "is a int, not a function"),
        ("def log_reward(x):\n    return x\n", "r.py:log_reward", "returned shape"),
        ("def log_reward(x):\n    return [0.0] * len(x)\n", "r.py:log_reward", "returned a list, not a torch tensor"),
        ("import torch\ndef log_reward(x):\n    return torch.log(x[:, 0] * 0)\n", "r.py:log_reward", "NaN or inf"),
        (None, "no_such_module_xyz:log_reward", "reward module 'no_such_module_xyz' not found"),
        (None, "r.py", "names no function"),
    ],
)
def test_bad_rewards_are_one_line_input_errors(tmp_path, capsys, tiny_prior, source, spec, match):
    if source is not None:
        (tmp_path / "r.py").write_text(source)
    out = tmp_path / "ft.safetensors"
    line = one_line_error(
        capsys, "finetune", "--prior", tiny_prior, "--reward", str(tmp_path / spec) if ".py" in spec else spec, "--out", out, *TINY
    )
    assert match in line
    assert not out.exists() and not (tmp_path / "ft.jsonl").exists()


def test_a_reward_that_fails_mid_run_stops_with_exit_1_and_keeps_the_last_good_state(tmp_path, capsys, tiny_prior):
    (tmp_path / "flaky.py").write_text(
        "import torch\nCALLS = [0]\ndef log_reward(x):\n    CALLS[0] += 1\n"
        "    if CALLS[0] > 5:\n        raise ValueError('sensor offline')\n    return -x.pow(2).sum(-1)\n"
    )
    out = tmp_path / "ft.safetensors"
    line = one_line_error(
        capsys,
        "finetune",
        "--prior",
        tiny_prior,
        "--reward",
        f"{tmp_path}/flaky.py:log_reward",
        "--out",
        out,
        "--steps",
        20,
        "--batch-size",
        8,
        "--quiet",
        code=1,
    )
    assert "raised ValueError: sensor offline" in line and "last good state" in line
    assert not out.exists() and (tmp_path / "ft.last-good.safetensors").exists()


# ----------------------------------------------------------------------------- checkpoints stay safe to open
def test_checkpoint_records_the_reward_and_never_imports_it_unasked(task_files, capsys):
    marker = task_files / "imported"
    (task_files / "rewards.py").write_text(REWARD + f"open({str(marker)!r}, 'a').write('x')\n")
    prior, ft = task_files / "prior.safetensors", task_files / "ft.safetensors"
    assert invoke("pretrain", "--preset", task_files / "task.toml", "--out", prior, *TINY)[0] == 0
    assert not marker.exists()  # pretraining never calls the reward
    code, out, err = invoke("finetune", "--prior", prior, "--preset", task_files / "task.toml", "--out", ft, *TINY)
    assert code == 0, err
    from rtbcli.checkpoint import load_checkpoint

    ck = load_checkpoint(ft)
    ref = f"{task_files / 'rewards.py'}:log_reward"
    assert ck.meta["reward"] == ref and ck.meta["reward_sha256"] == sha256_file(task_files / "rewards.py")
    assert ck.preset.reward.sha256 == ck.meta["reward_sha256"] and ck.preset.reward.kwargs == {"scale": 0.5}
    marker.unlink()
    # loading, sampling, converting: nothing imported
    assert invoke("sample", ft, "--n", 10, "--out", task_files / "s.npy")[0] == 0
    assert invoke("convert-params", ft, "--to", "trust-pcl", "--out", task_files / "t.safetensors")[0] == 0
    line = one_line_error(capsys, "evaluate", ft, "--n", 100)
    assert f"name it again with --reward {ref}" in line
    line = one_line_error(capsys, "finetune", "--warm-start", ft, "--out", task_files / "w.safetensors")
    assert f"--reward {ref}" in line
    line = one_line_error(capsys, "finetune", "--resume", ft, "--steps", 4, "--out", task_files / "r.safetensors")
    assert f"--reward {ref}" in line
    line = one_line_error(capsys, "evaluate", ft, "--n", 100, "--reward-arg", "scale=1")  # new kwargs do not name it
    assert f"name it again with --reward {ref}" in line
    assert not marker.exists()
    # a preset that names it is naming it again: resume under the same preset
    code, out, err = invoke(
        "finetune",
        "--resume",
        ft,
        "--preset",
        task_files / "task.toml",
        "--steps",
        4,
        "--batch-size",
        8,
        "--out",
        task_files / "r.safetensors",
        "--quiet",
    )
    assert code == 0 and marker.exists(), err
    marker.unlink()
    # named again: it is imported and used, with the recorded kwargs
    code, out, err = invoke("evaluate", ft, "--n", 100, "--reward", ref, "--json")
    assert code == 0, err
    m = json.loads(out)
    assert marker.exists() and "log_r_mean" in m and "sw2" in m and "reference" in m
    # a changed file is a warning, not an error
    (task_files / "rewards.py").write_text(REWARD + "# edited\n")
    code, out, err = invoke("evaluate", ft, "--n", 100, "--reward", ref, "--json")
    assert code == 0 and "rtbcli: warning:" in err and "has changed" in err


# ----------------------------------------------------------------------------- any dimension
@pytest.mark.parametrize("d", [1, 10])
def test_own_data_and_reward_end_to_end_in_d_dimensions(tmp_path, d):
    np.save(tmp_path / "x.npy", rows(400, d))
    (tmp_path / "r.py").write_text(REWARD)
    prior, ft = tmp_path / "prior.safetensors", tmp_path / "ft.safetensors"
    code, out, err = invoke("pretrain", "--data", tmp_path / "x.npy", "--out", prior, *TINY, "--json")
    assert code == 0, err
    code, out, err = invoke("evaluate", prior, "--n", 200, "--json", "--plot", tmp_path / "prior.png")
    assert code == 0, err
    m = json.loads(out)
    assert m["dim"] == d and m["target_method"] == "reference" and m["n_reference"] == 400 and "kl_mode" not in m
    assert (tmp_path / "prior.png").read_bytes()[:4] == b"\x89PNG"
    for algo in ("rtb", "reinforce-kl"):
        code, out, err = invoke(
            "finetune",
            "--prior",
            prior,
            "--reward",
            f"{tmp_path}/r.py:log_reward",
            "--reward-arg",
            "scale=0.1",
            "--algo",
            algo,
            "--out",
            ft,
            *TINY,
            "--json",
        )
        assert code == 0, err
    code, out, err = invoke(
        "evaluate",
        ft,
        "--n",
        200,
        "--reward",
        f"{tmp_path}/r.py:log_reward",
        "--json",
        "--plot",
        tmp_path / "ft.png",
        "--dims",
        "0,1" if d == 1 else "3,7",
    )
    assert code == 0, err
    m = json.loads(out)
    for key in (
        "log_r_mean",
        "log_r_q05",
        "log_r_q95",
        "log_z_is",
        "ess_fraction",
        "elbo_prior",
        "path_kl",
        "sw2",
        "sw2_floor",
        "mmd2",
        "mmd2_floor",
    ):
        assert key in m and m[key] is not None, key
    assert "accepted with probability r^beta" in m["reference"] and m["n_compared"] <= 200


# ----------------------------------------------------------------------------- smoke checks and templates
def test_require_checks_print_each_value_and_fail_with_their_own_code(tmp_path, tiny_prior, capsys):
    code, out, err = invoke("evaluate", tiny_prior, "--n", 200, "--require", "n_target_modes == 25", "--require", "ess_fraction > 0")
    assert code == 0, err
    assert "required checks" in out and "n_target_modes == 25" in out and "pass" in out
    code, out, err = invoke("evaluate", tiny_prior, "--n", 200, "--json", "--require", "kl_mode < 0", "--require", "floor.kl_mode >= 0")
    assert code == 3, err
    checks = json.loads(out)["checks"]
    assert [c["passed"] for c in checks] == [False, True] and checks[0]["value"] > 0
    assert "1 required check(s) failed: kl_mode < 0" in err
    code, out, err = invoke("evaluate", tiny_prior, "--n", 200, "--require", "log_z_learned < 1")  # not in a prior's report
    assert code == 3 and "got None" in err
    for bad, match in (("kl_mod < 1", "'kl_mod' is not a number in an evaluation report"), ("kl_mode << 1", "write KEY OP NUMBER")):
        assert match in one_line_error(capsys, "evaluate", tiny_prior, "--require", bad)


def test_presets_list_show_and_init(tmp_path, capsys):
    code, out, err = invoke("presets", "--json")
    assert code == 0 and {p["name"] for p in json.loads(out)} >= {"reference", "digits", "manywell32"}
    code, out, err = invoke("presets", "show", "reference")
    assert code == 0 and out.startswith("# The reference task")
    target = tmp_path / "ref.toml"
    code, out, err = invoke("presets", "init", target, "--from", "reference")
    assert code == 0, err
    text = target.read_text()
    assert "# Per-step variance is sigma2 * dt" in text  # every key commented with its docstring
    assert load_preset(str(target))[0].model_dump() == load_preset("reference")[0].model_dump()
    assert "already exists" in one_line_error(capsys, "presets", "init", target)
    assert target.read_text() == text
    mine = tmp_path / "mine.toml"
    assert invoke("presets", "init", mine)[0] == 0
    np.save(tmp_path / "data.npy", rows())
    (tmp_path / "rewards.py").write_text(REWARD)
    mine.write_text(mine.read_text().replace('"data.csv"', '"data.npy"'))
    p, _ = load_preset(str(mine))
    assert p.prior_data.path == str(tmp_path / "data.npy") and p.reward.function == f"{tmp_path / 'rewards.py'}:log_reward"


def test_mode_cells_in_other_dimensions_hold_the_same_mass():
    """Radius 1.5 holds 97.65% of a 2-D component of variance 0.3; the cells keep that mass in any d."""
    from rtbcli.config import Preset
    from rtbcli.metrics import sample_metrics
    from rtbcli.suites import prior_target
    from rtbcli.targets import CELL_MASS, cell_radius, shell_mass

    for d in (1, 2, 5, 10):
        means = [[0.0] * d, [10.0] + [0.0] * (d - 1)]
        task = Task(Preset(name="m", prior_data={"means": means, "variance": 0.3}))
        r = cell_radius(task)
        assert shell_mass(d, 0.3, r) == pytest.approx(CELL_MASS, abs=1e-9)
        if d == 2:
            assert r == pytest.approx(1.5, abs=1e-12)
        t = prior_target(task)
        x = t.sample(20_000, torch.Generator().manual_seed(0))
        off = sample_metrics(x, t)["off_target"]
        assert abs(off - (1 - CELL_MASS)) < 4 * (CELL_MASS * (1 - CELL_MASS) / 20_000) ** 0.5 + 1e-3, (d, off)


def test_reproduce_on_your_own_preset_imports_the_reward_it_names(task_files):
    """The preset names its Python reward, so reproduce may import it to score the finetuned checkpoints."""
    code, out, err = invoke(
        "reproduce",
        "--preset",
        task_files / "task.toml",
        "--pretrain-steps",
        2,
        "--steps",
        2,
        "--batch-size",
        8,
        "--n",
        50,
        "--out",
        task_files / "rep",
        "--quiet",
        "--json",
    )
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["method"] for r in rows] == ["rtb", "trust-pcl", "reinforce-kl", "reinforce-kl-on-policy", "legacy-rl"]
    assert all("log_r_mean" in r and "sw2" in r for r in rows if not r.get("diverged")), rows


def test_a_reference_too_small_for_the_floor(tmp_path, tiny_prior, capsys):
    """3 rows cannot make two halves of 2: given with --reference it is bad input; as a prior's own data
    (a 3-row data file) tier 2 is left out with the reason, and the other tiers are still reported."""
    np.save(tmp_path / "three.npy", rows(3))
    line = one_line_error(capsys, "evaluate", tiny_prior, "--n", 50, "--reference", tmp_path / "three.npy")
    assert "the reference has 3 finite rows" in line and "at least 4" in line
    prior = tmp_path / "p3.safetensors"
    assert invoke("pretrain", "--data", tmp_path / "three.npy", "--out", prior, *TINY)[0] == 0
    code, out, err = invoke("evaluate", prior, "--n", 50, "--json")
    assert code == 0, err
    m = json.loads(out)
    assert "sw2" not in m and "too few for sliced-W2 and MMD^2" in m["reference"]


def test_a_point_mass_reference_has_a_zero_mmd_floor(tmp_path, tiny_prior):
    np.save(tmp_path / "same.npy", np.ones((40, 2), dtype=np.float32))
    code, out, err = invoke("evaluate", tiny_prior, "--n", 50, "--reference", tmp_path / "same.npy", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["mmd2_floor"] == 0.0 and m["sw2_floor"] == 0.0 and m["mmd2"] > 0 and m["sw2"] > 0


def test_the_reward_is_called_as_a_run_calls_it(task_files):
    """float32 on the run's device, also when evaluate builds the reference from the data rows (CPU here)."""
    log = task_files / "calls.txt"
    (task_files / "rewards.py").write_text(
        REWARD.replace(
            "def log_reward(x, scale=1.0, centre=2.0):\n",
            f"def log_reward(x, scale=1.0, centre=2.0):\n    open({str(log)!r}, 'a').write(f'{{x.dtype}} {{x.device}}\\n')\n",
        )
    )
    prior, ft = task_files / "prior.safetensors", task_files / "ft.safetensors"
    assert invoke("pretrain", "--preset", task_files / "task.toml", "--out", prior, *TINY)[0] == 0
    assert invoke("finetune", "--prior", prior, "--preset", task_files / "task.toml", "--out", ft, *TINY)[0] == 0
    code, out, err = invoke("evaluate", ft, "--n", 100, "--reward", f"{task_files / 'rewards.py'}:log_reward", "--device", "cpu", "--json")
    assert code == 0, err
    assert "accepted with probability" in json.loads(out)["reference"]
    assert set(log.read_text().splitlines()) == {"torch.float32 cpu"}
