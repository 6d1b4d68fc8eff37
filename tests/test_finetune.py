"""The fine-tuning loop end to end, on tiny budgets."""

from __future__ import annotations

import json

import pytest
import torch

from rtbcli import objectives
from rtbcli.checkpoint import load_checkpoint
from rtbcli.errors import InputError, RunError
from rtbcli.finetune import finetune
from rtbcli.trainer import exploration_std


def test_exploration_schedule_matches_the_authors():
    """N = 5,000: 0.5 until it = 500, a step down to 0.444, then linear to 0 at 4,500."""
    assert exploration_std(0, 5000, 0.5) == 0.5
    assert exploration_std(499, 5000, 0.5) == 0.5
    assert exploration_std(500, 5000, 0.5) == pytest.approx(0.5 * (1 - 500 / 4500))
    assert exploration_std(500, 5000, 0.5) == pytest.approx(0.4444, abs=1e-4)
    assert exploration_std(2250, 5000, 0.5) == pytest.approx(0.25)
    assert exploration_std(4500, 5000, 0.5) == 0.0
    assert exploration_std(4999, 5000, 0.5) == 0.0
    # other run lengths scale the break points with the run
    assert exploration_std(99, 1000, 0.5) == 0.5 and exploration_std(900, 1000, 0.5) == 0.0


@pytest.mark.parametrize("algo", ["rtb", "trust-pcl", "reinforce-kl", "legacy-rl"])
def test_every_objective_runs_and_writes_a_self_contained_checkpoint(tmp_path, tiny_prior, tiny_preset, algo):
    prior = load_checkpoint(tiny_prior)
    out = tmp_path / f"{algo}.safetensors"
    r = finetune(prior, tiny_preset, "tiny", algo, out, seed=1, progress=False, log_path=tmp_path / "log.jsonl", log_every=2)
    ck = load_checkpoint(out, expect_kind="finetuned")
    assert ck.algo == algo and ck.step == tiny_preset.finetune.steps
    assert ck.meta["prior_sha256"] == prior.sha256
    assert float(ck.meta["beta"]) == tiny_preset.beta and float(ck.meta["alpha"]) == 1 / tiny_preset.beta
    for k, v in prior.section("policy").items():  # the frozen prior travels with the checkpoint
        assert torch.equal(ck.section("prior")[k], v)
    assert ("log_z" in ck.tensors) == (algo == "rtb") and ("v_soft_s0" in ck.tensors) == (algo == "trust-pcl")
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [2, 4] and all("loss" in rec and "mean_log_r" in rec for rec in lines)
    assert r.steps == 4 and r.steps_per_s > 0


@pytest.mark.parametrize("extra", [{}, {"lr_schedule": "cosine", "grad_clip": 0.05}], ids=["defaults", "cosine-clipped"])
def test_rtb_and_trust_pcl_train_the_same_sampler(tmp_path, tiny_prior, tiny_preset, extra):
    """Same seed, default settings (Adam; lr_V = alpha lr_logZ, eps scaled): the same sampler, log Z = V / alpha.
    Also with a schedule and gradient clipping (the threshold is in RTB's units)."""
    preset = tiny_preset.updated("", beta=0.5).updated("finetune", steps=6, **extra)
    prior = load_checkpoint(tiny_prior)
    cks = {}
    for algo in ("rtb", "trust-pcl"):
        out = tmp_path / f"{algo}.safetensors"
        finetune(prior, preset, "tiny", algo, out, seed=3, progress=False, dtype=torch.float64)
        cks[algo] = load_checkpoint(out)
    start = prior.section("policy")
    moved = max((cks["rtb"].section("policy")[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-4
    for k, v in cks["rtb"].section("policy").items():
        torch.testing.assert_close(cks["trust-pcl"].section("policy")[k], v, rtol=1e-6, atol=1e-7)  # float32 on disk
    log_z, v_s0 = cks["rtb"].scalar("log_z"), cks["trust-pcl"].scalar("v_soft_s0")
    assert abs(log_z) > 1e-3
    assert v_s0 / 2.0 == pytest.approx(log_z, rel=1e-6)


def test_non_finite_loss_stops_keeps_last_good_and_overwrites_nothing(tmp_path, tiny_prior, tiny_preset, monkeypatch):
    prior = load_checkpoint(tiny_prior)
    out = tmp_path / "ft.safetensors"
    out.write_bytes(b"an earlier result")
    calls = {"n": 0}
    real = objectives.rtb_loss

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(objectives, "rtb_loss", poisoned)  # what the loop's registry entry calls
    preset = tiny_preset.updated("finetune", steps=8)
    with pytest.raises(RunError, match="non-finite by step 6.*step 4"):
        finetune(prior, preset, "tiny", "rtb", out, progress=False, log_every=2, log_path=tmp_path / "ft.jsonl")
    assert out.read_bytes() == b"an earlier result"
    kept = load_checkpoint(tmp_path / "ft.last-good.safetensors")
    assert kept.step == 4 and json.loads(kept.meta["run"])["status"] == "diverged"
    assert all(torch.isfinite(v).all() for v in kept.tensors.values())
    assert not (tmp_path / "ft.jsonl").exists() and (tmp_path / "ft.jsonl.part").exists()


def test_incompatible_prior_is_an_input_error(tmp_path, tiny_prior, tiny_preset):
    prior = load_checkpoint(tiny_prior)
    other = tiny_preset.updated("sampler", steps=20)
    with pytest.raises(InputError, match="sampler settings differ.*steps 10 vs 20"):
        finetune(prior, other, "tiny", "rtb", tmp_path / "x.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_unknown_objective_is_an_input_error(tmp_path, tiny_prior, tiny_preset):
    with pytest.raises(InputError, match="unknown objective"):
        finetune(load_checkpoint(tiny_prior), tiny_preset, "tiny", "ppo", tmp_path / "x.safetensors", progress=False)


def test_warm_start_continues_policy_prior_and_scalar(tmp_path, tiny_prior, tiny_preset):
    """--warm-start starts from the finetuned policy, its frozen prior and its log Z, converted for the objective."""
    preset = tiny_preset.updated("", beta=0.5)
    first = tmp_path / "rtb.safetensors"
    finetune(load_checkpoint(tiny_prior), preset, "tiny", "rtb", first, seed=0, progress=False)
    ck = load_checkpoint(first)
    log_z = ck.scalar("log_z")
    assert abs(log_z) > 0
    from rtbcli.finetune import starting_point

    for algo, expected in (("rtb", log_z), ("trust-pcl", 2.0 * log_z), ("reinforce-kl", 0.0)):
        prior, policy, init, sha, path, offset = starting_point(ck, algo, 0.5, "cpu", torch.float32)
        assert init == pytest.approx(expected, rel=1e-6) and sha == ck.meta["prior_sha256"] and offset == 4
        for k, v in ck.section("policy").items():
            assert torch.equal(policy.state_dict()[k], v)
        for k, v in ck.section("prior").items():
            assert torch.equal(prior.state_dict()[k], v)
    second = tmp_path / "tpcl.safetensors"
    finetune(ck, preset.updated("finetune", steps=2), "tiny", "trust-pcl", second, seed=1, progress=False)
    ck2 = load_checkpoint(second)
    assert ck2.algo == "trust-pcl" and ck2.step == 6 and ck2.meta["prior_sha256"] == ck.meta["prior_sha256"]
    assert json.loads(ck2.meta["run"])["warm_started_from"] == str(first)


def test_warm_start_with_zero_steps_of_change_is_the_same_sampler(tmp_path, tiny_prior, tiny_preset):
    """A trust-pcl resume of an rtb run at lr 0 keeps every weight and V = alpha log Z."""
    first = tmp_path / "rtb.safetensors"
    finetune(load_checkpoint(tiny_prior), tiny_preset, "tiny", "rtb", first, progress=False)
    ck = load_checkpoint(first)
    frozen = tiny_preset.updated("finetune", steps=1, lr=1e-30, lr_logz=1e-30)
    second = tmp_path / "tpcl.safetensors"
    finetune(ck, frozen, "tiny", "trust-pcl", second, progress=False)
    ck2 = load_checkpoint(second)
    for k, v in ck.section("policy").items():
        torch.testing.assert_close(ck2.section("policy")[k], v, rtol=0, atol=1e-20)
    assert ck2.scalar("v_soft_s0") == pytest.approx(ck.scalar("log_z") / tiny_preset.beta, rel=1e-6)


def test_reward_returning_nan_is_an_input_error(tmp_path, tiny_prior, tiny_preset):
    (tmp_path / "nan.py").write_text("import torch\ndef log_reward(x):\n    return torch.full(x.shape[:-1], float('nan'))\n")
    preset = tiny_preset.model_copy(update={"reward": None}).model_dump()
    preset["reward"] = {"type": "python", "function": str(tmp_path / "nan.py") + ":log_reward"}
    from rtbcli.config import Preset

    out = tmp_path / "x.safetensors"
    with pytest.raises(InputError, match="NaN or inf on 256 of 256 samples of the prior"):
        finetune(load_checkpoint(tiny_prior), Preset.model_validate(preset), "tiny", "rtb", out, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- issue 13's fixes
def test_legacy_rl_refuses_beta_other_than_one(tmp_path, tiny_prior, tiny_preset):
    out = tmp_path / "x.safetensors"
    with pytest.raises(InputError, match="legacy-rl ignores beta.*run it at beta = 1"):
        finetune(load_checkpoint(tiny_prior), tiny_preset.updated("", beta=0.5), "tiny", "legacy-rl", out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, [0.0]),
        (2, [0.5, 0.0]),
        (3, [0.5, 0.5 * (1 - 1 / 2.7), 0.0]),
        (5, [0.5, 0.5 * (1 - 1 / 4.5), 0.5 * (1 - 2 / 4.5), 0.5 * (1 - 3 / 4.5), 0.0]),
        (9, [0.5] + [0.5 * (1 - it / 8.1) for it in range(1, 8)] + [0.0]),  # 0.5 (1 - 8 / 8.1) = 0.006 at the last step before the fix
    ],
)
def test_short_runs_end_without_exploration(n, expected):
    assert [exploration_std(it, n, 0.5) for it in range(n)] == pytest.approx(expected, rel=1e-12, abs=0)


def other_means(preset):
    data = preset.model_dump()
    data["prior_data"]["means"][3] = [-10.0, 6.0]
    from rtbcli.config import Preset

    return Preset.model_validate(data)


def test_prior_pretrained_on_other_mixture_data_is_refused_naming_the_difference(tmp_path, tiny_prior, tiny_preset):
    out = tmp_path / "x.safetensors"
    with pytest.raises(InputError, match=r"their means differ \(component 4: \[-10.0, 5.0\] vs \[-10.0, 6.0\]\)"):
        finetune(load_checkpoint(tiny_prior), other_means(tiny_preset), "tiny", "rtb", out, progress=False)
    heavier = tiny_preset.updated("prior_data", weights=[2.0] + [1.0] * 24)
    with pytest.raises(InputError, match="their weights differ"):
        finetune(load_checkpoint(tiny_prior), heavier, "tiny", "rtb", out, progress=False)
    assert not out.exists()
    # the same mixture written with explicit equal weights is the same data
    same = tiny_preset.updated("prior_data", weights=[3.0] * 25).updated("finetune", steps=1, batch_size=8)
    finetune(load_checkpoint(tiny_prior), same, "tiny", "rtb", out, progress=False)
    assert out.exists()


def test_prior_pretrained_on_another_data_file_is_refused(tmp_path, tiny_preset):
    """Data files are the same data by content (SHA-256), not by path."""
    import shutil

    import numpy as np

    from conftest import tiny
    from rtbcli.data import data_preset
    from rtbcli.pretrain import pretrain

    rng = np.random.default_rng(0)
    a, b, a_copy = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "copy" / "a.npy"
    np.save(a, rng.normal(size=(200, 2)) * 3)
    np.save(b, rng.normal(size=(200, 2)) * 3)
    a_copy.parent.mkdir()
    shutil.copyfile(a, a_copy)

    def preset_for(path):
        p = data_preset(path).model_dump()
        p["reward"] = {"type": "mixture", "mixture": {"means": [[1.0, 1.0]], "variance": 2.0}}
        from rtbcli.config import Preset

        return tiny(Preset.model_validate(p)).updated("finetune", steps=1, batch_size=8)

    prior = tmp_path / "prior.safetensors"
    pretrain(preset_for(a), "a", prior, seed=0, progress=False)
    out = tmp_path / "ft.safetensors"
    with pytest.raises(InputError, match=r"pretrained on the data file .*a\.npy \(SHA-256 .*the data file .*b\.npy \(SHA-256"):
        finetune(load_checkpoint(prior), preset_for(b), "b", "rtb", out, progress=False)
    assert not out.exists()
    finetune(load_checkpoint(prior), preset_for(a_copy), "a-copy", "rtb", out, progress=False)
    assert out.exists()


@pytest.mark.parametrize("snis", ["exact", "tempered"])
def test_exact_snis_warns_once_when_its_ess_collapses(tmp_path, tiny_prior, tiny_preset, snis):
    """Exploration s_e = 2 against a step std of 0.7 (T = 10): the exact weights rest on about one
    trajectory. --snis exact warns (once, over two exploring steps); tempered never does."""
    import warnings

    from rtbcli.errors import RtbcliWarning

    preset = tiny_preset.updated("finetune", steps=3, batch_size=32, exploration=2.0, snis=snis)
    log = tmp_path / "log.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(
            load_checkpoint(tiny_prior),
            preset,
            "tiny",
            "reinforce-kl",
            tmp_path / "x.safetensors",
            progress=False,
            log_path=log,
            log_every=1,
        )
    with warnings.catch_warnings(record=True) as unlogged:  # logging only at the last step, which does not explore
        warnings.simplefilter("always")
        finetune(load_checkpoint(tiny_prior), preset, "tiny", "reinforce-kl", tmp_path / "y.safetensors", progress=False, log_every=1000)
    assert [str(w.message) for w in unlogged if issubclass(w.category, RtbcliWarning)] == [
        str(w.message) for w in caught if issubclass(w.category, RtbcliWarning)
    ]
    ours = [w for w in caught if issubclass(w.category, RtbcliWarning)]
    ess = [json.loads(line)["weights_ess"] for line in log.read_text().splitlines()]
    if snis == "exact":
        assert ess[0] < 5 and ess[1] < 5 and ess[2] == pytest.approx(32)  # the last step does not explore: uniform
        assert len(ours) == 1 and "effective sample size fell to" in str(ours[0].message)
    else:
        assert ess[0] > 5 and ess[2] == pytest.approx(32)
        assert ours == []
