"""Your own drift network (rtbcli.networks): the sampler's maths in float64, training from a file and
from a module through the command line (pretrain, finetune, --resume, evaluate, sample), checkpoints
that never import the class, and one-line errors for bad networks."""

from __future__ import annotations

import json
import math
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from conftest import to_toml
from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.errors import InputError
from rtbcli.networks import Network, NetworkSampler, attach_network, load_network
from rtbcli.rollout import Workspace, policy_grad, rollout

NET = """
import torch
from torch import nn


class Drift(nn.Module):
    def __init__(self, dim=2, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, x, t):
        return self.body(torch.cat([x, t[:, None]], -1))


class Other(nn.Module):
    def __init__(self, dim=2, width=0):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, t):
        return self.lin(x)


class Flat(Drift):
    def forward(self, x, t):
        return super().forward(x, t).sum(-1)


class Frozen(Drift):
    def __init__(self, dim=2, width=16):
        super().__init__(dim, width)
        self.requires_grad_(False)


class Detached(Drift):
    def forward(self, x, t):
        return super().forward(x, t).detach()


class Integer(Drift):
    def forward(self, x, t):
        return super().forward(x, t).long()


class Dropped(Drift):
    def __init__(self, dim=2, width=16):
        super().__init__(dim, width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(super().forward(x, t))


def not_a_class(x, t):
    return x
"""


class Drift(nn.Module):
    """The same network as NET's, for the library-level tests."""

    def __init__(self, dim=2, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, x, t):
        return self.body(torch.cat([x, t[:, None]], -1))


def _sampler(dtype=torch.float64, steps=6, sigma2=2.0) -> NetworkSampler:
    torch.manual_seed(0)
    return NetworkSampler(2, steps, sigma2, Drift(2, 8)).to(dtype)


# --------------------------------------------------------------------------- the maths
def test_log_prob_is_the_sum_of_the_gaussian_transitions_of_the_network_drift(float64):
    s = _sampler()
    traj = s.sample(5, 0.3, torch.Generator().manual_seed(1))
    T, var = s.steps, s.sigma2 / s.steps
    want = torch.zeros(5)
    for i in range(T):
        x = traj[i]
        mean = x + s.net(x, torch.full((5,), i / T)) / T
        r = traj[i + 1] - mean
        want += (-0.5 * r.pow(2).sum(-1) / var - math.log(2 * math.pi * var)).to(want.dtype)  # d = 2: -(d/2) log(2 pi var)
    torch.testing.assert_close(s.log_prob(traj), want, rtol=0, atol=1e-12)


def test_sample_draws_run_s_noise_stream_with_the_inflated_variance(float64):
    """x_{i+1} - mean_i = sqrt(sigma2 dt + extra) eps_i, eps from the generator as DriftNet's fused loop draws it."""
    s = _sampler()
    traj = s.sample(4, 0.5, torch.Generator().manual_seed(3))
    eps = torch.randn(s.steps, 4, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(traj[0], torch.zeros(4, 2))
    torch.testing.assert_close(traj[1:] - s.means(traj), math.sqrt(s.step_var + 0.5) * eps, rtol=0, atol=1e-12)


def test_policy_grad_of_a_user_network_is_the_gradient_of_the_weighted_log_probs(float64):
    s = _sampler()
    ws = Workspace(s, 7)
    assert ws.pre is None and ws.post is None  # no DriftNet activations to keep
    ro = rollout(s, ws, 0.2, torch.Generator().manual_seed(4))
    g = torch.randn(s.steps, 7, generator=torch.Generator().manual_seed(5))
    policy_grad(ro, g)
    got = [p.grad.clone() for p in s.parameters()]
    s.zero_grad(set_to_none=True)
    (s.step_log_probs(ro.traj) * g).sum().backward()
    for a, b in zip(got, s.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)
    assert any(float(p.abs().sum()) > 0 for p in got)


def test_drift_at_step_indices_matches_the_network_at_t_i(float64):
    s = _sampler()
    x, i = torch.randn(5, 2), torch.tensor([0, 1, 5, 3, 2])
    torch.testing.assert_close(s.drift(x, i), s.net(x, i.double() / s.steps), rtol=0, atol=0)


class Wrapped(nn.Module):
    """rtbcli's own DriftNet behind the user-network contract forward(x, t): the same drift, so a NetworkSampler of it
    must sample and score exactly as the DiffusionSampler holding the DriftNet does."""

    def __init__(self, net):
        super().__init__()
        self.dn = net

    def forward(self, x, t):
        return self.dn(x, self.dn.time(t))


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_a_user_network_walks_the_time_grid_as_rtbcli_s_own_sampler_does(float64, power):
    """time_power: t_i = 1 - (1 - i / T)^p, dt_i and sigma2 dt_i per step, in `sample`, `means`, `log_prob` and `drift`."""
    from rtbcli.sampler import DiffusionSampler

    torch.manual_seed(0)
    ref = DiffusionSampler(2, 7, 2.0, hidden=8, time_features=4, time_power=power).double()
    torch.nn.init.normal_(ref.net.body[-1].weight, std=0.3)  # a drift that is not zero
    s = NetworkSampler(2, 7, 2.0, Wrapped(ref.net), time_power=power)
    assert s.uniform == (power == 1.0)
    traj = s.sample(5, 0.3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(traj, ref.sample(5, 0.3, torch.Generator().manual_seed(1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.log_prob(traj, 0.3), ref.log_prob(traj, 0.3), rtol=0, atol=1e-10)
    x, i = torch.randn(4, 2), torch.tensor([0, 6, 3, 1])
    torch.testing.assert_close(s.drift(x, i), ref.drift(x, i), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_preset):
    d = tmp_path_factory.mktemp("networks")
    (d / "net.py").write_text(NET)
    modname = f"rtbcli_test_nets_{uuid.uuid4().hex[:8]}"  # a module found from the working folder
    (d / modname).mkdir()
    (d / modname / "__init__.py").write_text(NET)
    p = tiny_preset.updated("sampler", steps=8, network="net.py:Drift", network_kwargs={"width": 8})
    (d / "file.toml").write_text(to_toml(p.model_dump()).replace(f'"{d / "net.py"}:Drift"', '"net.py:Drift"'))
    (d / "module.toml").write_text(to_toml(p.updated("sampler", network=f"{modname}:Drift").model_dump()))
    return {"dir": d, "net": f"{d / 'net.py'}:Drift", "module": f"{modname}:Drift", "modname": modname}


def cli(*args) -> int:
    return run([str(a) for a in args])


def forget(files) -> None:
    """Drop the network's modules from this process, as a fresh process would start."""
    for name in list(sys.modules):
        m = sys.modules[name]
        if name.startswith((files["modname"], "rtbcli_network_")) or getattr(m, "__file__", None) == str(files["dir"] / "net.py"):
            del sys.modules[name]


def imported(files) -> bool:
    return any(
        name.startswith(files["modname"]) or getattr(m, "__file__", None) == str(files["dir"] / "net.py")
        for name, m in list(sys.modules.items())
    )


@pytest.fixture(scope="module")
def trained(files, one_thread):
    """A prior of each kind of reference, pretrained from its preset, fine-tuned, and the fine-tuning resumed."""
    import os

    d, out = files["dir"], {}
    old = os.getcwd()
    os.chdir(d)  # the module is found from the working folder
    try:
        for kind, net in (("file", files["net"]), ("module", files["module"])):
            prior, ft, more = (d / f"{kind}-{n}.safetensors" for n in ("prior", "ft", "more"))
            assert cli("pretrain", "--preset", d / f"{kind}.toml", "--steps", 6, "--out", prior, "-q", "--device", "cpu") == 0
            assert cli("finetune", "--prior", prior, "--network", net, "--steps", 3, "--batch-size", 16, "--out", ft, "-q",
                       "--device", "cpu") == 0  # fmt: skip
            assert cli("finetune", "--resume", ft, "--network", net, "--steps", 5, "--out", more, "-q", "--device", "cpu") == 0
            out[kind] = (prior, ft, more)
    finally:
        os.chdir(old)
    return out


@pytest.mark.parametrize("kind", ["file", "module"])
def test_a_user_network_pretrains_finetunes_and_resumes(kind, trained, files):
    prior, ft, more = trained[kind]
    meta = safe_open(str(prior), "pt").metadata()
    spec = json.loads(meta["config"])["sampler"]
    assert spec["network"] == (files["net"] if kind == "file" else files["module"]) and spec["network_kwargs"] == {"width": 8}
    assert len(spec["network_sha256"]) == 64
    t_prior, t_ft, t_more = (load_file(str(p)) for p in (prior, ft, more))
    assert set(t_prior) == {f"policy.net.body.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert t_prior["policy.net.body.0.weight"].shape == (8, 3)
    for k in t_prior:  # the fine-tuned policy moved from its frozen prior, which is the pretrained one
        assert torch.equal(t_ft[k.replace("policy", "prior")], t_prior[k])
        assert not torch.equal(t_ft[k], t_prior[k]) and not torch.equal(t_more[k], t_ft[k])
    assert safe_open(str(more), "pt").metadata()["step"] == "5"


def test_a_user_network_evaluates_and_samples_when_named_again(trained, files, tmp_path, capsys):
    _, _, more = trained["file"]
    capsys.readouterr()
    assert cli("evaluate", more, "--network", files["net"], "--n", 200, "--json", "--device", "cpu") == 0
    assert json.loads(capsys.readouterr().out)["n"] == 200
    assert cli("sample", more, "--network", files["net"], "--n", 30, "--out", tmp_path / "x.npy", "--device", "cpu") == 0
    import numpy as np

    assert np.load(tmp_path / "x.npy").shape == (30, 2)


def test_loading_a_checkpoint_never_imports_the_network(trained, files, tmp_path, capsys):
    for kind in ("file", "module"):
        _, ft, _ = trained[kind]
        forget(files)
        ck = load_checkpoint(ft)
        with pytest.raises(InputError, match="name it again with --network"):
            ck.sampler("policy")
        capsys.readouterr()
        assert cli("sample", ft, "--n", 5, "--out", tmp_path / "x.npy") == 2
        err = capsys.readouterr().err.strip()
        ref = files["net"] if kind == "file" else files["module"]
        assert err.endswith(f"name it again with --network {ref}") and len(err.splitlines()) == 1
        assert cli("evaluate", ft, "--n", 10) == 2 and "--network" in capsys.readouterr().err
        assert not imported(files) and not (tmp_path / "x.npy").exists()


def test_resume_without_the_network_is_a_one_line_error(trained, files, tmp_path, capsys):
    prior, ft, _ = trained["file"]
    capsys.readouterr()
    assert cli("finetune", "--resume", ft, "--steps", 9, "--out", tmp_path / "m.safetensors") == 2
    assert "name it again with --network" in capsys.readouterr().err
    assert cli("pretrain", "--resume", prior, "--steps", 9, "--out", tmp_path / "p.safetensors") == 2
    assert "name it again with --network" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_changed_network_file_warns_and_other_weights_are_an_error(trained, files, tmp_path, capsys):
    _, ft, _ = trained["file"]
    changed = tmp_path / "net.py"
    changed.write_text(NET + "\n# an edit\n")
    capsys.readouterr()
    assert cli("sample", ft, "--network", f"{changed}:Drift", "--n", 5, "--out", tmp_path / "x.npy") == 0
    err = capsys.readouterr().err
    assert "rtbcli: warning: network" in err and "is not the file the checkpoint was made with" in err
    assert cli("sample", ft, "--network", f"{changed}:Other", "--n", 5, "--out", tmp_path / "y.npy") == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if not line.startswith("rtbcli: warning:")]
    assert len(errors) == 1 and "weights do not fit the network" in errors[0] and "(--network " in errors[0]
    assert not (tmp_path / "y.npy").exists()


def test_finetune_under_the_preset_that_named_the_network(trained, files, tmp_path, capsys):
    """A prior pretrained from a preset file that names a network fine-tunes under that same preset file: the prior
    records the file's SHA-256 and the preset, read again, has none (it was refused as "the prior's sampler settings
    differ from the preset's (network_sha256 ... vs None)")."""
    prior, _, _ = trained["file"]
    assert load_checkpoint(prior).preset.sampler.network_sha256 is not None
    capsys.readouterr()
    out = tmp_path / "ft.safetensors"
    code = cli("finetune", "--preset", files["dir"] / "file.toml", "--prior", prior, "--network", files["net"], "--steps", 2,
               "--batch-size", 8, "--out", out, "-q", "--device", "cpu")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out).preset.sampler.network_sha256 == load_checkpoint(prior).preset.sampler.network_sha256
    other = tmp_path / "other.toml"  # a preset naming another network is still refused
    other.write_text((files["dir"] / "file.toml").read_text().replace("width = 8", "width = 9"))
    code = cli(
        "finetune", "--preset", other, "--prior", prior, "--network", files["net"], "--steps", 2, "--out", tmp_path / "o.safetensors"
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "network_kwargs {'width': 8} vs {'width': 9}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_reproduce_runs_a_preset_that_names_a_network(trained, files, tmp_path, capsys):
    """`rtbcli reproduce --preset FILE` where FILE names your network: it pretrains the class (or takes --prior),
    fine-tunes every method and evaluates each checkpoint with the class the preset names (it stopped at the first
    checkpoint it loaded: "name it again with --network")."""
    import os

    prior, _, _ = trained["file"]
    old = os.getcwd()
    os.chdir(files["dir"])
    try:
        capsys.readouterr()
        for extra, out in ((["--pretrain-steps", 3], tmp_path / "fresh"), (["--prior", prior], tmp_path / "given")):
            code = cli(
                "reproduce", "--preset", "file.toml", *extra, "--steps", 2, "--batch-size", 8, "-o", out, "--device", "cpu", "--json"
            )
            captured = capsys.readouterr()
            assert code == 0, captured.err
            summary = json.loads(captured.out)
            assert [r["method"] for r in summary["rows"]] and all(r.get("elbo") is not None for r in summary["rows"])
            assert load_checkpoint(out / "prior.safetensors").preset.sampler.network == files["net"]
    finally:
        os.chdir(old)


def test_network_on_rtbcli_s_own_checkpoint_is_refused(tiny_prior, files, tmp_path, capsys):
    capsys.readouterr()
    assert cli("sample", tiny_prior, "--network", files["net"], "--n", 5, "--out", tmp_path / "x.npy") == 2
    assert "holds rtbcli's own drift network" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    "ref, args, match",
    [
        ("broken.py:Drift", [], "network file '.*broken.py' failed to import \\(ZeroDivisionError"),
        ("net.py:not_a_class", [], "is a function, not a torch.nn.Module class"),
        ("net.py:Missing", [], "has no 'Missing': name a class defined there"),
        ("net.py:Flat", [], "returned shape \\(3,\\) for x of shape \\(3, 2\\): return the drift"),
        ("net.py:Drift", ["--network-arg", "dim=3"], "failed on x of shape \\(3, 2\\).*d = 2, the data's dimension"),
        ("net.py:Drift", ["--network-arg", "depth=3"], "could not be built with network_kwargs .*unexpected keyword"),
        ("net.py", [], "names no Class: give 'path/to/networks.py:Class'"),
        # networks that would "train" without changing (exit 0, the same weights, before)
        ("net.py:Frozen", [], "has no parameter that requires grad"),
        ("net.py:Detached", [], "returned a drift that no gradient leads back from"),
        ("net.py:Integer", [], "returned a torch.int64 tensor: return the drift as floating point"),
        ("net.py:Drift", ["--network-arg", "width"], "--network-arg 'width': write KEY=VALUE"),
    ],
)
def test_bad_networks_are_one_line_errors_and_write_nothing(ref, args, match, files, tiny_preset_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = cli("pretrain", "--preset", tiny_preset_file, "--network", ref, *args, "--steps", 2, "--out", tmp_path / "o.safetensors", "-q")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    import re

    assert re.search(match, err), err
    assert not list(tmp_path.glob("o*"))


def test_a_user_network_pretrains_on_the_time_grid_with_the_box_term(files, tiny_preset, tmp_path, capsys):
    """`pretrain --network ... --time-power 2` with [pretrain] box_weight: the checkpoint's sampler walks the grid."""
    from rtbcli.sampler import time_grid

    preset = tmp_path / "box.toml"
    preset.write_text(to_toml(tiny_preset.updated("pretrain", box_weight=1.0).model_dump()))
    out = tmp_path / "p.safetensors"
    code = cli("pretrain", "--preset", preset, "--network", files["net"], "--time-power", 2, "--steps", 3, "--out", out, "-q")
    assert code == 0, capsys.readouterr().err
    ck = load_checkpoint(out)
    assert ck.preset.sampler.time_power == 2.0 and ck.preset.pretrain.box_weight == 1.0
    attach_network(ck, files["net"])
    s = ck.sampler("policy", "cpu", torch.float64)
    assert isinstance(s, NetworkSampler) and not s.uniform
    torch.testing.assert_close(s.times(), time_grid(s.steps, 2.0))


def test_a_network_on_a_unet_preset_is_a_one_line_error(files, tmp_path, capsys):
    capsys.readouterr()
    code = cli("pretrain", "--preset", "digits-unet", "--network", files["net"], "--steps", 2, "--out", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "give one of network" in err and "unexpected" not in err, err
    assert not list(tmp_path.iterdir())


def test_library_network_loading(files, float64):
    net = load_network(files["net"])
    assert isinstance(net, Network) and net.sha256 is not None and len(net.sha256) == 64
    built = net.build({"width": 4}, 2, seed=1)
    assert torch.equal(built.body[0].weight, net.build({"width": 4}, 2, seed=1).body[0].weight)


def test_finetune_refuses_langevin_with_a_user_network(trained, files, tmp_path, capsys):
    prior, _, _ = trained["file"]
    capsys.readouterr()
    code = cli("finetune", "--prior", prior, "--network", files["net"], "--langevin", "--steps", 2, "--out", tmp_path / "l.safetensors")
    assert code == 2 and "Langevin parametrisation is built on rtbcli's own drift network" in capsys.readouterr().err
    ck = load_checkpoint(prior)
    with pytest.raises(InputError, match="leave out --network"):
        attach_network(load_checkpoint(Path(__file__).parents[1] / "rtbcli/data/prior-reference.safetensors"), files["net"])
    attach_network(ck, files["net"])
    assert isinstance(ck.sampler("policy"), NetworkSampler)


def test_a_user_network_samples_and_scores_in_eval_mode(files, tmp_path, monkeypatch):
    """Dropout (or batch norm) in a network of yours: the drift must be one function for sampling and scoring (exact
    log-probabilities), so the sampler keeps the network in eval mode; two scorings of a trajectory agreed only by
    chance before (47.74, then 48.06)."""
    from rtbcli.networks import load_network

    monkeypatch.chdir(files["dir"])
    net = load_network("net.py:Dropped").build({"width": 8}, 2, seed=0)
    s = NetworkSampler(2, 6, 2.0, net)
    assert not s.net.training
    traj = s.sample(16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(s.log_prob(traj), s.log_prob(traj))
