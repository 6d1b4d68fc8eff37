"""A diffusers UNet2DModel from a save_pretrained folder as a DDPM prior, with LoRA adapters (peft):
only the adapters train, a merged folder loads in diffusers and samples as the adapter model does,
and bad folders, schedulers and LoRA options are one-line InputErrors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rtbcli.ddpm import DDPMSampler
from rtbcli.errors import InputError
from rtbcli.lora import DEFAULT_TARGETS, add_lora, counts, load_model, merged_folder, model_folders
from rtbcli.rollout import Workspace, policy_grad, rollout

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        add_attention=False,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random UNet2DModel and a DDPMScheduler saved with save_pretrained (no hub)."""
    d = tmp_path_factory.mktemp("unet") / "model"
    tiny_unet().save_pretrained(str(d))
    diffusers.DDPMScheduler(num_train_timesteps=50, clip_sample=False).save_pretrained(str(d))
    return d


def test_a_unet_folder_and_a_pipeline_folder_load_as_ddpm_samplers(folder, tmp_path):
    eps, sched, _ = load_model(folder, sampling_steps=5)
    s = DDPMSampler(eps.dim, sched, eps)
    assert eps.dim == 64 and s.steps == 5
    traj = s.sample(3, 0.0, torch.Generator().manual_seed(0))
    assert traj.shape == (6, 3, 64) and torch.isfinite(traj).all()
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(str(tmp_path / "pipe"))
    eps2, sched2, cfg2 = load_model(tmp_path / "pipe")
    assert sched2.steps == 50 and sched2.clip_sample is True and cfg2["num_train_timesteps"] == 50
    x = torch.randn(2, 64)
    t = torch.tensor([3, 40])
    torch.testing.assert_close(eps2(x, t), eps.unet(x.view(2, 1, 8, 8), t).sample.view(2, 64), rtol=0, atol=0)


def test_lora_trains_only_the_adapters_and_the_merged_folder_samples_the_same(folder, tmp_path):
    eps, sched, cfg = load_model(folder, sampling_steps=5)
    base = {k: v.clone() for k, v in eps.unet.state_dict().items()}
    add_lora(eps, rank=4)
    c = counts(eps)
    assert 0 < c["trainable_parameters"] < c["parameters"] / 4
    s = DDPMSampler(eps.dim, sched, eps)
    x = torch.randn(2, 64)
    # the adapters start at zero: the model is the base model
    torch.testing.assert_close(s.eps(x, torch.tensor([0, 3])), UNetEpsOf(base)(x, s._t("timesteps")[[0, 3]]), rtol=0, atol=0)
    opt = torch.optim.Adam([p for p in s.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ro = rollout(s, Workspace(s, 4), 0.0, torch.Generator().manual_seed(step))
        opt.zero_grad()
        policy_grad(ro, torch.ones(s.steps, 4))
        opt.step()
    lora = {k: v for k, v in eps.unet.state_dict().items() if "lora_" in k}
    assert lora and any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)
    for k, v in eps.unet.state_dict().items():
        if "lora_" not in k:
            name = k.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(v, base[name]), k  # the base weights, bit-identical
    before = s.sample(3, 0.0, torch.Generator().manual_seed(9))[-1]
    out = merged_folder(eps, cfg, tmp_path / "merged")
    merged = diffusers.UNet2DModel.from_pretrained(str(out), local_files_only=True)
    assert json.loads((out / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    eps_m, sched_m, _ = load_model(out, sampling_steps=5)
    after = DDPMSampler(64, sched_m, eps_m).sample(3, 0.0, torch.Generator().manual_seed(9))[-1]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def UNetEpsOf(state):
    from rtbcli.lora import UNetEps

    u = tiny_unet()
    u.load_state_dict(state)
    return UNetEps(u)


def test_bad_folders_schedulers_and_lora_options_are_named(folder, tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        model_folders(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is not a diffusers model folder"):
        model_folders(tmp_path / "empty")
    ddim = tmp_path / "ddim"
    tiny_unet().save_pretrained(str(ddim))
    diffusers.DDIMScheduler().save_pretrained(str(ddim))
    with pytest.raises(InputError, match="is a DDIMScheduler: rtbcli supports DDPMScheduler"):
        load_model(ddim)
    v = tmp_path / "v"
    tiny_unet().save_pretrained(str(v))
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained(str(v))
    with pytest.raises(InputError, match="prediction_type = 'v_prediction'"):
        load_model(v)
    eps, _, _ = load_model(folder)
    with pytest.raises(InputError, match="--lora-rank must be a positive rank"):
        add_lora(eps, 0)
    with pytest.raises(InputError, match="match no module"):
        add_lora(eps, 2, target_modules=["nothing_here"])
    assert "time_emb_proj" in DEFAULT_TARGETS
    with pytest.raises(InputError, match="exists"):
        merged_folder(eps, {}, folder)


def test_missing_diffusers_names_the_extra(monkeypatch, folder):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(InputError, match='pip install "rtbcli\\[diffusers\\]"'):
        load_model(folder)
