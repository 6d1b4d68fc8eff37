"""How tests/data/v1-* were made: with rtbcli at commit c07af99 (checkpoint and state format version 1).

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/data/make_v1_files.py

A tiny prior (4 pretraining steps, with its state) and an rtb run of 6 planned steps on it (cosine
lr, exploration), logged every step: `v1-rtb.partial.*` is what its save at step 3 left (what a
killed run leaves), `v1-rtb.*` the finished run with its state and log. tests/test_checkpoint.py
checks that they still load, and that the partial run resumes to the very weights this version
finished with. Kept for the record: rerun with a later rtbcli it writes that version's format.
"""

from pathlib import Path

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.config import load_preset
from rtbcli.finetune import finetune
from rtbcli.pretrain import pretrain
from rtbcli.training import RunPaths

HERE = Path(__file__).resolve().parent


def preset():
    p = load_preset("reference")[0]
    p = p.updated("sampler", steps=10, hidden=16, time_features=8, layers=2)
    p = p.updated("pretrain", steps=4, batch_size=32)
    return p.updated("finetune", steps=6, batch_size=16, lr=1e-2, lr_schedule="cosine", lr_final=1e-3, exploration=0.5)


def main():
    torch.set_num_threads(1)
    p = preset()
    pretrain(p, "tiny", HERE / "v1-prior.safetensors", seed=0, progress=False, log_path=HERE / "v1-prior.jsonl")
    RunPaths.remove_partial = lambda self: None  # keep the step-3 save beside the finished run
    finetune(
        load_checkpoint(HERE / "v1-prior.safetensors"),
        p,
        "tiny",
        "rtb",
        HERE / "v1-rtb.safetensors",
        seed=3,
        progress=False,
        log_path=HERE / "v1-rtb.jsonl",
        log_every=1,
        save_every=3,
    )


if __name__ == "__main__":
    main()
