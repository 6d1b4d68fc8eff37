"""A researcher's own inputs, where a review found them misread: a reward or target that edits x in place, a bad
--target reference, data beyond float32, Excel's and pandas' CSV files, a reward of the wrong kind of number, and
the logged ELBO's memory at large d. Each through the command line where the user meets it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import strip_ansi
from rtbcli.cli import run
from rtbcli.data import load_array

pytestmark = pytest.mark.usefixtures("one_thread")

FUNCTIONS = """
def shifted(x):
    y = x - 1.0
    return -0.5 * (y * y).sum(-1)


def shifted_in_place(x):
    x -= 1.0  # edits its argument: the samples it was given must not move
    return -0.5 * (x * x).sum(-1)


def yes(x):
    return x[:, 0] > 0
"""


def one_line(capsys, code: int, match: str, exit_code: int = 2) -> None:
    err = strip_ansi(capsys.readouterr().err).strip().splitlines()
    assert code == exit_code and len(err) == 1 and err[0].startswith("rtbcli: error: ") and match in err[0], (code, err)


def policy(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("policy.")}


@pytest.mark.parametrize("mode", ["reward", "target"])
def test_a_function_that_edits_x_in_place_trains_as_its_copying_twin(mode, tmp_path, tiny_prior, capsys):
    """The reward (data mode) or target (energy mode) is called with a copy of the samples: one that subtracts in
    place trained another sampler before (final loss 453 vs 78)."""
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    outs = {}
    for fn in ("shifted", "shifted_in_place"):
        out = tmp_path / f"{fn}.safetensors"
        ref = f"{tmp_path / 'fns.py'}:{fn}"
        where = ["--prior", tiny_prior, "--reward", ref] if mode == "reward" else ["--prior", "brownian", "--target", ref, "--dim", 2]
        argv = ["finetune", *where, "--steps", 3, "--batch-size", 16, "--seed", 1, "--out", out, "-q"]
        assert run([str(a) for a in argv]) == 0, capsys.readouterr().err
        outs[fn] = policy(out)
    for k, v in outs["shifted"].items():
        assert torch.equal(v, outs["shifted_in_place"][k]), k


def test_bad_targets_and_rewards_of_the_wrong_kind_are_one_line_errors(tmp_path, tiny_prior, capsys):
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    base = ["finetune", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "o.safetensors"), "-q"]
    for extra, match in (
        (["--prior", "brownian", "--target", "foo", "--dim", "2"], "--target"),  # were "unexpected ValidationError", exit 1
        (["--prior", "brownian", "--target", f"{tmp_path / 'fns.py'}:shifted", "--dim", "0"], "--dim"),
        (["--prior", str(tiny_prior), "--reward", f"{tmp_path / 'fns.py'}:yes"], "returned a torch.bool tensor"),
    ):
        one_line(capsys, run(base + extra), match)
    assert not (tmp_path / "o.safetensors").exists()


def test_data_beyond_float32_is_bad_input(tmp_path, capsys):
    rows = np.random.default_rng(0).normal(size=(50, 2))
    rows[3, 0] = 1e39  # finite in float64, inf in the float32 a run computes in
    np.save(tmp_path / "big.npy", rows)
    code = run(["pretrain", "--data", str(tmp_path / "big.npy"), "--steps", "2", "--out", str(tmp_path / "o.safetensors"), "-q"])
    one_line(capsys, code, "has values beyond float32's range (3.4e38) in 1 of 50 rows (first: row 3): rescale the data")


def test_csv_files_from_excel_and_pandas(tmp_path):
    """Excel's "CSV UTF-8" (a byte-order mark) lost its first row to the header guess; pandas' numeric header "0,1" is
    read as a row, as it parses as one, and now says so."""
    (tmp_path / "bom.csv").write_text("\ufeff1,2\n3,4\n5,6\n7,8\n", encoding="utf-8")
    rows, _ = load_array(tmp_path / "bom.csv")
    assert rows.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    (tmp_path / "pandas.csv").write_text("0,1\n0.5,0.25\n1.5,2.5\n")
    with pytest.warns(UserWarning, match="reads like pandas' column header"):
        rows, _ = load_array(tmp_path / "pandas.csv")
    assert rows.shape == (3, 2)


def test_the_logged_elbo_is_drawn_in_chunks_at_large_d(monkeypatch, reference):
    """At d = 20,000 the pretraining log's ELBO over 256 bridge trajectories needed 8 GB in one batch; it is drawn in
    chunks of at most ELBO_ELEMENTS values (one batch, the same value as before, where it fits)."""
    import rtbcli.pretrain as P
    from rtbcli.sampler import DiffusionSampler
    from rtbcli.tasks import Task

    task, s = Task(reference), DiffusionSampler(2, 10, 5.0, hidden=8, time_features=4)
    sizes = []
    real = DiffusionSampler.backward_sample

    def spy(self, x, generator=None):
        sizes.append(x.shape[0])
        return real(self, x, generator)

    monkeypatch.setattr(DiffusionSampler, "backward_sample", spy)
    whole = P.bridge_elbo(s, task, 200, torch.Generator().manual_seed(0))
    monkeypatch.setattr(P, "ELBO_ELEMENTS", 11 * 2 * 64)  # 64 trajectories a chunk
    chunked = P.bridge_elbo(s, task, 200, torch.Generator().manual_seed(0))
    assert sizes == [200, 64, 64, 64, 8]
    assert chunked == pytest.approx(whole, abs=0.5)  # other bridges, the same law
