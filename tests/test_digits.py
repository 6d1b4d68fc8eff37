"""The digits benchmark: split, data, metrics and figure (need scikit-learn where marked), and the reward (does not)."""

from __future__ import annotations

import hashlib
import itertools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rtbcli.datasets import digits as dd
from rtbcli.datasets import digits_metrics as dm
from rtbcli.datasets.digits import SCALE, SHIFT, check_digit
from rtbcli.datasets.digits_metrics import mean_pairwise_distance
from rtbcli.datasets.digits_plots import plot_digit_grids
from rtbcli.errors import InputError
from rtbcli.rewards.digits import class_log_probs, classifier_metadata, classify, log_p_class


@pytest.fixture(scope="module")
def sk():
    return pytest.importorskip("sklearn")


# --- the reward: only the shipped weights ---------------------------------------------------------


def test_classifier_metadata():
    meta = classifier_metadata()
    assert meta["format"] == "rtbcli-digits-classifier"
    assert meta["scale"] == SCALE and meta["shift"] == SHIFT
    assert meta["split_seed"] == dd.SPLIT_SEED and meta["heldout_fraction"] == dd.HELDOUT_FRACTION
    assert meta["architecture"]["sizes"] == [64, 128, 128, 10]
    assert meta["temperature"] > 0 and meta["heldout_accuracy"] >= 0.9
    assert isinstance(meta["torch_version"], str) and isinstance(meta["sklearn_version"], str)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_p_class_is_a_log_probability(dtype):
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1).to(dtype).requires_grad_()
    per_class = torch.stack([log_p_class(x, c) for c in range(10)], dim=1)
    assert per_class.shape == (7, 10) and per_class.dtype == dtype and per_class.requires_grad  # differentiable (LP)
    assert (per_class <= 0).all()
    torch.testing.assert_close(per_class.logsumexp(dim=1), torch.zeros(7, dtype=dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_class, class_log_probs(x))
    assert torch.equal(classify(x), per_class.argmax(dim=1))
    assert classify(x).dtype == torch.int64


def test_log_p_class_rejects_bad_input():
    with pytest.raises(InputError, match=r"shape \(B, 64\)"):
        log_p_class(torch.zeros(3, 63), 1)
    with pytest.raises(InputError, match="floating-point"):
        log_p_class(torch.zeros(3, 64, dtype=torch.int64), 1)
    with pytest.raises(InputError, match="digit must be"):
        log_p_class(torch.zeros(3, 64), 10)


@pytest.mark.parametrize("bad", [-1, 10, 3.5, True, False, "3", None, float("nan")])
def test_check_digit_rejects(bad):
    with pytest.raises(InputError, match=r"^digit must be an integer from 0 to 9 \(got "):
        check_digit(bad)


def test_check_digit_accepts():
    assert [check_digit(d) for d in range(10)] == list(range(10))
    assert check_digit(np.int64(3)) == 3 and check_digit(3.0) == 3
    assert type(check_digit(np.int64(3))) is int


def test_reward_does_not_need_sklearn():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "sklearn" or name.startswith("sklearn."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import torch
        from rtbcli.rewards.digits import log_p_class
        from rtbcli.datasets.digits import digits_data
        print(log_p_class(torch.zeros(2, 64), 3).shape)
        try:
            digits_data()
        except Exception as e:
            print(type(e).__name__, e)
        assert "sklearn" not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "torch.Size([2])",
        'InputError the digits benchmark needs scikit-learn: pip install "rtbcli[digits]"',
    ]


def test_missing_sklearn_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    dd._load.cache_clear()
    try:
        with pytest.raises(InputError) as e:
            dd.load_digits_pixels()
        assert str(e.value) == 'the digits benchmark needs scikit-learn: pip install "rtbcli[digits]"'
    finally:
        dd._load.cache_clear()


# --- data and split -------------------------------------------------------------------------------


def test_split(sk):
    pixels, labels = dd.load_digits_pixels()
    assert pixels.shape == (1797, 64) and pixels.dtype == torch.float64 and labels.dtype == torch.int64
    assert pixels.min() == 0 and pixels.max() == 16
    train, held = dd.split_indices()
    assert len(set(train.tolist()) & set(held.tolist())) == 0
    assert sorted(train.tolist() + held.tolist()) == list(range(1797))
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((labels[held] == c).sum()) == round(n_c / 3)
    again = dd.split_indices()
    assert torch.equal(again[0], train) and torch.equal(again[1], held)


def test_split_is_the_one_the_classifier_was_trained_on(sk):
    held = dd.split_indices()[1]
    assert hashlib.sha256(held.numpy().tobytes()).hexdigest() == classifier_metadata()["heldout_indices_sha256"]


def test_digits_data(sk):
    x = dd.digits_data()
    assert x.dtype == torch.float32 and x.shape == (1198, 64)
    assert x.min() == -1 and x.max() == 1
    assert dd.digits_data("heldout").shape == (599, 64) and dd.digits_data("all").shape == (1797, 64)
    threes = dd.digits_data("heldout", 3)
    assert len(threes) == int((dd.digits_labels("heldout") == 3).sum())
    pixels, labels = dd.load_digits_pixels()
    torch.testing.assert_close(dd.digits_data("all", 7), (pixels[labels == 7] * SCALE + SHIFT).float())
    with pytest.raises(InputError, match="unknown digits split"):
        dd.digits_data("test")


# --- the classifier on real images ----------------------------------------------------------------


def test_classifier_heldout_accuracy(sk):
    x, y = dd.digits_data("heldout"), dd.digits_labels("heldout")
    acc = (classify(x) == y).double().mean().item()
    print(f"digits classifier held-out accuracy {acc:.4f}")
    assert acc >= 0.9
    assert abs(acc - classifier_metadata()["heldout_accuracy"]) <= 2 / len(y)


def test_log_p_class_prefers_the_right_class(sk):
    x, y = dd.digits_data("heldout"), dd.digits_labels("heldout")
    lp = torch.stack([log_p_class(x, c) for c in range(10)], dim=1)
    right = lp.gather(1, y[:, None]).squeeze(1)
    for c in range(10):
        assert right[y == c].mean() > lp[y != c, c].mean() + 5  # nats
    assert (right > -0.1).double().mean() >= 0.9


def test_class_fraction(sk):
    x, y = dd.digits_data("heldout"), dd.digits_labels("heldout")
    for c in range(10):
        assert dm.class_fraction(x[y == c], c) >= 0.9
        assert dm.class_fraction(x[y != c], c) <= 0.05
    bad = x[y == 4].clone()
    bad[:5] = float("nan")  # non-finite samples count as misses
    assert dm.class_fraction(bad, 4) == pytest.approx(dm.class_fraction(x[y == 4][5:], 4) * (len(bad) - 5) / len(bad))


def test_class_fraction_of_the_target_by_importance_weights(sk):
    """Weights 3 : 1 on the class-2 rows against the class-7 rows, as many of each: 3/4 of the weight is on class 2
    (by the classifier: its few misses are taken into account through the unweighted fractions)."""
    x, y = dd.digits_data("heldout"), dd.digits_labels("heldout")
    twos, sevens = x[y == 2][:50], x[y == 7][:50]
    f2, f7 = dm.class_fraction(twos, 2), dm.class_fraction(sevens, 2)
    both = torch.cat([twos, sevens])
    log_w = (
        torch.cat([torch.full((50,), math.log(3.0), dtype=torch.float64), torch.zeros(50, dtype=torch.float64)]) + 7.0
    )  # any constant: self-normalised
    by_hand = (3 * f2 + f7) / 4
    assert dm.class_fraction(both, 2, torch.softmax(log_w, 0)) == pytest.approx(by_hand, rel=1e-12)
    r = dm.digits_report(both, 2, log_w)
    assert r["class_fraction_target"] == pytest.approx(by_hand, rel=1e-12)
    assert r["diversity_target"] == pytest.approx(dm.weighted_mean_pairwise_distance(both, torch.softmax(log_w, 0)), rel=1e-12)
    assert r["diversity_target"] != pytest.approx(r["diversity"], rel=1e-3)  # the weights, not the plain mean
    assert r["class_fraction"] == pytest.approx((f2 + f7) / 2, rel=1e-12)


def test_weighted_mean_pairwise_distance_by_hand():
    """Rows at 0, 1 and 3 along one pixel, weights 1 : 1 : 2: the weighted pairs give
    (1*1*1 + 1*2*3 + 1*2*2) / (1*1 + 1*2 + 1*2) = 11 / 5; uniform weights give mean_pairwise_distance."""
    x = torch.zeros(3, 64, dtype=torch.float64)
    x[:, 5] = torch.tensor([0.0, 1.0, 3.0])
    w = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert dm.weighted_mean_pairwise_distance(x, w) == pytest.approx(11 / 5, rel=1e-14)
    assert dm.weighted_mean_pairwise_distance(x, 7 * w) == pytest.approx(11 / 5, rel=1e-14)  # scale-free
    assert dm.weighted_mean_pairwise_distance(x, torch.ones(3)) == pytest.approx(dm.mean_pairwise_distance(x), rel=1e-14)
    # a zero weight or a non-finite row drops out (the row at 3 here): the pair (0, 1) alone
    assert dm.weighted_mean_pairwise_distance(x, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(1.0, rel=1e-14)
    bad = x.clone()
    bad[2, 0] = float("nan")
    assert dm.weighted_mean_pairwise_distance(bad, w) == pytest.approx(1.0, rel=1e-14)
    assert math.isnan(dm.weighted_mean_pairwise_distance(x[:1], w[:1]))
    big, wb = torch.randn(50, 64, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    assert dm.weighted_mean_pairwise_distance(big, wb, chunk=7) == pytest.approx(
        dm.weighted_mean_pairwise_distance(big, wb, chunk=50), rel=1e-12
    )  # chunks of rows sum to the one pass


def test_nearest_train_distance(sk):
    assert dm.nearest_train_distance(dd.digits_data("train")) == 0.0
    assert dm.nearest_train_distance(dd.digits_data("heldout")) > 1.0


def test_digits_report(sk):
    held = dd.digits_data("heldout", 2)
    r = dm.digits_report(held, 2)
    assert set(r) == {
        "class_fraction",
        "class_fraction_real",
        "diversity",
        "diversity_real",
        "nearest_train_distance",
        "nearest_train_distance_real",
    }
    assert r["class_fraction"] == r["class_fraction_real"] >= 0.9
    assert r["nearest_train_distance"] == r["nearest_train_distance_real"] > 0
    assert r["diversity_real"] == pytest.approx(mean_pairwise_distance(dd.digits_data("all", 2)))


# --- metrics and figure without real data ---------------------------------------------------------


def test_mean_pairwise_distance():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    direct = [math.dist(x[i].tolist(), x[j].tolist()) for i, j in itertools.combinations(range(6), 2)]
    assert mean_pairwise_distance(x) == pytest.approx(sum(direct) / len(direct), rel=1e-12)
    big = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    sub = mean_pairwise_distance(big, max_points=20)
    assert sub == mean_pairwise_distance(big, max_points=20) != mean_pairwise_distance(big, max_points=20, seed=1)
    assert sub == pytest.approx(mean_pairwise_distance(big), rel=0.2)
    assert math.isnan(mean_pairwise_distance(x[:1]))
    with pytest.raises(InputError):
        mean_pairwise_distance(torch.zeros(3, 8))


def test_plot_digit_grids(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(70, 64, generator=g) * 2 - 1
    b = torch.randn(10, 64, generator=g) * 3  # out of range: clipped
    b[0] = float("nan")
    out = tmp_path / "grids.png"
    plot_digit_grids(out, [("a", a), ("b", b)], title="digits")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["grids.png"]
    with pytest.raises(InputError):
        plot_digit_grids(tmp_path / "x.png", [])
    with pytest.raises(InputError):
        plot_digit_grids(tmp_path / "x.png", [("bad", torch.zeros(3, 9))])
    assert [p.name for p in tmp_path.iterdir()] == ["grids.png"]


def test_the_digits_reward_is_differentiable_for_the_langevin_parametrisation():
    """log p(3 | x) has a gradient in x (classifier guidance), equal to its finite differences."""
    from rtbcli.rewards.digits import log_p_class

    x = torch.zeros(2, 64, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(log_p_class(x, 3).sum(), x)
    assert g.abs().max() > 0
    e = torch.zeros(64, dtype=torch.float64)
    e[10] = 1e-6
    with torch.no_grad():
        fd = (log_p_class(x.detach() + e, 3) - log_p_class(x.detach() - e, 3)) / 2e-6
    assert torch.allclose(g[:, 10], fd, rtol=1e-5, atol=1e-8)


def test_digits_finetunes_with_the_langevin_parametrisation(tmp_path, capsys):
    """The classifier's gradient reaches the loop: `finetune --langevin` on digits runs (it was refused before)."""
    pytest.importorskip("sklearn")
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.cli import run
    from rtbcli.reproduce import shipped_prior

    out = tmp_path / "lp.safetensors"
    args = ["finetune", "--preset", "digits", "--prior", str(shipped_prior("prior-digits.safetensors")), "--langevin"]
    code = run([*args, "--steps", "2", "--batch-size", "8", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out).preset.finetune.langevin
