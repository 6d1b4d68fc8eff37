"""`rtbcli pretrain` of a [sampler.unet] preset: the DDPM epsilon loss by hand, a diffusers folder that diffusers loads
and `finetune --prior DIR` fine-tunes (with the preset's sampling steps), the loop training the UNet, and bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rtbcli.cli import app
from rtbcli.ddpm import schedule_from_config
from rtbcli.presets_loader import load_preset

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rtbcli.unet_pretrain import eps_loss, new_unet  # noqa: E402

TINY = """
name = "tiny-unet"
[prior_data]
dataset = "digits"
split = "train"
scale = 0.125
shift = -1.0
[reward]
type = "python"
function = "rtbcli.rewards.digits:log_p_class"
[reward.kwargs]
digit = 3
[sampler]
sampling_steps = 5
[sampler.unet]
sample_size = 8
in_channels = 1
out_channels = 1
layers_per_block = 1
block_out_channels = [8, 16]
down_block_types = ["DownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "UpBlock2D"]
norm_num_groups = 4
[sampler.scheduler]
num_train_timesteps = 50
clip_sample = true
[pretrain]
steps = 40
batch_size = 32
lr = 3e-3
lr_schedule = "constant"
[finetune]
steps = 2
batch_size = 4
lr = 1e-4
exploration = 0.0
"""


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("unet-preset") / "tiny-unet.toml"
    f.write_text(TINY)
    return f


@pytest.fixture(scope="module")
def trained(preset_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet-run") / "prior-unet"
    code, text = cli("pretrain", "--preset", preset_file, "--out", out, "--json", "-q")
    assert code == 0, text
    return out, json.loads(text.strip().splitlines()[-1])


class _Oracle(torch.nn.Module):
    """eps(x_t, t) = x_t / sqrt(1 - abar_t): the exact epsilon when x0 = 0."""

    def __init__(self, abar):
        super().__init__()
        self.abar = abar

    def forward(self, x, t):
        return x / (1 - self.abar[t])[:, None].sqrt()


def test_the_eps_loss_is_zero_for_the_exact_predictor_and_the_noise_power_for_zero():
    abar = torch.cumprod(1 - schedule_from_config({"num_train_timesteps": 50}).betas(), 0)
    x0 = torch.zeros(4096, 6, dtype=torch.float64)
    assert eps_loss(_Oracle(abar), x0, abar, torch.Generator().manual_seed(0)).item() < 1e-24
    g = torch.Generator().manual_seed(1)
    zero = eps_loss(lambda x, t: torch.zeros_like(x), x0, abar, g)  # E ||eps||^2 / d = 1
    assert abs(zero.item() - 1.0) < 0.02
    # the same draws by hand: t first, then the noise
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    x1 = torch.randn(8, 6, dtype=torch.float64)
    t = torch.randint(0, 50, (8,), generator=g2)
    noise = torch.randn(8, 6, generator=g2, dtype=torch.float64)
    xt = abar[t].sqrt()[:, None] * x1 + (1 - abar[t]).sqrt()[:, None] * noise
    assert torch.allclose(eps_loss(lambda x, s: 0.5 * x, x1, abar, g1), (0.5 * xt - noise).square().mean(), rtol=0, atol=1e-12)


def test_pretrain_writes_a_diffusers_folder_that_finetune_takes(trained, preset_file, tmp_path):
    out, res = trained
    assert res["model_folder"] and res["steps"] == 40 and res["parameters"] > 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "scheduler_config.json", "rtbcli-pretrain.json", "diffusion_pytorch_model.safetensors"} <= names
    assert not any(n.endswith(".bin") for n in names)
    mask = os.umask(0)
    os.umask(mask)  # the folder and its files as a plain mkdir / open makes them, not mkdtemp's private ones
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE((out / n).stat().st_mode) for n in names} == {0o666 & ~mask}
    info = json.loads((out / "rtbcli-pretrain.json").read_text())
    assert info["status"] == "finished" and info["step"] == 40 and info["config"]["sampler"]["unet"]["block_out_channels"] == [8, 16]
    unet = diffusers.UNet2DModel.from_pretrained(str(out), use_safetensors=True)
    assert diffusers.DDPMScheduler.from_pretrained(str(out)).config.num_train_timesteps == 50
    assert sum(p.numel() for p in unet.parameters()) == res["parameters"]
    ck = tmp_path / "ft.safetensors"
    code, text = cli("finetune", "--prior", out, "--preset", preset_file, "--lora-rank", "2", "-o", ck, "--json", "-q")
    assert code == 0, text
    from rtbcli.checkpoint import load_checkpoint

    assert load_checkpoint(ck).preset.sampler.sampling_steps == 5  # the preset's, as no --sampling-steps was given
    from rtbcli.plots import image_shape

    assert image_shape(load_checkpoint(ck)) == (1, 8, 8)  # what --grid draws: the UNet's (C, H, W)
    code, text = cli("sample", ck, "--n", "9", "--out", tmp_path / "s.npy", "--grid", tmp_path / "s.png", "--json")
    assert code == 0 and json.loads(text)["grid"] == str(tmp_path / "s.png"), text
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_image_grid_shows_minus_one_black_and_one_white(tmp_path):
    from matplotlib.image import imread

    from rtbcli.plots import write_image_grid

    for value, lo, hi in ((-1.0, 0.0, 0.05), (1.0, 0.95, 1.0)):
        write_image_grid(tmp_path / "g.png", np.full((1, 64), value), (1, 8, 8))
        px = imread(tmp_path / "g.png")[..., :3]
        assert lo <= px.mean() <= hi, (value, px.mean())


def test_grid_of_a_checkpoint_that_is_not_an_image_model_is_refused(tiny_prior, tmp_path):
    code, text = cli("sample", tiny_prior, "--n", "4", "--out", tmp_path / "s.npy", "--grid", tmp_path / "s.png")
    assert code == 2 and "not an image model" in text, text
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.png").exists()


def test_the_loop_trains_the_unet(trained, preset_file):
    """The saved weights have a lower epsilon loss on the data than the initialisation (same draws)."""
    out, _ = trained
    p, _ = load_preset(str(preset_file))
    from rtbcli.lora import UNetEps
    from rtbcli.tasks import Task

    x0 = Task(p, allow_import=False).data.sample(512, torch.Generator().manual_seed(5))
    abar = torch.cumprod(1 - schedule_from_config({"num_train_timesteps": 50}).betas(), 0).float()
    trained_eps = UNetEps(diffusers.UNet2DModel.from_pretrained(str(out), use_safetensors=True))
    with torch.no_grad():
        before = eps_loss(new_unet(p, 0), x0, abar, torch.Generator().manual_seed(6))
        after = eps_loss(trained_eps, x0, abar, torch.Generator().manual_seed(6))
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
    "edit, extra, match",
    [
        (None, ["--out", "{tmp}/x.safetensors"], "a UNet prior is a diffusers model folder"),
        ("block_out_channels = [8, 16]", ["--out", "{tmp}/p"], "does not build a UNet2DModel"),
        ("sample_size = 8", ["--out", "{tmp}/p"], "d = 36"),
        ("clip_sample = true", ["--out", "{tmp}/p"], "prediction_type"),
        (None, ["--out", "{tmp}/p", "--estimator", "pairs"], "--estimator applies to rtbcli's bridge sampler"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(edit, extra, match, tmp_path):
    text = TINY
    if edit == "block_out_channels = [8, 16]":
        text = text.replace(edit, "block_out_channels = [8, 16]\nno_such_argument = 3")
    elif edit == "sample_size = 8":
        text = text.replace(edit, "sample_size = 6")
    elif edit == "clip_sample = true":
        text = text.replace(edit, 'clip_sample = true\nprediction_type = "v_prediction"')
    f = tmp_path / "p.toml"
    f.write_text(text)
    code, out = cli("pretrain", "--preset", f, *[a.replace("{tmp}", str(tmp_path)) for a in extra], "-q")
    assert code == 2 and match in out and "Traceback" not in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]


def test_an_interrupted_run_leaves_the_weights_so_far_and_says_it_does_not_resume(preset_file, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from rtbcli.cli import run
    from rtbcli.unet_pretrain import UNetPretrainRecipe

    step = UNetPretrainRecipe.step
    calls = {"n": 0}

    def stop_at_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self)

    monkeypatch.setattr(UNetPretrainRecipe, "step", stop_at_5)
    out = tmp_path / "p"
    code = run(["pretrain", "--preset", str(preset_file), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 130 and "does not resume" in err and "--resume" not in err, err
    assert not out.exists() and (tmp_path / "p.partial" / "config.json").is_file()
    info = json.loads((tmp_path / "p.partial" / "rtbcli-pretrain.json").read_text())
    assert info["status"] == "interrupted" and info["step"] == 5
    assert diffusers.UNet2DModel.from_pretrained(str(tmp_path / "p.partial"), use_safetensors=True) is not None
    code = run(["pretrain", "--resume", str(tmp_path / "p.partial")])
    assert code == 2 and "does not resume" in capsys.readouterr().err


def test_evaluate_scores_a_model_folder_as_the_prior_of_a_preset(trained, preset_file, tmp_path):
    out, _ = trained
    code, text = cli("evaluate", out, "--preset", preset_file, "-n", "64", "--json")
    assert code == 0, text
    m = json.loads(text)
    assert m["kind"] == "prior" and m["suite"] == "digits" and m["target"].startswith("p_data (") and "class_fraction_target" not in m
    assert "diversity_target" not in m
    code, text = cli("evaluate", out, "--preset", preset_file, "-n", "64", "--beta", "1", "--json")
    assert code == 0, text
    m = json.loads(text)  # the tilted target p_prior p(3 | x): the prior's share of it by importance weights
    assert m["beta"] == 1.0 and 0 <= m["class_fraction_target"] <= 1 and m["ess_fraction"] > 0
    assert 0 < m["diversity_target"] < float("inf")
    code, text = cli("evaluate", out, "-n", "8")
    assert code == 2 and "give --preset" in text
    code, text = cli("evaluate", out, "--preset", preset_file, "--beta", "0", "-n", "8")
    assert code == 2 and "--beta" in text


def test_the_shipped_digits_unet_prior_is_the_presets_model_with_its_provenance():
    from importlib.resources import files

    from rtbcli.lora import load_model

    folder = Path(str(files("rtbcli") / "data" / "prior-digits-unet"))
    info = json.loads((folder / "rtbcli-pretrain.json").read_text())
    p, _ = load_preset("digits-unet")
    assert info["status"] == "finished" and info["step"] == p.pretrain.steps and info["preset"] == "digits-unet"
    assert info["config"]["sampler"]["unet"] == p.sampler.unet and info["config"]["sampler"]["scheduler"] == p.sampler.scheduler
    eps, schedule, _ = load_model(folder, p.sampler.sampling_steps)
    assert eps.dim == p.dim == 64 and schedule.steps == 50 and schedule.clip_sample
