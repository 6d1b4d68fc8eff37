"""Energy mode through the schema, the presets and the command line (issue 18, part 1 and evaluate).

Sampling pi with no data: a preset's [target] (or --target), the Brownian prior, the derived
reward, the checkpoint that records them, and `rtbcli evaluate`'s table keys.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rtbcli
from rtbcli.cli import run
from rtbcli.cli_common import with_overrides
from rtbcli.errors import InputError
from rtbcli.gaussian import centred_log_prob
from rtbcli.presets_loader import load_preset, parse_preset
from rtbcli.tasks import Task

ENERGY_PRESETS = {"gmm25-energy": (2, 5.0), "funnel": (10, 1.0), "manywell-energy": (32, 1.0)}


# ----------------------------------------------------------------------------- schema and presets
@pytest.mark.parametrize("name", sorted(ENERGY_PRESETS))
def test_energy_presets_carry_the_papers_protocol(name):
    p, _ = load_preset(name)
    d, s2 = ENERGY_PRESETS[name]
    assert p.energy and p.prior_data is None and p.reward is None and p.beta == 1.0
    assert (p.dim, p.sampler.steps, p.sampler.sigma2) == (d, 100, s2)
    f = p.finetune
    assert (f.steps, f.batch_size, f.lr, f.lr_logz, p.evaluate.n) == (25_000, 300, 1e-3, 0.1, 2_000)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples" / "energy").glob("*.toml")), ids=lambda p: p.name)
def test_the_example_energy_presets_load_as_the_papers_protocol_with_their_change(path):
    """Each examples/energy preset is its shipped preset (target, sigma2, T, batch, budget) with the change its name says:
    the lr decay (wsd), and for -grid the power-2 time grid as well (funnel-grid also at lr 2e-3, the paper's 1e-3 else)."""
    p, _ = load_preset(str(path))
    shipped, _ = load_preset(path.stem.split("-wsd")[0].split("-grid")[0])
    assert p.energy and p.target == shipped.target and p.name == path.stem
    assert (p.sampler.sigma2, p.sampler.steps, p.finetune.batch_size, p.finetune.steps) == (
        shipped.sampler.sigma2, shipped.sampler.steps, shipped.finetune.batch_size, shipped.finetune.steps
    )  # fmt: skip
    assert (p.finetune.lr_schedule, p.finetune.lr_final) == ("wsd", 0.0)
    assert p.sampler.time_power == (2.0 if path.stem.endswith("-grid") else 1.0)
    assert p.finetune.lr == (2e-3 if path.stem == "funnel-grid" else 1e-3)


def test_energy_presets_are_listed(capsys):
    assert run(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, (d, _) in ENERGY_PRESETS.items():
        assert rows[name]["dim"] == d and rows[name]["reward"] == "derived (energy)"


TARGET = '[target]\nlog_density = "rtbcli.energy.targets:gmm25"\n'


@pytest.mark.parametrize(
    "extra,match",
    [
        ("[prior_data]\nmeans = [[0.0, 0.0]]\nvariance = 1.0\n", r"with no data: remove \[prior_data\]"),
        ('[reward]\ntype = "python"\nfunction = "m:f"\n', r"derives its reward .*: remove \[reward\]"),
    ],
)
def test_a_target_preset_refuses_data_and_reward(extra, match):
    with pytest.raises(InputError, match=match) as e:
        parse_preset(f'name = "t"\n{TARGET}{extra}', "t.toml")
    assert "\n" not in str(e.value)


def test_a_target_preset_is_at_beta_one_and_a_preset_needs_data_or_target():
    with pytest.raises(InputError, match=r"at beta = 1 .*remove beta"):
        parse_preset(f'name = "t"\nbeta = 2.0\n{TARGET}', "t.toml")
    with pytest.raises(InputError, match=r"missing key 'prior_data' \(or give \[target\]"):
        parse_preset('name = "t"\n', "t.toml")


def test_shipped_targets_take_their_constructor_kwargs_and_unknown_ones_are_named():
    p = parse_preset(f'name = "t"\n{TARGET.replace("gmm25", "manywell")}[target.kwargs]\npairs = 2\n', "t.toml")
    assert Task(p).dim == 4
    with pytest.raises(InputError, match=r"unknown shipped target .*gmm25.*funnel.*manywell"):
        Task(parse_preset(f'name = "t"\n{TARGET.replace("gmm25", "gmm9")}', "t.toml"))
    with pytest.raises(InputError, match=r"bad \[target.kwargs\]"):
        Task(parse_preset(f'name = "t"\n{TARGET}[target.kwargs]\nwidth = 2\n', "t.toml"))


def test_the_energy_task_is_the_brownian_prior_and_the_derived_reward():
    """data = N(0, sigma2 I) (the prior's exact terminal law); log r = log pi - log N(0, sigma2 I), so p_data r = pi."""
    p, _ = load_preset("gmm25-energy")
    task = Task(p)
    x = torch.randn(64, 2, dtype=torch.float64) * 4
    pi = task.energy.log_density(x)
    torch.testing.assert_close(task.data_log_prob(x), centred_log_prob(x, 5.0))
    torch.testing.assert_close(task.log_reward(x), pi - centred_log_prob(x, 5.0))
    torch.testing.assert_close(task.data_log_prob(x) + task.log_reward(x), pi)
    assert task.energy.log_z == 0.0


# ----------------------------------------------------------------------------- the command line
TINY = """name = "tiny-energy"
[target]
log_density = "{ref}"
{kwargs}
[sampler]
steps = 10
sigma2 = {sigma2}
time_power = {power}
hidden = 16
time_features = 8
[finetune]
steps = {steps}
batch_size = 32
lr = {lr}
lr_logz = {lr}
exploration = 0.0
[evaluate]
n = {n}
"""


def tiny_energy(tmp_path, ref="rtbcli.energy.targets:gmm25", sigma2=5.0, steps=30, lr=1e-3, n=300, kwargs="", power=1.0):
    path = tmp_path / "tiny-energy.toml"
    path.write_text(TINY.format(ref=ref, sigma2=sigma2, steps=steps, lr=lr, n=n, kwargs=kwargs, power=power))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = run([str(a) for a in argv])
    c = capsys.readouterr()
    return code, c.out, c.err


def one_line_error(code: int, err: str, match: str, exit_code: int = 2) -> None:
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("rtbcli: error: "), (code, err)
    assert match in lines[0], lines[0]


TABLE_KEYS = ("log_z_true", "elbo", "log_z_rw", "delta_log_z", "delta_log_z_rw", "eubo", "w2", "w2_floor")


def test_gmm25_energy_trains_and_evaluates_end_to_end(tmp_path, capsys):
    """The shipped target from the Brownian prior: the run records its prior as brownian (no prior.* weights), and
    evaluate reports the Table 1 keys, finite, with delta log Z = |log Z - ELBO| derived from the reported numbers."""
    from rtbcli.checkpoint import load_checkpoint

    out = tmp_path / "g.safetensors"
    code, text, err = cli(capsys, "finetune", "--preset", tiny_energy(tmp_path), "--out", out, "--quiet", "--json")
    assert code == 0, err
    ck = load_checkpoint(out)
    assert ck.meta["prior_path"] == "brownian" and ck.meta["target"] == "rtbcli.energy.targets:gmm25"
    assert not ck.section("prior") and ck.section("policy") and ck.preset.energy
    assert type(ck.sampler("prior")).__name__ == "BrownianPrior"
    code, text, err = cli(capsys, "evaluate", out, "--json", "--plot", tmp_path / "g.png")
    assert code == 0, err
    m = json.loads(text)
    assert m["suite"] == "energy" and m["n"] == 300 and m["n_w2"] == 300 and (tmp_path / "g.png").stat().st_size > 0
    assert all(math.isfinite(m[k]) for k in TABLE_KEYS), {k: m.get(k) for k in TABLE_KEYS}
    assert m["log_z_true"] == 0.0 and m["delta_log_z"] == pytest.approx(abs(m["log_z_true"] - m["elbo"]))
    assert m["delta_log_z_rw"] == pytest.approx(abs(m["log_z_true"] - m["log_z_rw"]))
    assert m["elbo"] <= m["log_z_rw"] and m["n_target_modes"] == 25  # Jensen; gmm25's mode cells
    # and W2 against the paper's stratified reference, recomputed from the same samples and the same draw
    from rtbcli.energy import get_target, w2_exact
    from rtbcli.evaluate import evaluate
    from rtbcli.runtime import make_generator

    ev = evaluate(ck, 300, 0)
    strat = get_target("gmm25").sample_stratified(300, make_generator(6, torch.device("cpu")), dtype=torch.float64)
    assert ev.metrics["w2_stratified"] == pytest.approx(w2_exact(ev.samples, strat), rel=1e-6)  # (samples kept in float32)
    assert ev.metrics["w2_stratified_floor"] == pytest.approx(w2_exact(ev.target_samples, strat), rel=1e-6)
    assert m["w2_stratified"] == pytest.approx(ev.metrics["w2_stratified"], rel=1e-9)


class Gauss:
    """A test target: log pi = log N(x; 0, variance I) + c, exact log Z = c and exact samples."""

    name, sigma2 = "gauss", 1.0

    def __init__(self, dim: int = 2, variance: float = 1.0, c: float = 0.0):
        self.dim, self.variance, self.c = dim, variance, c

    def log_density(self, x):
        return centred_log_prob(x, self.variance) + self.c

    @property
    def log_z(self):
        return self.c

    def sample(self, n, generator=None, dtype=torch.float32, device=None):
        return (math.sqrt(self.variance) * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)).to(dtype)


def _zero_drift_run(tmp_path, capsys, monkeypatch, variance, c, power=1.0):
    """A finetuned checkpoint whose policy is still the zero-drift prior (lr 1e-30: one step moves nothing), scored."""
    from rtbcli.energy.targets import ENERGY_TARGETS

    monkeypatch.setitem(ENERGY_TARGETS, "gauss", Gauss)
    kwargs = f"[target.kwargs]\nvariance = {variance}\nc = {c}\n"
    preset = tiny_energy(tmp_path, "rtbcli.energy.targets:gauss", sigma2=1.0, steps=1, lr=1e-30, n=4000, kwargs=kwargs, power=power)
    out = tmp_path / "z.safetensors"
    assert cli(capsys, "finetune", "--preset", preset, "--out", out, "--quiet")[0] == 0
    code, text, err = cli(capsys, "evaluate", out, "--json")
    assert code == 0, err
    return json.loads(text)


@pytest.mark.parametrize("power", [1.0, 2.5])
def test_the_zero_drift_prior_on_its_own_gaussian_scores_exactly(tmp_path, capsys, monkeypatch, power):
    """pi = e^c N(0, sigma2 I): log r = c everywhere and lw = c on every trajectory, so ELBO = log Z^RW = EUBO = c;
    on a non-uniform time grid too (the policy's steps and the bridge's are that grid's)."""
    m = _zero_drift_run(tmp_path, capsys, monkeypatch, 1.0, 1.5, power)
    for k in ("elbo", "log_z_rw", "eubo", "log_z_true"):
        assert m[k] == pytest.approx(1.5, abs=1e-4), k
    assert m["delta_log_z"] < 1e-4 and m["delta_log_z_rw"] < 1e-4


def test_the_zero_drift_prior_on_a_wider_gaussian_scores_the_two_kls(tmp_path, capsys, monkeypatch):
    """pi = N(0, 2 I) from N(0, I) in d = 2: lw = log N(x; 0, 2) - log N(x; 0, 1) on the bridge-extended path, so
    delta log Z = KL(N(0, 1) || N(0, 2)) = d/2 (1/2 - 1 + log 2) and EUBO = KL(N(0, 2) || N(0, 1)) = d/2 (2 - 1 - log 2)."""
    m = _zero_drift_run(tmp_path, capsys, monkeypatch, 2.0, 0.0)
    assert m["log_z_true"] == 0.0
    assert m["delta_log_z"] == pytest.approx(0.5 - 1 + math.log(2), abs=0.03)  # MC std 0.5 / sqrt(4000) = 0.008
    assert m["eubo"] == pytest.approx(2 - 1 - math.log(2), abs=0.05)  # MC std sqrt(2) / 2 / sqrt(4000) = 0.011
    # mean log pi = -log(4 pi) - E|x|^2 / 4: over the model's N(0, I) samples E|x|^2 = 2, over exact N(0, 2 I) ones 4
    assert m["log_pi_mean"] == pytest.approx(-math.log(4 * math.pi) - 0.5, abs=0.04)  # MC std 0.5 / sqrt(4000) = 0.008
    assert m["log_pi_mean_exact"] == pytest.approx(-math.log(4 * math.pi) - 1.0, abs=0.08)  # MC std 1 / sqrt(4000) = 0.016


# ----------------------------------------------------------------------------- bad input
BAD_TARGETS = {
    "shape": ("return x", "returned shape (256, 2) for x of shape (256, 2)"),
    "type": ("return 1.0", "returned a float, not a torch tensor"),
    "nan": ("return torch.full(x.shape[:-1], float('nan'))", "returns NaN or inf on 256 of 256 samples of the prior"),
}


def write_target(tmp_path, body: str, name: str = "t.py") -> str:
    (tmp_path / name).write_text(f"import torch\n\ncalls = []\n\n\ndef log_pi(x):\n    {body}\n\n\nlog_pi.dim = 2\n")
    return f"{tmp_path / name}:log_pi"


@pytest.mark.parametrize("kind", sorted(BAD_TARGETS))
def test_a_bad_log_density_is_refused_before_the_run(tmp_path, capsys, kind):
    body, match = BAD_TARGETS[kind]
    ref = write_target(tmp_path, body)
    before = set(tmp_path.iterdir())
    code, _, err = cli(capsys, "finetune", "--prior", "brownian", "--target", ref, "--dim", 2, "--out", tmp_path / "o.safetensors")
    one_line_error(code, err, match)
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_brownian_with_prior_data_and_a_missing_target_are_refused(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "finetune", "--prior", "brownian", "--preset", "reference", "--out", out)
    one_line_error(code, err, "but preset 'reference' has [prior_data]: give --target file.py:fn or an energy preset")
    code, _, err = cli(capsys, "finetune", "--prior", "brownian", "--out", out)
    one_line_error(code, err, "--prior brownian samples a target: give --target file.py:fn")
    code, _, err = cli(capsys, "finetune", "--target", write_target(tmp_path, "return x.sum(-1)").replace(":log_pi", ":nope"), "--out", out)
    one_line_error(code, err, "has no 'nope'")
    (tmp_path / "u.py").write_text("def log_pi(x):\n    return -x.pow(2).sum(-1)\n")
    code, _, err = cli(capsys, "finetune", "--target", f"{tmp_path / 'u.py'}:log_pi", "--out", out)
    one_line_error(code, err, "does not say its dimension: give --dim D")
    assert not out.exists()


def test_sigma2_and_time_power_set_a_new_energy_runs_sampler_and_are_refused_elsewhere(tmp_path, capsys, user_run):
    """--sigma2 and --time-power on the command line reach the checkpoint's prior and policy; with a run to continue or
    a pretrained prior (which keep their own), a one-line error and nothing written."""
    from rtbcli.checkpoint import load_checkpoint

    done, ref = user_run
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "finetune", "--prior", "brownian", "--target", ref, "--dim", 2, "--sigma2", 2, "--time-power", 2,
                       "--steps", 2, "--out", out, "--quiet")  # fmt: skip
    assert code == 0, err
    ck = load_checkpoint(out)
    for prefix in ("prior", "policy"):
        s = ck.sampler(prefix)
        assert (s.sigma2, s.time_power) == (2.0, 2.0), prefix
    bad = tmp_path / "bad.safetensors"
    for argv, match in [
        (("--resume", done, "--time-power", 2), "--time-power sets the Brownian prior's time grid (energy mode, a new run)"),
        (("--warm-start", done, "--sigma2", 2), "--sigma2 sets the Brownian prior's variance (energy mode, a new run)"),
        (
            ("--prior", Path(rtbcli.__file__).parent / "data" / "prior-reference.safetensors", "--time-power", 2),
            "a pretrained prior or a run keeps its own",
        ),
        (("--preset", tiny_energy(tmp_path), "--time-power", 0.5), "--time-power"),
    ]:
        code, _, err = cli(capsys, "finetune", *argv, "--out", bad)
        one_line_error(code, err, match)
    assert not bad.exists()


@pytest.fixture
def user_run(tmp_path, capsys):
    """A short energy run on a user's target (a file), and that target's reference."""
    ref = write_target(tmp_path, "return -0.5 * x.pow(2).sum(-1)")
    out = tmp_path / "u.safetensors"
    code, _, err = cli(capsys, "finetune", "--preset", tiny_energy(tmp_path), "--target", ref, "--steps", 4, "--out", out, "--quiet")
    assert code == 0, err
    return out, ref


def test_a_user_target_is_named_again_never_imported_from_the_checkpoint(tmp_path, capsys, user_run):
    out, ref = user_run
    from rtbcli.checkpoint import load_checkpoint

    ck = load_checkpoint(out)
    assert ck.meta["target"] == ref and ck.meta["target_sha256"] and ck.preset.target.dim == 2
    resume = ("finetune", "--resume", out, "--steps", 8, "--out", tmp_path / "r.safetensors")
    for argv in (("evaluate", out), ("finetune", "--warm-start", out, "--out", tmp_path / "w.safetensors"), resume):
        code, _, err = cli(capsys, *argv)
        one_line_error(code, err, f"name it again with --target {ref}")
    code, text, err = cli(capsys, "evaluate", out, "--target", ref, "--json")
    assert code == 0, err
    m = json.loads(text)
    assert m["log_z_true"] is None and "w2" not in m and math.isfinite(m["elbo"]) and math.isfinite(m["log_z_rw"])
    code, _, err = cli(
        capsys, "finetune", "--warm-start", out, "--target", ref, "--steps", 2, "--out", tmp_path / "w.safetensors", "--quiet"
    )
    assert code == 0, err


def test_a_target_of_another_dimension_than_the_checkpoint_is_refused(tmp_path, capsys, user_run):
    out, _ = user_run
    other = write_target(tmp_path, "return -x.pow(2).sum(-1)", "t3.py")
    (tmp_path / "t3.py").write_text((tmp_path / "t3.py").read_text().replace("log_pi.dim = 2", "log_pi.dim = 3"))
    w = tmp_path / "w.safetensors"
    code, _, err = cli(capsys, "finetune", "--warm-start", out, "--target", other, "--out", w)
    one_line_error(code, err, "has dimension 3, the checkpoint's sampler dimension 2: give a target of dimension 2")
    assert not w.exists()


def test_nan_from_the_target_mid_run_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """Finite on the two checks before the run and for 57 steps, then NaN: the loop's divergence path (exit 1), the
    last good state (logged at step 50) kept."""
    ref = write_target(tmp_path, "calls.append(1)\n    v = -0.5 * x.pow(2).sum(-1)\n    return v if len(calls) < 60 else v * float('nan')")
    out = tmp_path / "n.safetensors"
    code, _, err = cli(capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=80), "--target", ref, "--out", out, "--quiet")
    one_line_error(code, err, "the target's log-density (through the reward it implies) returned NaN or inf by step", exit_code=1)
    assert "or fix the target" in err
    from rtbcli.checkpoint import load_checkpoint

    good = load_checkpoint(tmp_path / "n.last-good.safetensors")
    assert good.meta["target"] == ref and good.step == 50 and not out.exists()


@pytest.mark.parametrize("algo", ["rtb", "trust-pcl", "vargrad", "reinforce-kl"])
def test_every_objective_runs_in_energy_mode(tmp_path, capsys, algo):
    out = tmp_path / "a.safetensors"
    code, text, err = cli(capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=6), "--algo", algo, "--out", out, "--json", "--quiet")
    assert code == 0, err
    assert json.loads(text)["algo"] == algo and math.isfinite(json.loads(text)["loss"])


def test_resume_continues_an_energy_run(tmp_path, capsys):
    out, more = tmp_path / "r.safetensors", tmp_path / "r2.safetensors"
    assert cli(capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=4), "--out", out, "--quiet")[0] == 0
    code, text, err = cli(capsys, "finetune", "--resume", out, "--steps", 8, "--out", more, "--quiet", "--json")
    assert code == 0, err
    assert json.loads(text)["steps"] == 8 and json.loads(text)["resumed_at"] == 4


def test_the_run_hands_the_target_to_the_training_step(tmp_path):
    """FinetuneRun.log_density: the target's log pi in energy mode (local search and LP read it), None otherwise."""
    from rtbcli.finetune import setup

    p = parse_preset(tiny_energy(tmp_path).read_text(), "t.toml")
    run = setup(None, p, "t", "rtb", tmp_path / "x.safetensors")
    x = torch.randn(5, 2)
    torch.testing.assert_close(run.log_density(x), run.task.energy.shipped.log_density(x))
    assert type(run.prior).__name__ == "BrownianPrior" and run.info.checkpoint_meta["prior_path"] == "brownian"
    traj = run.prior.sample(3)
    torch.testing.assert_close(run.policy.means(traj), traj[:-1])  # the policy starts as the prior: zero drift


@pytest.mark.parametrize("langevin", [False, True])
def test_an_energy_run_on_a_time_grid_trains_and_resumes_on_it(tmp_path, capsys, langevin):
    """sampler.time_power in energy mode: the run's Brownian prior and policy take the grid (the prior still ends at
    N(0, sigma2 I)), and a run resumed from its checkpoint (which rebuilds both from the preset) continues exactly the
    run it would have been: so the loop trained on the grid the checkpoint records. With the Langevin parametrisation
    too (its policy's steps, noise and drift times on the grid)."""
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.finetune import setup

    preset = tiny_energy(tmp_path, steps=4, power=2.0)
    parsed = with_overrides(parse_preset(preset.read_text(), "t.toml"), "finetune", langevin=langevin)
    run = setup(None, parsed, "t", "rtb", tmp_path / "x.safetensors")
    assert run.prior.time_power == run.policy.time_power == 2.0 and not run.policy.uniform
    assert torch.equal(run.policy.times(), run.prior.times())
    if langevin:
        assert type(run.policy).__name__ == "LangevinSampler"
    lp = ("--langevin",) if langevin else ()
    straight, half, rest = tmp_path / "s.safetensors", tmp_path / "h.safetensors", tmp_path / "r.safetensors"
    assert cli(capsys, "finetune", "--preset", preset, *lp, "--out", straight, "--quiet")[0] == 0
    assert cli(capsys, "finetune", "--preset", preset, *lp, "--steps", 2, "--out", half, "--quiet")[0] == 0
    assert cli(capsys, "finetune", "--resume", half, "--steps", 4, "--out", rest, "--quiet")[0] == 0
    a, b = load_checkpoint(straight), load_checkpoint(rest)
    assert a.sampler("prior").time_power == a.preset.sampler.time_power == 2.0  # the policy's: `setup` above
    assert a.section("policy").keys() == b.section("policy").keys()
    assert all(torch.equal(v, b.section("policy")[k]) for k, v in a.section("policy").items())


def test_a_langevin_policy_starts_from_the_brownian_prior_and_evaluates(tmp_path, capsys):
    """--langevin in energy mode: a fresh Langevin policy (drift 0.01 clip(grad log pi)), and evaluate gives it log pi again."""
    out = tmp_path / "lp.safetensors"
    code, _, err = cli(capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=2), "--langevin", "--out", out, "--quiet")
    assert code == 0, err
    code, text, err = cli(capsys, "evaluate", out, "--n", 64, "--json")
    assert code == 0, err
    m = json.loads(text)
    assert all(math.isfinite(m[k]) for k in ("elbo", "log_z_rw", "eubo", "w2"))
    code, _, err = cli(capsys, "sample", out, "--n", 50, "--out", tmp_path / "lp.npy")  # its weights need the Langevin net
    assert code == 0, err
    x = np.load(tmp_path / "lp.npy")
    assert x.shape == (50, 2) and np.isfinite(x).all()


def test_evaluate_without_pot_names_the_install_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.safetensors"
    assert cli(capsys, "finetune", "--preset", tiny_energy(tmp_path, steps=2), "--out", out, "--quiet")[0] == 0
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` raises ImportError
    code, text, err = cli(capsys, "evaluate", out, "--json")
    one_line_error(code, err, "pip install 'rtbcli[pot]'")
    assert text == ""


def test_resume_with_the_user_target_named_again(tmp_path, capsys, user_run):
    out, ref = user_run
    code, text, err = cli(
        capsys, "finetune", "--resume", out, "--target", ref, "--steps", 8, "--out", tmp_path / "r.safetensors", "--json", "--quiet"
    )
    assert code == 0, err
    assert json.loads(text)["resumed_at"] == 4
