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
    assert m["elbo"] <= 0.0 <= m["eubo"]  # the sandwich around log Z = 0 (exact: test_sandwich_is_exact_for_brownian_motion)
    assert m["eubo"] - m["elbo"] < 1.0  # a pretrained prior: the path KLs both ways are small
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
    assert m["elbo"] <= m["eubo"]


def zero_drift_prior(tmp_path, preset, perturb: float = 0.0):
    """A prior checkpoint of a fresh sampler: f = 0 (Brownian motion from 0), or a perturbed drift."""
    from rtbcli.checkpoint import base_metadata, sampler_tensors, save_checkpoint
    from rtbcli.sampler import DiffusionSampler
    from test_sampler import perturbed

    torch.manual_seed(0)
    s = DiffusionSampler.from_spec(preset.dim, preset.sampler)
    if perturb:
        perturbed(s, std=perturb)
    path = tmp_path / f"bm-{perturb}.safetensors"
    save_checkpoint(path, sampler_tensors(s, "policy"), base_metadata("prior", preset, "bm", 0, 0, {}))
    return load_checkpoint(path)


@pytest.mark.usefixtures("one_thread")
def test_sandwich_is_exact_for_brownian_motion(tmp_path, tiny_preset):
    """A drift-free sampler ends at N(0, sigma2 I); against data N(0, sigma2 I) its bridge is the exact
    backward process, so every importance weight is 1: ELBO = log Z_IS = EUBO = log Z = 0, ESS = 1."""
    sigma2 = tiny_preset.sampler.sigma2
    preset = tiny_preset.model_copy(update={"reward": None}).model_dump()
    preset["prior_data"] = {"means": [[0.0, 0.0]], "variance": sigma2}
    from rtbcli.config import Preset

    preset = Preset.model_validate(preset)
    m = evaluate(zero_drift_prior(tmp_path, preset), n=1000, seed=0).metrics
    assert m["log_z_true"] == 0.0
    for key in ("elbo", "log_z_is", "log_z_is_data", "eubo"):
        assert m[key] == pytest.approx(0.0, abs=1e-5), key
    assert m["ess_fraction"] == pytest.approx(1.0, abs=1e-9)
    # the same check tells a sampler with a drift apart
    w = evaluate(zero_drift_prior(tmp_path, preset, perturb=1.0), n=1000, seed=0).metrics
    assert w["elbo"] < -5e-3 and w["eubo"] > 5e-3 and w["ess_fraction"] < 0.99


@pytest.mark.usefixtures("one_thread")
def test_learned_log_z_after_one_adam_step(tmp_path):
    """Adam's first step moves a scalar by exactly lr against the sign of its gradient. At step 0
    (policy = prior, log Z = 0) d loss / d log Z = -beta mean(log r), so rtb learns log Z = lr_logz
    sign(mean log r), and trust-pcl V = alpha lr_logz sign(mean log r) (its lr is alpha lr_logz):
    both report log Z = V / alpha = lr_logz sign(mean log r). (A 1-D task: its beta = 0.5 target is cheap.)"""
    from rtbcli.config import Preset
    from rtbcli.pretrain import pretrain

    preset = Preset.model_validate(
        {
            "name": "one-d",
            "beta": 0.5,
            "prior_data": {"means": [[-3.0], [3.0]], "variance": 1.0},
            "reward": {"type": "mixture", "mixture": {"means": [[3.0]], "variance": 1.0}},
            "sampler": {"steps": 10, "hidden": 16, "time_features": 8},
            "pretrain": {"steps": 2, "batch_size": 16},
            "finetune": {"steps": 1, "batch_size": 16, "lr_logz": 0.1},
        }
    )
    prior = tmp_path / "prior.safetensors"
    pretrain(preset, "one-d", prior, progress=False)
    for algo in ("rtb", "trust-pcl"):
        out = tmp_path / f"{algo}.safetensors"
        r = finetune(load_checkpoint(prior), preset, "one-d", algo, out, progress=False)
        assert abs(r.mean_log_r) > 0.1  # the batch's mean log r (logged at step 1), far from 0: its sign is the gradient's
        expected = math.copysign(0.1, r.mean_log_r)
        m = evaluate(load_checkpoint(out), n=200, seed=0).metrics
        assert m["log_z_learned"] == pytest.approx(expected, rel=1e-5), algo
        if algo == "trust-pcl":
            assert m["alpha"] == 2.0 and m["v_soft_s0"] == pytest.approx(2 * expected, rel=1e-5)


# ------------------------------------------------------------ importance weights against exact values
REWARD_Q = {"means": [[2.0, 0.0], [-1.0, -2.0]], "variance": 1.5, "weights": [0.6, 0.4]}


def reward_quadrature(sigma2: float, beta: float, drift=(0.0, 0.0), spacing: float = 0.02, half: float = 16.0) -> dict:
    """Exact numbers, by quadrature on a 2-D grid in float64, written out independently of rtbcli, for a prior
    ending at p = N(0, sigma2 I), a policy ending at q = N(drift, sigma2 I) and log r = log REWARD_Q:
    mean_log_r = E_q[log r], z = E_p[r^beta] (so log Z = log z), w2 = E_q[w^2] with the weights w = (p / q) r^beta
    (whose mean is z), and the path KL of a constant drift c: |c|^2 / (2 sigma2)."""
    c = np.arange(-half, half + spacing / 2, spacing)
    gx, gy = np.meshgrid(c, c, indexing="ij")
    r = np.zeros_like(gx)
    var = REWARD_Q["variance"]
    for (mx, my), w in zip(REWARD_Q["means"], REWARD_Q["weights"]):
        r += w * np.exp(-((gx - mx) ** 2 + (gy - my) ** 2) / (2 * var)) / (2 * math.pi * var)

    def gauss(mx, my):
        return np.exp(-((gx - mx) ** 2 + (gy - my) ** 2) / (2 * sigma2)) / (2 * math.pi * sigma2) * spacing**2

    p, q = gauss(0.0, 0.0), gauss(*drift)
    assert abs(p.sum() - 1) < 1e-9 and abs(q.sum() - 1) < 1e-9  # the grid holds both Gaussians
    return {
        "mean_log_r": float((q * np.log(r)).sum()),
        "z": float((p * r**beta).sum()),
        "w2": float((p * p / q * r ** (2 * beta)).sum()),
        "path_kl": (drift[0] ** 2 + drift[1] ** 2) / (2 * sigma2),
    }


def finetuned_checkpoint(tmp_path, preset, beta: float, drift=(0.0, 0.0)):
    """A 'finetuned' rtb checkpoint over a zero-drift prior (which ends at N(0, sigma2 I) exactly) whose policy has the
    constant drift f = `drift` (the last layer's bias; its weight is 0), so it ends at N(drift, sigma2 I) exactly."""
    from rtbcli.checkpoint import base_metadata, sampler_tensors, save_checkpoint
    from rtbcli.config import Preset
    from rtbcli.sampler import DiffusionSampler

    data = preset.model_dump()
    data.update(beta=beta, reward={"type": "mixture", "mixture": REWARD_Q})
    data["prior_data"] = {"means": [[0.0, 0.0]], "variance": preset.sampler.sigma2}
    p = Preset.model_validate(data)
    prior, policy = DiffusionSampler.from_spec(p.dim, p.sampler), DiffusionSampler.from_spec(p.dim, p.sampler)
    policy.load_state_dict(prior.state_dict())
    last = policy.net.body[-1]
    assert float(last.weight.detach().abs().max()) == 0 and float(last.bias.detach().abs().max()) == 0  # zero drift
    with torch.no_grad():
        last.bias.copy_(torch.tensor(drift))
    meta = base_metadata("finetuned", p, "constant-drift", 0, 0, {})
    meta.update(algo="rtb", beta=repr(beta), alpha=repr(1 / beta), prior_sha256="", prior_path="")
    tensors = {**sampler_tensors(policy, "policy"), **sampler_tensors(prior, "prior"), "log_z": torch.tensor(0.0)}
    path = tmp_path / f"ft-{beta}-{drift[0]}-{drift[1]}.safetensors"
    save_checkpoint(path, tensors, meta)
    return load_checkpoint(path)


N_IS = 20_000


@pytest.mark.usefixtures("one_thread")
def test_importance_weights_of_a_policy_equal_to_its_prior(tmp_path, tiny_preset):
    """policy = prior: lw = beta log r, path_kl = 0 exactly and elbo_prior = beta mean(log r); log Z_IS -> log E_prior[r^beta]
    and ess_fraction -> E[r^beta]^2 / E[r^(2 beta)], by quadrature under the exact terminal law N(0, sigma2 I).
    beta = 0.5 and 1 give different numbers, each its own formula's: a sign or beta error fails."""
    sigma2, got = tiny_preset.sampler.sigma2, {}
    for beta in (0.5, 1.0):
        m = evaluate(finetuned_checkpoint(tmp_path, tiny_preset, beta), n=N_IS, seed=0).metrics
        exact = reward_quadrature(sigma2, beta)
        rel_var = exact["w2"] / exact["z"] ** 2 - 1  # Var(r^beta) / E[r^beta]^2 under the prior
        assert m["beta"] == beta and m["path_kl"] == 0.0
        assert m["elbo_prior"] == pytest.approx(beta * m["log_r_mean"], rel=1e-12)
        assert m["log_r_mean"] == pytest.approx(exact["mean_log_r"], abs=0.05)  # 5 sd: sd(log r) < 2 here
        assert m["log_z_is"] == pytest.approx(math.log(exact["z"]), abs=5 * math.sqrt(rel_var / N_IS))
        assert m["ess_fraction"] == pytest.approx(1 / (1 + rel_var), rel=0.02)
        got[beta] = (m, exact)
    (half, e_half), (one, e_one) = got[0.5], got[1.0]
    assert half["log_r_mean"] == one["log_r_mean"]  # the same samples: only beta differs
    assert abs(math.log(e_half["z"]) - math.log(e_one["z"])) > 1.0  # far apart next to the tolerances (< 0.04)
    assert half["elbo_prior"] == pytest.approx(0.5 * one["elbo_prior"], rel=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_importance_weights_of_a_policy_with_a_constant_drift(tmp_path, tiny_preset):
    """policy = prior + a constant drift c: the path KL is |c|^2 / (2 sigma2) exactly, elbo_prior = beta mean(log r) - path_kl
    on every sample, and log Z_IS still estimates log E_prior[r^beta] (the prior's normaliser, not the policy's), with
    ess_fraction -> E_q[w]^2 / E_q[w^2]. A sign error in path_kl or lw fails."""
    sigma2, beta, drift = tiny_preset.sampler.sigma2, 0.5, (1.0, -0.5)
    m = evaluate(finetuned_checkpoint(tmp_path, tiny_preset, beta, drift), n=N_IS, seed=0).metrics
    exact = reward_quadrature(sigma2, beta, drift)
    rel_var = exact["w2"] / exact["z"] ** 2 - 1
    kl_sd = math.sqrt((drift[0] ** 2 + drift[1] ** 2) / sigma2 / N_IS)  # lpf - lpp = c.(noise) / sigma2 + const
    assert m["path_kl"] == pytest.approx(exact["path_kl"], abs=5 * kl_sd)
    assert m["elbo_prior"] == pytest.approx(beta * m["log_r_mean"] - m["path_kl"], rel=1e-9)
    assert m["elbo_prior"] == pytest.approx(beta * exact["mean_log_r"] - exact["path_kl"], abs=0.05)
    assert m["log_z_is"] == pytest.approx(math.log(exact["z"]), abs=5 * math.sqrt(rel_var / N_IS))
    assert m["ess_fraction"] == pytest.approx(1 / (1 + rel_var), rel=0.03)


def test_every_reported_key_is_in_the_registry(shipped):
    """The registry is the one list: every key an evaluation writes is there, the floor holds exactly its floor keys,
    --require accepts the number keys and floor.KEY, and the old 'ess' names its new key."""
    from rtbcli import metric_registry as reg
    from rtbcli.errors import InputError
    from rtbcli.report import parse_check

    m = evaluate(shipped, n=400, seed=0, beta=1.0).metrics
    assert set(m) <= set(reg.METRICS), set(m) - set(reg.METRICS)
    assert tuple(m["floor"]) == reg.floor_keys() == ("mode_coverage", "n_target_modes", "kl_mode", "off_target", "kl_hist")
    for key in ("ess_fraction", "mmd2_floor", "floor.kl_mode", "well_mass_max_abs_err_floor", "mmd_bandwidth"):
        assert parse_check(f"{key} < 1").key == key
    for key, hint in (
        ("ess", "renamed 'ess_fraction'"),
        ("floor", "not a number"),
        ("cells", "not a number"),
        ("floor.sw2", "not a number"),
    ):
        with pytest.raises(InputError, match=hint):
            parse_check(f"{key} > 0")


def test_require_help_lists_the_registry_keys(capsys):
    from rtbcli import metric_registry as reg
    from rtbcli.cli import run

    assert run(["evaluate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in ("ess_fraction", "mmd_bandwidth", "floor.kl_hist", "well_mass_mean_abs_err"):
        assert key in reg.requirable() and key in text


def test_a_prior_scored_against_the_tilted_target_is_its_own_reference_in_one_pass(shipped, monkeypatch):
    """`evaluate(prior, beta=...)`: the prior is both the sampler and the reference of the weights, so lpp is lpf (one
    log-probability pass over the trajectories, not two: on a UNet prior each pass costs as much as sampling); the weights
    are beta log r exactly."""
    from rtbcli.sampler import DiffusionSampler

    calls = []
    real = DiffusionSampler.log_prob

    def counted(self, traj, *a, **k):
        calls.append(traj.shape[1])
        return real(self, traj, *a, **k)

    monkeypatch.setattr(DiffusionSampler, "log_prob", counted)
    m = evaluate(shipped, n=400, seed=0, beta=1.0).metrics
    # the samples' trajectories once, and the exact target's bridge trajectories once (eubo): no second pass for lpp
    assert calls == [400, 400] and "eubo" in m
    assert m["path_kl"] == 0.0 and m["elbo_prior"] == pytest.approx(m["log_r_mean"], rel=1e-12)


def test_the_table_names_each_ess_by_its_weights(tiny_prior, capsys):
    """`rtbcli evaluate PRIOR` reports the data-relative weights' ESS ("ESS of the weights", under log Z_data); with
    `--beta` ess_fraction is the prior-relative weights' (beside log Z_IS), and no row calls it the other."""
    from rtbcli.cli import run

    rows = {}
    for name, extra in (("prior", []), ("tilted", ["--beta", "0.5"])):
        assert run(["evaluate", str(tiny_prior), "--n", "400", *extra]) == 0
        rows[name] = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines() if "ESS" in line]
    assert len(rows["prior"]) == 1 and "ESS of the weights" in rows["prior"][0], rows
    assert len(rows["tilted"]) == 1 and "(ESS)" in rows["tilted"][0], rows
