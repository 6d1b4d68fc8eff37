"""Nothing in a training loop reads a tensor back to the host except at logging.

On CUDA every such read (`.item()`, `float(t)`, `bool(t)`, `.cpu()`, ...) waits for the device. On
the CPU they cost nothing, but the same Python calls can be counted: a run of 9 steps that logs
once makes exactly the reads of a run of 3 steps that logs once, so no step makes any. Counted are
the reads that rtbcli's own code makes (torch's Adam reads its step counter, which it keeps on the
CPU for that reason).
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.finetune import finetune
from rtbcli.objectives import OBJECTIVES
from rtbcli.pretrain import pretrain

READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")
PACKAGE = str(Path(__import__("rtbcli").__file__).parent)


@contextmanager
def host_reads():
    """Count the calls from rtbcli's code of every tensor method that reads a tensor back to the host."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, method):
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                counts[f"{name} {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return method(self, *args, **kwargs)

        return call

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def reads_of(run_for) -> tuple[Counter, Counter]:
    counts = []
    for steps in (3, 9):
        with host_reads() as c:
            run_for(steps)
        counts.append(c)
    return counts[0], counts[1]


def assert_steps_read_nothing(run_for) -> None:
    """A run of 9 steps makes exactly the host reads of a run of 3 (both logging once, at their end)."""
    short, long = reads_of(run_for)
    assert sum(short.values()) > 0  # the counting sees the logging and the saving
    assert long == short, (short, long)


@pytest.mark.parametrize("algo", list(OBJECTIVES))
def test_finetune_steps_read_nothing_back(algo, tiny_prior, tiny_preset, tmp_path):
    prior = load_checkpoint(tiny_prior)

    def run_for(steps):
        preset = tiny_preset.updated("finetune", steps=steps)
        finetune(prior, preset, "tiny", algo, tmp_path / f"{steps}.safetensors", seed=1, progress=False, log_every=steps, save_every=0)

    assert_steps_read_nothing(run_for)


def tiny_unet_preset():
    """The digits-unet preset with a tiny UNet (8/16 channels), 50 training steps sampled in 5, the last 2 the prior's."""
    from rtbcli.presets_loader import load_preset

    p = load_preset("digits-unet")[0]
    unet = {**p.sampler.unet, "block_out_channels": [8, 16], "norm_num_groups": 4}
    sched = {**p.sampler.scheduler, "num_train_timesteps": 50}
    p = p.updated("sampler", unet=unet, scheduler=sched, sampling_steps=5, prior_tail_steps=2)
    return p.updated("finetune", batch_size=4).updated("pretrain", batch_size=8)


@pytest.mark.parametrize("lora_rank", [None, 2], ids=["full", "lora"])
def test_a_diffusers_unet_finetune_step_reads_nothing_back(lora_rank, tmp_path):
    """The DDPM path (a diffusers UNet folder, full and LoRA, with a prior tail) keeps the loop's rule."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from rtbcli.model_prior import folder_checkpoint
    from rtbcli.unet_pretrain import pretrain_unet

    preset = tiny_unet_preset()
    folder = tmp_path / "prior"
    pretrain_unet(preset.updated("pretrain", steps=1), "tiny-unet", folder, seed=0, progress=False, save_every=0)
    start = folder_checkpoint(folder, preset, None, lora_rank, None, None)

    def run_for(steps):
        p = start.preset.updated("finetune", steps=steps)
        finetune(start, p, "tiny-unet", "vargrad", tmp_path / f"{steps}.safetensors", seed=1, progress=False, log_every=steps, save_every=0)

    assert_steps_read_nothing(run_for)


@pytest.mark.parametrize("network", ["driftnet", "unet"])
def test_pretrain_steps_read_nothing_back(network, tiny_preset, tmp_path):
    """DriftNet's pinned-bridge pretraining and a diffusers UNet's epsilon-MSE pretraining."""
    if network == "unet":
        pytest.importorskip("diffusers")
        from rtbcli.unet_pretrain import pretrain_unet

        preset, train, suffix = tiny_unet_preset(), pretrain_unet, ""
    else:
        preset, train, suffix = tiny_preset, pretrain, ".safetensors"

    def run_for(steps):
        train(
            preset.updated("pretrain", steps=steps),
            "tiny",
            tmp_path / f"{steps}{suffix}",
            seed=1,
            progress=False,
            log_every=steps,
            save_every=0,
        )

    assert_steps_read_nothing(run_for)
