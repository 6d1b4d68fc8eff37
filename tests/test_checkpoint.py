"""Checkpoints: safetensors round trips, atomic writes, and clear errors on foreign files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rtbcli
from rtbcli import __version__
from rtbcli.checkpoint import FORMAT_VERSION, READS, base_metadata, load_checkpoint, sampler_tensors, save_checkpoint
from rtbcli.errors import InputError
from rtbcli.sampler import DiffusionSampler
from test_sampler import seeded


def test_round_trip_tensors_and_metadata(tmp_path, tiny_preset):
    s = seeded(0, steps=tiny_preset.sampler.steps, hidden=16, time_features=8).float()
    meta = base_metadata("prior", tiny_preset, "tiny", 42, 7, {"device": "cpu"})
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, sampler_tensors(s, "policy"), meta)
    ck = load_checkpoint(path)
    assert ck.kind == "prior" and ck.step == 42 and ck.meta["seed"] == "7" and ck.preset == tiny_preset
    assert ck.meta["rtbcli_version"] == __version__ and ck.meta["torch_version"] == torch.__version__
    assert json.loads(ck.meta["run"]) == {"device": "cpu"}
    for k, v in s.state_dict().items():
        assert torch.equal(ck.tensors[f"policy.{k}"], v)
    s2 = ck.sampler()
    traj = s.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s2.sample(5, generator=torch.Generator().manual_seed(0)), traj)
    assert len(ck.sha256) == 64


def test_no_pickle_in_the_file(tmp_path, tiny_preset):
    path = tmp_path / "p.safetensors"
    save_checkpoint(
        path,
        sampler_tensors(DiffusionSampler(2, steps=10, hidden=16, time_features=8), "policy"),
        base_metadata("prior", tiny_preset, "tiny", 0, 0, {}),
    )
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])  # plain JSON header, then raw tensor bytes
    assert header["__metadata__"]["format"] == "rtbcli-checkpoint"


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, tiny_preset, monkeypatch):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"old")
    import rtbcli.checkpoint as cp

    def boom(*a, **k):
        with open(a[1], "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(cp, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"a": torch.zeros(1)}, base_metadata("prior", tiny_preset, "tiny", 0, 0, {}))
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "not found"),
        (b"", "not a readable safetensors file"),
        (b"\x00" * 64, "not a readable safetensors file"),
        (b"this is text, not tensors", "not a readable safetensors file"),
    ],
)
def test_missing_or_corrupt_files(tmp_path, content, match):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, tiny_prior):
    data = tiny_prior.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match="not an rtbcli checkpoint"):
        load_checkpoint(path)


def test_wrong_kind(tmp_path, tiny_prior):
    with pytest.raises(InputError, match="is a prior checkpoint, a finetuned one is needed"):
        load_checkpoint(tiny_prior, expect_kind="finetuned")


def test_saved_files_follow_the_umask(tmp_path, tiny_preset):
    import os

    path = tmp_path / "p.safetensors"
    save_checkpoint(path, {"a": torch.zeros(1)}, base_metadata("prior", tiny_preset, "tiny", 0, 0, {}))
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("config,match", [("{not json", "no readable config"), ('{"name": "x"}', "checkpoint config: missing key")])
def test_unreadable_config_in_metadata(tmp_path, tiny_prior, config, match):
    from safetensors import safe_open

    with safe_open(str(tiny_prior), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = config
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InputError, match=match):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- files of earlier versions
DATA = Path(__file__).parent / "data"  # format-1 files written by c07af99 (tests/data/make_v1_files.py)
SHIPPED = sorted((Path(rtbcli.__file__).parent / "data").glob("prior-*.safetensors"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_prior_loads_and_samples(path):
    ck = load_checkpoint(path, expect_kind="prior")
    assert ck.meta["format_version"] in READS and ck.step > 0
    x = ck.sampler("policy").sample(8, 0.0, torch.Generator().manual_seed(0))[-1]
    assert x.shape == (8, ck.preset.dim) and torch.isfinite(x).all()


def copy_v1(tmp_path: Path, stem: str) -> Path:
    for p in DATA.glob(f"{stem}.*"):
        shutil.copyfile(p, tmp_path / p.name)
    return tmp_path / f"{stem}.safetensors"


@pytest.mark.usefixtures("one_thread")
def test_a_version_1_partial_run_resumes_to_the_weights_version_1_finished_with(tmp_path):
    """c07af99 stopped an rtb run (cosine lr, exploration) at step 3 of 6, and also finished it: this
    rtbcli resumes the step-3 files to the same checkpoint, bit for bit, and the same log."""
    from rtbcli.finetune import finetune

    assert len(SHIPPED) >= 3
    partial = load_checkpoint(copy_v1(tmp_path, "v1-rtb.partial"))
    finished = load_checkpoint(DATA / "v1-rtb.safetensors")
    assert partial.meta["format_version"] == finished.meta["format_version"] == "1" and partial.step == 3
    assert finished.learned_log_z() == pytest.approx(finished.scalar("log_z"))
    out = tmp_path / "done.safetensors"
    finetune(partial, partial.preset, "tiny", "rtb", out, progress=False, resume=True, log_path=out.with_suffix(".jsonl"), log_every=1)
    done = load_checkpoint(out)
    assert done.meta["format_version"] == FORMAT_VERSION and done.step == 6
    assert done.tensors.keys() == finished.tensors.keys()
    assert [k for k in done.tensors if not torch.equal(done.tensors[k], finished.tensors[k])] == []
    timing = {"steps_per_s", "seconds"}
    logs = [
        [{k: v for k, v in json.loads(line).items() if k not in timing} for line in p.read_text().splitlines()]
        for p in (out.with_suffix(".jsonl"), DATA / "v1-rtb.jsonl")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 6


@pytest.mark.usefixtures("one_thread")
def test_version_1_finished_runs_extend(tmp_path):
    """A finished version-1 fine-tuning run and pretraining run continue past their end (the
    schedules' length is the planned length version 1 saved)."""
    from rtbcli.finetune import finetune
    from rtbcli.pretrain import pretrain
    from rtbcli.state import load_state

    ft = load_checkpoint(copy_v1(tmp_path, "v1-rtb"))
    finetune(ft, ft.preset.updated("finetune", steps=8), "tiny", "rtb", tmp_path / "more.safetensors", progress=False, resume=True)
    assert load_checkpoint(tmp_path / "more.safetensors").step == 8
    assert load_state(tmp_path / "more.safetensors", "finetune").meta["schedule_steps"] == "6"
    prior = load_checkpoint(copy_v1(tmp_path, "v1-prior"))
    pretrain(prior.preset.updated("pretrain", steps=6), "tiny", tmp_path / "p.safetensors", progress=False, resume_from=prior)
    assert load_checkpoint(tmp_path / "p.safetensors").step == 6
