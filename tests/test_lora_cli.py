"""`rtbcli finetune --prior DIR` for a diffusers model folder, with and without LoRA, resumed, evaluated,
sampled and merged (`rtbcli merge`) into a folder diffusers loads; its bad input is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import to_toml
from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.ddpm import DDPMSampler, Schedule
from rtbcli.lora import load_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from tests.test_lora import tiny_unet  # noqa: E402  (the same tiny UNet2DModel, once diffusers is known present)

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = """
def log_reward(x):
    return -(x.mean(-1) - 0.5).pow(2) * 10
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_cli")
    tiny_unet().save_pretrained(str(d / "model"))
    diffusers.DDPMScheduler(num_train_timesteps=20, beta_end=0.2).save_pretrained(str(d / "model"))
    np.save(d / "images.npy", np.random.default_rng(0).uniform(-1, 1, (60, 64)).astype(np.float32))
    (d / "reward.py").write_text(REWARD)
    preset = {
        "name": "images",
        "prior_data": {"path": "images.npy"},
        "reward": {"type": "python", "function": "reward.py:log_reward"},
        "finetune": {"steps": 3, "batch_size": 4, "exploration": 0.01},
        "evaluate": {"n": 16},
    }
    (d / "images.toml").write_text(to_toml(preset))
    return d


def cli(*args) -> int:
    return run([str(a) for a in args])


def finetune(files, out, *extra) -> int:
    return cli("finetune", "--prior", files / "model", "--preset", files / "images.toml", "--sampling-steps", 4, "--out", out, "-q",
               "--device", "cpu", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def runs(files):
    lora, full, more = files / "lora.safetensors", files / "full.safetensors", files / "more.safetensors"
    assert finetune(files, lora, "--lora-rank", 2) == 0
    assert finetune(files, full) == 0
    reward = f"{files / 'reward.py'}:log_reward"
    assert cli("finetune", "--resume", lora, "--reward", reward, "--steps", 5, "--out", more, "-q", "--device", "cpu") == 0
    return {"lora": lora, "full": full, "more": more}


def test_lora_and_full_finetuning_of_a_diffusers_folder_save_what_they_train(runs, files):
    lora, full = load_file(str(runs["lora"])), load_file(str(runs["full"]))
    assert not any(k.startswith("prior.") for k in (*lora, *full))  # the frozen prior is the folder itself
    adapters = [k for k in lora if k.startswith("policy.")]
    assert adapters and all("lora_" in k for k in adapters)
    assert any(float(lora[k].abs().sum()) > 0 for k in adapters if "lora_B" in k)  # the adapters moved from 0
    base = diffusers.UNet2DModel.from_pretrained(str(files / "model")).state_dict()
    policy = {k[len("policy.net.unet.") :]: v for k, v in full.items() if k.startswith("policy.")}
    assert set(policy) == set(base) and any(not torch.equal(policy[k], base[k]) for k in base)
    spec = json.loads(load_checkpoint(runs["lora"]).meta["config"])["sampler"]
    assert spec["model"] == str(files / "model") and spec["lora_rank"] == 2 and len(spec["model_sha256"]) == 64
    assert load_checkpoint(runs["more"]).step == 5


def test_the_prior_s_batches_train_lora_adapters_on_the_ddpm_path(files, tmp_path):
    out = tmp_path / "p.safetensors"
    assert finetune(files, out, "--lora-rank", 2, "--algo", "vargrad", "--prior-every", 2, "--steps", 2) == 0
    last = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[-1])
    assert last["prior_batch"] is True and last["step"] == 2  # step 2 (the second) trained on the base model's own batch
    lora = load_file(str(out))
    assert any(float(lora[k].abs().sum()) > 0 for k in lora if "lora_B" in k)


def test_replay_draws_the_ddpm_s_noising_trajectories_of_buffer_states(files, tmp_path, monkeypatch):
    drawn = []
    noise = DDPMSampler.noise_trajectories

    def spy(self, x0, generator=None):
        traj = noise(self, x0, generator)
        drawn.append((x0.clone(), traj.clone()))
        return traj

    monkeypatch.setattr(DDPMSampler, "noise_trajectories", spy)
    out = tmp_path / "r.safetensors"
    assert finetune(files, out, "--lora-rank", 2, "--algo", "vargrad", "--replay", "--steps", 4) == 0
    last = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[-1])
    assert last["replayed"] is True and last["step"] == 4 and last["buffer"] == 2 * 4  # two forward batches fed it
    replays = [(x, t) for x, t in drawn if len(x) == 4]  # the batch's (evaluation draws its own n)
    assert len(replays) == 2  # one noising draw per replay step: the bridge is not this sampler's backward process
    for x, traj in replays:
        assert traj.shape == (5, 4, 64) and torch.equal(traj[-1], x)  # 4 strided steps ending at the buffer's states
    lora = load_file(str(out))
    assert any(float(lora[k].abs().sum()) > 0 for k in lora if "lora_B" in k)


def test_a_diffusers_run_evaluates_samples_and_merges_into_a_folder_diffusers_loads(runs, files, tmp_path, capsys):
    capsys.readouterr()
    assert cli("evaluate", runs["more"], "--reward", f"{files / 'reward.py'}:log_reward", "--n", 8, "--json", "--device", "cpu") == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 64
    assert cli("sample", runs["more"], "--n", 3, "--out", tmp_path / "x.npy", "--device", "cpu") == 0
    assert np.load(tmp_path / "x.npy").shape == (3, 64)
    assert cli("merge", runs["more"], "--out", tmp_path / "merged") == 0
    merged = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in merged.state_dict())
    policy = load_checkpoint(runs["more"]).sampler("policy")
    eps, sched, _ = load_model(tmp_path / "merged", sampling_steps=4)
    a = policy.sample(3, 0.0, torch.Generator().manual_seed(1))[-1]
    b = DDPMSampler(64, sched, eps).sample(3, 0.0, torch.Generator().manual_seed(1))[-1]
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--lora-rank", "0"], "--lora-rank must be a positive rank"),
        (["--lora-rank", "2", "--lora-target", "nothing_here"], "match no module of the UNet"),
        (["--lora-alpha", "4"], "give --lora-rank too"),
        (["--lora-rank", "2", "--lora-alpha", "0"], "--lora-alpha"),  # was an "unexpected ValidationError", exit 1
        (["--lora-rank", "2", "--lora-target", "norm1"], "is a GroupNorm: name some of the UNet's Conv2d or Linear"),
        (["--matmul-dtype", "bfloat16"], "--matmul-dtype bfloat16 applies to rtbcli's bridge sampler"),
    ],
)
def test_bad_lora_options_are_one_line_errors(extra, match, files, tmp_path, capsys):
    capsys.readouterr()
    assert finetune(files, tmp_path / "o.safetensors", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_bad_folders_and_options_are_one_line_errors(files, tiny_prior, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    ddim = tmp_path / "ddim"
    tiny_unet().save_pretrained(str(ddim))
    diffusers.DDIMScheduler().save_pretrained(str(ddim))
    pickled = tmp_path / "pickled"  # weights as a .bin (a pickle): refused, never loaded
    tiny_unet().save_pretrained(str(pickled), safe_serialization=False)
    diffusers.DDPMScheduler(num_train_timesteps=20, beta_end=0.2).save_pretrained(str(pickled))
    cases = [
        (["finetune", "--prior", pickled, "--preset", files / "images.toml"], "rtbcli never loads pickled ones (.bin)"),
        (["finetune", "--prior", tmp_path / "empty", "--preset", files / "images.toml"], "is not a diffusers model folder"),
        (["finetune", "--prior", ddim, "--preset", files / "images.toml"], "is a DDIMScheduler: rtbcli supports DDPMScheduler"),
        (["finetune", "--prior", files / "model"], "give --preset"),
        (["finetune", "--prior", tiny_prior, "--lora-rank", "4"], "--lora-rank applies to a diffusers model folder"),
        (["finetune", "--prior", files / "model", "--preset", "reference"], "(d = 64), the preset's data have d = 2"),
        (["merge", tiny_prior, "--out", tmp_path / "m"], "is a prior checkpoint"),
    ]
    for name, config in (("list", "[1, 2]"), ("text", '{"num_train_timesteps": "abc"}'), ("beta", '{"beta_end": 2.0}')):
        folder = tmp_path / f"sched-{name}"  # a damaged scheduler config: one line each (were exit 1, or NaN tables)
        tiny_unet().save_pretrained(str(folder))
        (folder / "scheduler_config.json").write_text(config)
        match = {
            "list": "holds a JSON list, not an object",
            "text": "num_train_timesteps = 'abc': give a number",
            "beta": "betas outside (0, 1)",
        }
        cases.append((["finetune", "--prior", folder, "--preset", files / "images.toml"], match[name]))
    for args, match in cases:
        capsys.readouterr()
        code = cli(*args) if args[0] == "merge" else cli(*args, "--out", tmp_path / "o.safetensors", "-q")
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "m").exists()


def test_a_changed_model_folder_is_refused(runs, files, tmp_path, capsys):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(files / "model", copy)
    ck = load_checkpoint(runs["lora"])
    data = json.loads(ck.meta["config"])
    data["sampler"]["model"] = str(copy)
    from rtbcli.config import Preset

    ck.preset = Preset.model_validate(data)
    assert isinstance(ck.sampler("policy"), DDPMSampler)  # the same files elsewhere: the same SHA-256
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")  # one byte more
    from rtbcli.errors import InputError

    with pytest.raises(InputError, match="is not the folder the run was made with"):
        ck.sampler("policy")


def test_the_run_reports_trainable_parameters_and_peak_memory(files, tmp_path, capsys):
    got = {}
    for name, extra in (("lora", ["--lora-rank", "2"]), ("full", [])):
        capsys.readouterr()
        assert finetune(files, tmp_path / f"{name}.safetensors", "--steps", 1, "--json", *extra) == 0
        got[name] = json.loads(capsys.readouterr().out)
    unet = diffusers.UNet2DModel.from_pretrained(str(files / "model"))
    assert got["full"]["trainable_parameters"] == sum(p.numel() for p in unet.parameters())
    assert 0 < got["lora"]["trainable_parameters"] < got["full"]["trainable_parameters"] / 4
    assert got["lora"]["peak_memory_mb"] > 0


def test_evaluate_samples_a_folder_with_the_sampling_steps_it_is_given(files, tmp_path, monkeypatch, capsys):
    steps = []
    sample = DDPMSampler.sample

    def spy(self, n, extra_var=0.0, generator=None):
        steps.append(self.steps)
        return sample(self, n, extra_var, generator)

    monkeypatch.setattr(DDPMSampler, "sample", spy)
    preset = files / "images.toml"
    assert cli("evaluate", files / "model", "--preset", preset, "--n", 8, "--json", "--device", "cpu") == 0
    assert cli("evaluate", files / "model", "--preset", preset, "--sampling-steps", 3, "--n", 8, "--json", "--device", "cpu") == 0
    assert set(steps[: len(steps) // 2]) == {20} and set(steps[len(steps) // 2 :]) == {3}  # the scheduler's 20, then 3
    capsys.readouterr()
    assert cli("evaluate", files / "model", "--preset", preset, "--sampling-steps", 0, "--n", 8, "--device", "cpu") == 2
    assert cli("evaluate", files / "x.safetensors", "--sampling-steps", 3, "--n", 8, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 2
        and "--sampling-steps must be a positive" in err[0]
        and "--sampling-steps applies to a diffusers model folder" in err[1]
    ), err
    # a prior evaluated with fewer sampling steps than a preset's prior tail: no policy, so no tail to leave room for
    tailed = files / "tailed.toml"  # a UNet preset with a tail of 5, beside its data file
    tailed.write_text(
        preset.read_text().replace("[finetune]", "[sampler]\nprior_tail_steps = 5\n[sampler.unet]\nsample_size = 8\n\n[finetune]")
    )
    assert cli("evaluate", files / "model", "--preset", tailed, "--sampling-steps", 3, "--n", 8, "--json", "--device", "cpu") == 0
    capsys.readouterr()
    assert finetune(files, tmp_path / "o.safetensors", "--sampling-steps", 500) == 2  # more than the scheduler's 20
    assert finetune(files, tmp_path / "o.safetensors", "--sampling-steps", -1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--sampling-steps" in err[1] and not (tmp_path / "o.safetensors").exists(), err


def test_eta_gives_ddim_steps_to_finetuning_and_evaluation(files, tmp_path, monkeypatch, capsys):
    etas = []
    init = DDPMSampler.__init__

    def spy(self, dim, schedule, net):
        etas.append(schedule.eta)
        init(self, dim, schedule, net)

    monkeypatch.setattr(DDPMSampler, "__init__", spy)
    out = tmp_path / "ddim.safetensors"
    assert finetune(files, out, "--eta", 0.5) == 0
    assert etas and set(etas) == {0.5}  # the policy and the frozen prior both take DDIM's steps
    ck = load_checkpoint(out)
    assert ck.preset.sampler.eta == 0.5
    policy = ck.sampler("policy")
    torch.testing.assert_close(
        policy.step_var[:, 0].double(), Schedule(train_steps=20, beta_end=0.2, sampling_steps=4, eta=0.5).tables()["var"]
    )
    etas.clear()
    reward = f"{files / 'reward.py'}:log_reward"
    assert cli("evaluate", out, "--reward", reward, "--n", 8, "--json", "--device", "cpu") == 0
    assert cli("evaluate", files / "model", "--preset", files / "images.toml", "--eta", 0.3, "--n", 8, "--json", "--device", "cpu") == 0
    assert etas and set(etas[: len(etas) // 2]) == {0.5} and set(etas[len(etas) // 2 :]) == {0.3}
    capsys.readouterr()
    for bad in (0, 1.5):
        assert finetune(files, tmp_path / "o.safetensors", "--eta", bad) == 2
    assert cli("evaluate", out, "--reward", reward, "--eta", 0.5, "--n", 8, "--device", "cpu") == 2
    assert (
        cli("finetune", "--resume", out, "--reward", reward, "--eta", 0.5, "--out", tmp_path / "o.safetensors", "-q", "--device", "cpu")
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and not (tmp_path / "o.safetensors").exists(), err
    assert all("--eta must be in (0, 1]" in line for line in err[:2]) and all(
        "--eta applies to a diffusers model folder" in e for e in err[2:]
    ), err


@pytest.mark.parametrize("lora", [True, False])
def test_prior_tail_steps_keep_the_prior_s_last_steps_in_the_loop_and_the_checkpoint(files, tmp_path, monkeypatch, capsys, lora):
    calls = []
    prior_eps = DDPMSampler.prior_eps

    def spy(self, x, k):
        calls.append(sorted(set(k.tolist())))
        return prior_eps(self, x, k)

    monkeypatch.setattr(DDPMSampler, "prior_eps", spy)
    out = tmp_path / "tail.safetensors"
    assert finetune(files, out, "--prior-tail-steps", 2, *(["--lora-rank", 2] if lora else ["--lr", 1e-3])) == 0
    assert calls and all(set(c) <= {2, 3} for c in calls)  # the loop's policy took the prior's epsilon at steps 2, 3 of 4
    ck = load_checkpoint(out)
    assert ck.preset.sampler.prior_tail_steps == 2
    policy, prior = ck.sampler("policy"), ck.sampler("prior")
    traj = policy.sample(6, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = policy.step_log_probs(traj) - prior.step_log_probs(traj)
    assert float(diff[:2].abs().max()) > 1e-4 and float(diff[2:].abs().max()) < 1e-3  # float32 passes of one network
    capsys.readouterr()
    assert cli("merge", out, "--out", tmp_path / "merged") == 0  # a folder cannot say it: merged, with a warning
    assert "kept the prior's epsilon for its last 2 sampling steps" in capsys.readouterr().err


def test_prior_tail_steps_bad_values_are_one_line_errors(files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert finetune(files, out, "--prior-tail-steps", 4, "--lora-rank", 2) == 2  # as many as the 4 sampling steps
    assert finetune(files, out, "--prior-tail-steps", -1, "--lora-rank", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 2 and "prior_tail_steps 4 must be between 0 and the 4" in err[0] and "--prior-tail-steps must be 0 or more" in err[1]
    ), err
    assert not out.exists()


def test_a_preset_s_prior_tail_is_the_default_and_the_option_switches_it_off(files, tmp_path, monkeypatch):
    calls = []
    prior_eps = DDPMSampler.prior_eps
    monkeypatch.setattr(DDPMSampler, "prior_eps", lambda self, x, k: calls.append(1) or prior_eps(self, x, k))
    text = (files / "images.toml").read_text()
    preset = files / "tail.toml"  # beside its data file
    preset.write_text(
        text.replace("[finetune]", "[sampler]\nprior_tail_steps = 1\n[sampler.unet]\nsample_size = 8\n\n[finetune]")
    )  # a UNet preset
    out = tmp_path / "on.safetensors"
    args = ("finetune", "--prior", files / "model", "--preset", preset, "--sampling-steps", 4, "-q", "--device", "cpu", "--lora-rank", 2)
    assert cli(*args, "--out", out) == 0 and calls  # the preset's [sampler] prior_tail_steps, used in the loop
    assert load_checkpoint(out).preset.sampler.prior_tail_steps == 1
    calls.clear()
    assert cli(*args, "--out", tmp_path / "off.safetensors", "--prior-tail-steps", 0) == 0 and not calls
    assert load_checkpoint(tmp_path / "off.safetensors").preset.sampler.prior_tail_steps == 0
