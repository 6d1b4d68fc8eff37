"""rtbcli.plots: valid PNGs, tolerant of odd samples, atomic on failure."""

from __future__ import annotations

import dataclasses

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from rtbcli.errors import InputError
from rtbcli.metrics import per_mode_frequencies, sample_metrics
from rtbcli.plots import plot_evaluation, plot_panels
from rtbcli.presets_loader import load_preset
from rtbcli.suites import prior_target, tilted_target
from rtbcli.tasks import Task

N = 300


@pytest.fixture(scope="module")
def task() -> Task:
    return Task(load_preset("reference")[0])


@pytest.fixture(scope="module")
def target(task):
    return tilted_target(task, 1.0)


def _samples(target, n: int = N, seed: int = 0) -> torch.Tensor:
    return target.sample(n, torch.Generator().manual_seed(seed)).float()


def _metrics(x: torch.Tensor, target) -> dict:
    m = sample_metrics(x, target)
    m["mode_frequencies"] = per_mode_frequencies(x, target).tolist()
    m["mode_masses"] = None if target.cell_masses is None else target.cell_masses.tolist()
    m.update(algo="rtb", kind="finetuned")
    return m


def _check_png(path, min_w: int = 400, min_h: int = 250) -> np.ndarray:
    assert path.read_bytes()[:4] == b"\x89PNG"
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert min_w <= w <= 4000 and min_h <= h <= 4000
    assert img.std() > 0  # not blank
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return img


def test_plot_evaluation_writes_png(tmp_path, target):
    x = _samples(target)
    path = tmp_path / "eval.png"
    plot_evaluation(path, x, target, _metrics(x, target), title="test")
    img = _check_png(path)
    assert img.shape[1] > img.shape[0]  # a wide two-panel figure


def test_plot_evaluation_tolerates_non_finite_and_missing_metrics(tmp_path, target):
    x = _samples(target)
    x[:7] = float("nan")
    x[7:9, 0] = float("inf")
    metrics = {"mode_coverage": None, "kl_mode": None, "off_target": None, "kl_hist": None}  # nothing per mode
    path = tmp_path / "nan.png"
    plot_evaluation(path, x.numpy(), target, metrics)
    _check_png(path)


def test_plot_evaluation_sir_like_target(tmp_path, target):
    sir = dataclasses.replace(target, cell_masses=None, target_modes=None, mode_weights=None, bin_masses=None, method="sir")
    x = _samples(target)
    m = _metrics(x, sir)
    assert m["mode_masses"] is None and m["kl_mode"] is None
    path = tmp_path / "sir.png"
    plot_evaluation(path, x, sir, m)
    _check_png(path)


def test_plot_panels_writes_png(tmp_path, task, target):
    prior = prior_target(task)
    panels = [("prior", _samples(prior)), ("target", _samples(target, seed=1)), ("model", _samples(target, seed=2).numpy())]
    path = tmp_path / "panels.png"
    plot_panels(path, panels, target, suptitle="reference", subtitles=["", "exact", "KL 0.004 · off 3%"])
    img = _check_png(path, min_w=600, min_h=200)
    assert img.shape[1] > 2 * img.shape[0]  # one row of three square panels


def test_plot_panels_wraps_and_tolerates_non_finite(tmp_path, target):
    x = _samples(target)
    x[:3] = float("nan")
    path = tmp_path / "grid.png"
    plot_panels(path, [(f"p{i}", x) for i in range(6)], target)
    img = _check_png(path)
    assert img.shape[0] > 0.5 * img.shape[1]  # two rows


def test_plot_panels_rejects_bad_arguments(tmp_path, target):
    x = _samples(target)
    with pytest.raises(InputError):
        plot_panels(tmp_path / "a.png", [], target)
    with pytest.raises(InputError):
        plot_panels(tmp_path / "b.png", [("a", x)], target, subtitles=["one", "two"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("d", [1, 3, 10])
def test_other_dimensions_plot_two_coordinates_and_the_marginals(tmp_path, d):
    """A task in d != 2: the plane of two coordinates (or the histogram of one) over the reference, and the coordinates' spread."""
    from rtbcli.targets import Target

    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(500, d, generator=g), torch.randn(400, d, generator=g, dtype=torch.float64) + 1.0
    t = Target(description="test", method="reference", reference=ref)
    m = {"sw2": 1.0, "sw2_floor": 0.1, "mmd2": 0.2, "mmd2_floor": 0.0, "kind": "prior"}
    plot_evaluation(tmp_path / "e.png", x, t, m, dims=(0, 1) if d == 1 else (d - 1, 0), reference=ref)
    _check_png(tmp_path / "e.png")
    plot_panels(tmp_path / "p.png", [("a", x), ("b", x + 1)], t, reference=ref)
    _check_png(tmp_path / "p.png", min_w=300)
    if d > 1:
        with pytest.raises(InputError, match="--dims"):
            plot_evaluation(tmp_path / "bad.png", x, t, m, dims=(0, d))
    assert not (tmp_path / "bad.png").exists()


def test_failed_save_leaves_nothing_and_keeps_existing_file(tmp_path, target, monkeypatch):
    x = _samples(target)
    m = _metrics(x, target)

    def boom(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:  # a partial file, then a failure
            fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    fresh = tmp_path / "fresh.png"
    with pytest.raises(OSError, match="disk full"):
        plot_evaluation(fresh, x, target, m)
    with pytest.raises(OSError, match="disk full"):
        plot_panels(tmp_path / "panels.png", [("x", x)], target)
    assert not list(tmp_path.iterdir())

    old = tmp_path / "old.png"
    old.write_bytes(b"previous figure")
    with pytest.raises(OSError):
        plot_evaluation(old, x, target, m)
    assert old.read_bytes() == b"previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["old.png"]


def test_missing_folder_is_an_input_error(tmp_path, target):
    x = _samples(target)
    with pytest.raises(InputError):
        plot_panels(tmp_path / "nope" / "p.png", [("x", x)], target)


def test_headline_reads_the_registry():
    """The figure's headline: the registry's headline metrics present in the report, each distance beside its floor;
    a mode metric the task has but could not compute shows as n/a."""
    from rtbcli.plots import _headline

    m = {
        "mode_coverage": 9,
        "n_target_modes": 9,
        "kl_mode": 0.01234,
        "off_target": 0.0712,
        "kl_hist": None,
        "sw2": 1.0,
        "sw2_floor": 0.1,
        "mmd2": 0.2,
        "mmd2_floor": 0.0,
    }
    assert _headline(m) == ("modes 9/9 · mode KL 0.01234 · off-target 7.12% · hist KL n/a · sliced W2 1 (floor 0.1) · MMD² 0.2 (floor 0)")
    assert (
        _headline({"sw2": 0.5, "sw2_floor": 0.25, "mmd2": 0.001, "mmd2_floor": -0.0002})
        == "sliced W2 0.5 (floor 0.25) · MMD² 0.001 (floor -0.0002)"
    )
    assert _headline({"kind": "prior"}) == ""
