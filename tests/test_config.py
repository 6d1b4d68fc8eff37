"""Presets: shipped ones load; bad files get a one-line error naming the key and the file."""

from __future__ import annotations

import pytest

from conftest import to_toml
from rtbcli.cli import run
from rtbcli.config import Preset
from rtbcli.errors import InputError
from rtbcli.preset_toml import render_preset
from rtbcli.presets_loader import load_preset, parse_preset, shipped_presets
from rtbcli.tasks import Task

NESTED_KWARGS = {
    "digit": 3,
    "flag": True,
    "scale": 1e-5,
    "far": float("inf"),
    "empty": [],
    "none_left": {},
    "quote": 'say "hi" and it\'s \\ done',
    "lines": "two\nlines\ttab",
    "unicode": "r\u00e9compense \u2713",
    "nested": {"a": [1, 2.5, "x"], "deep": {"q": '"quoted" key value', "rows": [[1, 2], [3, 4]]}},
    "list_of_tables": [{"k": 1}, {"k": [2, 3], "inner": {"z": "w"}}],
    "key with spaces": 'and "quotes"',
}


def test_reference_preset_is_the_design_task(reference):
    assert "reference" in shipped_presets()
    assert reference.beta == 1.0 and reference.dim == 2
    assert len(reference.prior_data.means) == 25 and reference.prior_data.variance == 0.3
    assert sorted(map(tuple, reference.reward.mixture.means)) == sorted(
        [(-10, -5), (-5, -10), (-5, 0), (10, -5), (0, 0), (0, 5), (5, -5), (5, 0), (5, 10)]
    )
    assert reference.reward.mixture.weights == [4, 10, 4, 5, 10, 5, 4, 15, 4]
    s = reference.sampler
    assert (s.steps, s.sigma2, s.hidden, s.time_features) == (100, 5.0, 64, 64)
    pt = reference.pretrain
    assert (pt.steps, pt.batch_size, pt.lr, pt.lr_schedule, pt.estimator) == (10_000, 500, 5e-3, "wsd", "pairs")
    f = reference.finetune
    assert (f.steps, f.batch_size, f.lr, f.lr_logz, f.exploration) == (5000, 500, 1e-3, 0.1, 0.5)


def test_default_preset_is_reference(reference):
    assert load_preset(None)[0] == reference


def test_preset_by_path(tmp_path, reference):
    path = tmp_path / "mine.toml"
    path.write_text(to_toml(reference.updated("", beta=2.0).model_dump()))
    p, ref = load_preset(str(path))
    assert p.beta == 2.0 and ref == str(path)


def test_reward_is_log_p9_minus_log_p25(reference):
    import torch

    task = Task(reference)
    x = torch.tensor([[5.0, 0.0], [10.0, 10.0]], dtype=torch.float64)
    expected = task.reward_mixture.log_prob(x) - task.prior_data.log_prob(x)
    torch.testing.assert_close(task.log_reward(x), expected)
    # at the heaviest mode, r = (15/61) / (1/25) up to the other modes' negligible overlap
    assert task.log_reward(x)[0].item() == pytest.approx(torch.log(torch.tensor(15 / 61 * 25)).item(), abs=1e-6)
    assert task.log_reward(x)[1].item() < -30  # a masked mode


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(colour="red"), r"unknown key 'colour'"),
        (lambda d: d["sampler"].update(stepz=3), r"unknown key 'sampler.stepz'"),
        (lambda d: d["sampler"].update(steps="many"), r"bad value for 'sampler.steps'"),
        (lambda d: d.update(beta=-1.0), r"bad value for 'beta'"),
        (lambda d: d["prior_data"].update(weights=[1.0]), r"1 weights for 25 means"),
        (lambda d: d.pop("prior_data"), r"missing key 'prior_data'"),
    ],
)
def test_bad_preset_files_name_the_key_and_the_file(tmp_path, reference, edit, match):
    data = reference.model_dump()
    edit(data)
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(data))
    with pytest.raises(InputError, match=match) as e:
        load_preset(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_key_is_named_before_missing_ones(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[sampler]\nbogus = 1\n")  # sampler.bogus is unknown; name, beta, ... are missing
    with pytest.raises(InputError, match=r"unknown key 'sampler.bogus' \(and \d+ more problems\)"):
        load_preset(str(path))


def test_unknown_preset_name_lists_the_shipped_ones():
    with pytest.raises(
        InputError,
        match="unknown preset .nope.: choose one of digits, digits-unet, funnel, gmm25-energy, manywell-energy, manywell32, reference",
    ):
        load_preset("nope")


def test_invalid_toml(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("beta = = 1")
    with pytest.raises(InputError, match="not valid TOML"):
        load_preset(str(path))


def nested_preset(base) -> Preset:
    return Preset.model_validate(
        {
            "name": "nested",
            "description": 'a "quoted" description',
            "prior_data": {"path": "data.csv"},
            "reward": {"type": "python", "function": "rewards.py:log_reward", "kwargs": NESTED_KWARGS},
        },
        context={"base_dir": base},
    )


def test_a_preset_with_nested_kwargs_is_written_as_toml_that_reads_back_the_same(tmp_path):
    preset = nested_preset(tmp_path)
    text = render_preset(preset, base=tmp_path)
    assert 'function = "rewards.py:log_reward"' in text  # paths written relative to the file
    back = parse_preset(text, "rendered", tmp_path)
    assert back == preset and back.reward.kwargs == NESTED_KWARGS


def test_presets_init_from_a_preset_with_nested_kwargs(tmp_path):
    source = tmp_path / "source.toml"
    source.write_text(render_preset(nested_preset(tmp_path), base=tmp_path))
    copy = tmp_path / "sub" / "copy.toml"
    copy.parent.mkdir()
    assert run(["presets", "init", str(copy), "--from", str(source)]) == 0
    assert load_preset(str(copy), resolve=False)[0] == load_preset(str(source), resolve=False)[0] == nested_preset(tmp_path)


def test_a_value_toml_cannot_hold_is_an_input_error(tmp_path):
    preset = Preset.model_validate(
        {
            "name": "n",
            "prior_data": {"means": [[0.0]], "variance": 1.0},
            "reward": {"type": "python", "function": "m:f", "kwargs": {"a": {"b": None}}},
        }
    )
    with pytest.raises(InputError, match="'reward.kwargs.a.b' is None"):
        render_preset(preset)


def test_a_folder_named_like_a_shipped_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`pretrain --preset digits-unet --out digits-unet` writes a model folder named as the preset; the next command's
    `--preset digits-unet` still means the shipped preset."""
    (tmp_path / "digits-unet").mkdir()
    monkeypatch.chdir(tmp_path)
    preset, ref = load_preset("digits-unet")
    assert preset.name == "digits-unet" and ref == "digits-unet"
