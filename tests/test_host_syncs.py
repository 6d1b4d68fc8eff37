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


@pytest.mark.parametrize("algo", list(OBJECTIVES))
def test_finetune_steps_read_nothing_back(algo, tiny_prior, tiny_preset, tmp_path):
    prior = load_checkpoint(tiny_prior)

    def run_for(steps):
        preset = tiny_preset.updated("finetune", steps=steps)
        finetune(prior, preset, "tiny", algo, tmp_path / f"{steps}.safetensors", seed=1, progress=False, log_every=steps, save_every=0)

    short, long = reads_of(run_for)
    assert sum(short.values()) > 0  # the counting sees the logging and the saving
    assert long == short, (short, long)


def test_pretrain_steps_read_nothing_back(tiny_preset, tmp_path):
    def run_for(steps):
        pretrain(
            tiny_preset.updated("pretrain", steps=steps),
            "tiny",
            tmp_path / f"{steps}.safetensors",
            seed=1,
            progress=False,
            log_every=steps,
            save_every=0,
        )

    short, long = reads_of(run_for)
    assert sum(short.values()) > 0
    assert long == short, (short, long)
