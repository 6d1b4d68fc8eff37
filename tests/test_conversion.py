"""RTB <-> Trust-PCL parameter conversion (rtbcli.conversion, `rtbcli convert-params`; issue 5).

alpha = 1/beta, V_soft(s0) = alpha log Z; the converted checkpoint samples the same policy and its
loss is alpha^2 (or 1/alpha^2) times the source's on the same trajectories.
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtbcli import cli, conversion
from rtbcli.checkpoint import base_metadata, load_checkpoint, sampler_tensors, save_checkpoint
from rtbcli.conversion import convert_checkpoint, rtb_to_trust_pcl_params, trust_pcl_to_rtb_params
from rtbcli.errors import InputError
from rtbcli.finetune import finetuned_tensors
from rtbcli.hashing import sha256_file
from rtbcli.objectives import outcome_rewards, rtb_loss, trust_pcl_loss
from rtbcli.presets_loader import load_preset
from rtbcli.sampler import DiffusionSampler
from rtbcli.sampling import draw_samples
from rtbcli.tasks import Task

FAST = settings(max_examples=150, deadline=None)
POS = st.floats(min_value=1e-100, max_value=1e100, allow_nan=False, allow_infinity=False)
REAL = st.floats(min_value=-1e100, max_value=1e100, allow_nan=False, allow_infinity=False)
BAD_POS = [0.0, -0.0, -1.0, -1e-300, math.inf, -math.inf, math.nan]
BAD_REAL = [math.inf, -math.inf, math.nan]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-13, abs_tol=1e-200)


# --------------------------------------------------------------------------- numbers
def test_doctests():
    assert doctest.testmod(conversion).failed == 0


def test_worked_examples():
    assert rtb_to_trust_pcl_params(2.0, 0.5) == {"alpha": 2.0, "v_soft_s0": 4.0}
    assert trust_pcl_to_rtb_params(2.0, 4.0) == {"beta": 0.5, "log_z": 2.0}
    assert rtb_to_trust_pcl_params(2, 1) == {"alpha": 1.0, "v_soft_s0": 2.0}  # ints are numbers too
    r = rtb_to_trust_pcl_params(-1.5, 4.0)
    assert r == {"alpha": 0.25, "v_soft_s0": -0.375} and all(type(v) is float for v in r.values())


@FAST
@given(log_z=REAL, beta=POS)
def test_round_trip_from_rtb_floats(log_z, beta):
    p = rtb_to_trust_pcl_params(log_z, beta)
    assert close(p["alpha"], 1.0 / beta) and close(p["v_soft_s0"], p["alpha"] * log_z)
    back = trust_pcl_to_rtb_params(p["alpha"], p["v_soft_s0"])
    assert close(back["beta"], beta) and close(back["log_z"], log_z)


@FAST
@given(alpha=POS, v=REAL)
def test_round_trip_from_trust_pcl_floats(alpha, v):
    p = trust_pcl_to_rtb_params(alpha, v)
    assert close(p["beta"], 1.0 / alpha) and close(p["log_z"], v / alpha)
    back = rtb_to_trust_pcl_params(p["log_z"], p["beta"])
    assert close(back["alpha"], alpha) and close(back["v_soft_s0"], v)


@FAST
@given(pairs=st.lists(st.tuples(REAL, POS), min_size=1, max_size=8))
def test_round_trip_tensors_float64(pairs):
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    p = rtb_to_trust_pcl_params(x, s)  # (log_z, beta) = (x, s)
    back = trust_pcl_to_rtb_params(p["alpha"], p["v_soft_s0"])
    q = trust_pcl_to_rtb_params(s, x)  # (alpha, v_soft_s0) = (s, x)
    again = rtb_to_trust_pcl_params(q["log_z"], q["beta"])
    for got, want in ((back["beta"], s), (back["log_z"], x), (again["alpha"], s), (again["v_soft_s0"], x)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-13, atol=1e-200)


def test_tensors_keep_dtype_and_device_and_broadcast():
    log_z = torch.tensor([[1.0], [-2.0], [0.0]], dtype=torch.float32)  # (3, 1)
    beta = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float32)  # (4,)
    p = rtb_to_trust_pcl_params(log_z, beta)
    for v in p.values():
        assert v.shape == (3, 4) and v.dtype == torch.float32 and v.device == log_z.device
    assert torch.equal(p["v_soft_s0"], log_z / beta) and torch.equal(p["alpha"], (1.0 / beta).expand(3, 4))
    # a float argument takes the tensor's dtype; low-precision dtypes are kept
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        q = trust_pcl_to_rtb_params(torch.tensor([2.0, 4.0], dtype=dtype), 4.0)
        assert q["beta"].dtype == q["log_z"].dtype == dtype
        assert q["log_z"].tolist() == [2.0, 1.0] and q["beta"].tolist() == [0.5, 0.25]
    z = rtb_to_trust_pcl_params(torch.tensor(2.0, dtype=torch.float64), 0.5)
    assert z["alpha"].shape == () and float(z["v_soft_s0"]) == 4.0
    # integer tensors are promoted to the default float dtype
    assert rtb_to_trust_pcl_params(torch.tensor([2]), torch.tensor([1]))["v_soft_s0"].dtype == torch.get_default_dtype()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_keep_cuda_device():
    p = rtb_to_trust_pcl_params(torch.tensor([2.0], device="cuda"), 0.5)
    assert p["alpha"].is_cuda and p["v_soft_s0"].is_cuda and p["v_soft_s0"].item() == 4.0


@pytest.mark.parametrize("bad", BAD_POS)
def test_invalid_temperature_raises(bad):
    for call, name in (
        (lambda: rtb_to_trust_pcl_params(1.0, bad), "beta"),
        (lambda: trust_pcl_to_rtb_params(bad, 1.0), "alpha"),
        (lambda: rtb_to_trust_pcl_params(1.0, torch.tensor([0.5, bad])), "beta"),
        (lambda: trust_pcl_to_rtb_params(torch.tensor([[bad]]), torch.ones(2)), "alpha"),
    ):
        with pytest.raises(InputError, match=name) as e:
            call()
        assert "\n" not in str(e.value) and f"give {name} > 0" in str(e.value)


@pytest.mark.parametrize("bad", BAD_REAL)
def test_invalid_value_raises(bad):
    for call, name in (
        (lambda: rtb_to_trust_pcl_params(bad, 0.5), "log_z"),
        (lambda: trust_pcl_to_rtb_params(2.0, bad), "v_soft_s0"),
        (lambda: rtb_to_trust_pcl_params(torch.tensor([1.0, bad]), 0.5), "log_z"),
        (lambda: trust_pcl_to_rtb_params(2.0, torch.tensor([bad], dtype=torch.float64)), "v_soft_s0"),
    ):
        with pytest.raises(InputError, match=name) as e:
            call()
        assert "\n" not in str(e.value)


def test_other_invalid_inputs_raise():
    with pytest.raises(InputError, match="broadcast"):
        rtb_to_trust_pcl_params(torch.ones(3), torch.ones(4))
    with pytest.raises(InputError, match="alpha .*overflows"):
        rtb_to_trust_pcl_params(1.0, 5e-324)  # 1/beta is inf in float64
    with pytest.raises(InputError, match="overflows"):
        rtb_to_trust_pcl_params(torch.tensor([1.0]), torch.tensor([1e-40]))  # 1/beta is inf in float32
    with pytest.raises(InputError, match="beta"):
        rtb_to_trust_pcl_params(1.0, "0.5")
    with pytest.raises(InputError, match="beta"):
        rtb_to_trust_pcl_params(1.0, True)
    with pytest.raises(InputError, match="real"):
        rtb_to_trust_pcl_params(torch.tensor([1 + 1j]), 0.5)


# --------------------------------------------------------------------------- checkpoints
BETA = 0.5  # alpha = 2, a power of two: float32 conversions are exact


def tiny_preset(beta: float = BETA):
    preset, _ = load_preset("reference")
    return preset.updated("sampler", steps=5, hidden=8, time_features=4).updated("", beta=beta)


def perturbed_sampler(preset, seed: int) -> DiffusionSampler:
    torch.manual_seed(seed)
    s = DiffusionSampler.from_spec(preset.dim, preset.sampler)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return s


def make_checkpoint(path: Path, algo: str, scalar: float | None, beta: float = BETA, kind: str = "finetuned") -> Path:
    """A small checkpoint as `rtbcli finetune` (or pretrain, kind="prior") would write it, without training."""
    preset = tiny_preset(beta)
    policy, prior = perturbed_sampler(preset, 1), perturbed_sampler(preset, 2)
    meta = base_metadata(kind, preset, "reference", 10, 0, {"command": "test"})
    if kind == "prior":
        save_checkpoint(path, sampler_tensors(policy, "policy"), meta)
        return path
    tensors = finetuned_tensors(policy, prior, algo, None if scalar is None else torch.tensor(scalar))
    meta.update(algo=algo, beta=repr(beta), alpha=repr(1.0 / beta), prior_sha256="0" * 64, prior_path="prior.safetensors")
    save_checkpoint(path, tensors, meta)
    return path


@pytest.fixture
def rtb_ck(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "rtb.safetensors", "rtb", 0.7)


@pytest.fixture
def tpcl_ck(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "tpcl.safetensors", "trust-pcl", 1.4)


def assert_weights_identical(a, b) -> None:
    names = [k for k in a.tensors if k.startswith(("policy.", "prior."))]
    assert names and names == [k for k in b.tensors if k.startswith(("policy.", "prior."))]
    for k in names:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k


def test_convert_rtb_to_trust_pcl(rtb_ck, tmp_path):
    before = rtb_ck.read_bytes()
    out = tmp_path / "conv.safetensors"
    r = convert_checkpoint(rtb_ck, "trust-pcl", out)
    assert rtb_ck.read_bytes() == before
    src, dst = load_checkpoint(rtb_ck), load_checkpoint(out)
    assert_weights_identical(src, dst)
    assert dst.algo == "trust-pcl" and dst.kind == "finetuned" and "log_z" not in dst.tensors
    v = dst.tensors["v_soft_s0"]
    assert v.shape == () and v.dtype == torch.float32
    assert float(v) == 2.0 * src.scalar("log_z")  # exact: alpha = 2
    assert dst.meta["beta"] == repr(0.5) and dst.meta["alpha"] == repr(2.0) and dst.preset.beta == 0.5
    assert dst.meta["config"] == src.meta["config"]
    assert {k for k in dst.meta if dst.meta[k] != src.meta.get(k)} == {"algo", "converted_from"}
    origin = json.loads(dst.meta["converted_from"])
    assert origin["algo"] == "rtb" and origin["sha256"] == sha256_file(rtb_ck) == r["source_sha256"]
    assert r["from"] == "rtb" and r["to"] == "trust-pcl" and r["v_soft_s0"] == float(v) and r["log_z"] == src.scalar("log_z")
    assert r["alpha"] == 2.0 and r["beta"] == 0.5 and r["sha256"] == sha256_file(out)
    assert r["tensors_copied"] == len(src.tensors) - 1
    assert np.array_equal(draw_samples(src, 64, seed=3), draw_samples(dst, 64, seed=3))

    # and back: the original scalar and weights, labelled rtb again
    back = tmp_path / "back.safetensors"
    convert_checkpoint(out, "rtb", back)
    b = load_checkpoint(back)
    assert b.algo == "rtb" and torch.equal(b.tensors["log_z"], src.tensors["log_z"])
    assert_weights_identical(src, b)
    assert json.loads(b.meta["converted_from"])["algo"] == "trust-pcl"


def test_convert_trust_pcl_to_rtb(tpcl_ck, tmp_path):
    before = tpcl_ck.read_bytes()
    out = tmp_path / "conv.safetensors"
    convert_checkpoint(tpcl_ck, "rtb", out)
    assert tpcl_ck.read_bytes() == before
    src, dst = load_checkpoint(tpcl_ck), load_checkpoint(out)
    assert_weights_identical(src, dst)
    assert dst.algo == "rtb" and "v_soft_s0" not in dst.tensors
    assert dst.scalar("log_z") == src.scalar("v_soft_s0") / 2.0
    assert np.array_equal(draw_samples(src, 64, seed=0), draw_samples(dst, 64, seed=0))


def test_float32_caveat_beta_not_power_of_two(tmp_path):
    """beta = 0.3: V = alpha log Z is rounded to float32 once; the round trip is within one ulp."""
    src = make_checkpoint(tmp_path / "rtb.safetensors", "rtb", 0.7, beta=0.3)
    convert_checkpoint(src, "trust-pcl", tmp_path / "t.safetensors")
    convert_checkpoint(tmp_path / "t.safetensors", "rtb", tmp_path / "r.safetensors")
    lz0, v, lz1 = (load_checkpoint(p) for p in (src, tmp_path / "t.safetensors", tmp_path / "r.safetensors"))
    assert float(np.float32(lz0.scalar("log_z") / 0.3)) == v.scalar("v_soft_s0")  # correctly rounded
    assert abs(lz1.scalar("log_z") - lz0.scalar("log_z")) <= 2.0**-23 * 0.7
    assert v.meta["alpha"] == repr(1 / 0.3) and lz1.meta["beta"] == repr(0.3)  # metadata exact, not via float32


def batch_losses(rtb_path: Path, tpcl_path: Path) -> tuple[float, float, float]:
    """rtb and trust-pcl losses, in float64, on one batch of trajectories of the rtb file's policy."""
    rck, tck = load_checkpoint(rtb_path), load_checkpoint(tpcl_path)

    def lp(ck, traj):  # per-step (T, B) log-probs of the file's own policy and prior
        return tuple(ck.sampler(s, dtype=torch.float64).requires_grad_(False).step_log_probs(traj) for s in ("policy", "prior"))

    policy = rck.sampler("policy", dtype=torch.float64).requires_grad_(False)
    traj = policy.sample(256, 0.0, torch.Generator().manual_seed(0))
    (lpf, lpp), (step_lpf, step_lpp) = lp(rck, traj), lp(tck, traj)
    log_r = Task(rck.preset).log_reward(traj[-1])
    beta = float(rck.meta["beta"])
    alpha = float(tck.meta["alpha"])
    log_z = torch.tensor(rck.scalar("log_z"), dtype=torch.float64)
    v = torch.tensor(tck.scalar("v_soft_s0"), dtype=torch.float64)
    l_rtb = rtb_loss(log_z, lpf.sum(0), lpp.sum(0), log_r, beta)
    l_tpcl = trust_pcl_loss(v, step_lpf, step_lpp, outcome_rewards(log_r, policy.steps), alpha)
    return l_rtb.item(), l_tpcl.item(), alpha


def test_losses_agree_after_conversion(rtb_ck, tpcl_ck, tmp_path):
    convert_checkpoint(rtb_ck, "trust-pcl", tmp_path / "t.safetensors")
    l_rtb, l_tpcl, alpha = batch_losses(rtb_ck, tmp_path / "t.safetensors")
    assert alpha == 2.0 and l_rtb > 1e-3
    assert l_tpcl == pytest.approx(alpha**2 * l_rtb, rel=1e-9)

    convert_checkpoint(tpcl_ck, "rtb", tmp_path / "r.safetensors")
    l_rtb, l_tpcl, alpha = batch_losses(tmp_path / "r.safetensors", tpcl_ck)
    assert l_rtb == pytest.approx(l_tpcl / alpha**2, rel=1e-9)


@pytest.mark.parametrize(
    "case",
    [
        "bad-to",
        "same-path",
        "same-path-spelled-differently",
        "prior",
        "reinforce-kl",
        "legacy-rl",
        "already-rtb",
        "missing",
        "corrupt",
        "not-rtbcli",
        "damaged",
        "inconsistent-beta",
        "float32-overflow",
        "out-folder-missing",
        "out-is-a-folder",
    ],
)
def test_checkpoint_errors(case, rtb_ck, tmp_path, monkeypatch):
    src, to, out = rtb_ck, "trust-pcl", tmp_path / "out.safetensors"
    if case == "bad-to":
        to = "reinforce-kl"
    elif case == "same-path":
        out = rtb_ck
    elif case == "same-path-spelled-differently":
        monkeypatch.chdir(tmp_path)
        out = Path("sub/../rtb.safetensors")
        (tmp_path / "sub").mkdir()
    elif case == "prior":
        src = make_checkpoint(tmp_path / "p.safetensors", "", None, kind="prior")
    elif case in ("reinforce-kl", "legacy-rl"):
        src = make_checkpoint(tmp_path / "k.safetensors", case, None)
    elif case == "already-rtb":
        to = "rtb"
    elif case == "missing":
        src = tmp_path / "nope.safetensors"
    elif case == "corrupt":
        src = tmp_path / "junk.safetensors"
        src.write_bytes(b"\x00not a safetensors file")
    elif case == "not-rtbcli":
        from safetensors.torch import save_file

        src = tmp_path / "foreign.safetensors"
        save_file({"w": torch.ones(2)}, str(src))
    elif case == "damaged":  # labelled rtb, but no log_z
        ck = load_checkpoint(rtb_ck)
        src = tmp_path / "damaged.safetensors"
        save_checkpoint(src, {k: v for k, v in ck.tensors.items() if k != "log_z"}, ck.meta)
    elif case == "inconsistent-beta":  # metadata beta disagrees with the config's
        ck = load_checkpoint(rtb_ck)
        src = tmp_path / "damaged.safetensors"
        save_checkpoint(src, ck.tensors, {**ck.meta, "beta": "0.25", "alpha": "4.0"})
    elif case == "float32-overflow":  # V = 1e10 / 1e-30 does not fit a float32
        src = make_checkpoint(tmp_path / "big.safetensors", "rtb", 1e10, beta=1e-30)
    elif case == "out-is-a-folder":
        out = tmp_path / "folder"
        out.mkdir()
    elif case == "out-folder-missing":
        out = tmp_path / "no" / "such" / "out.safetensors"
    before = src.read_bytes() if src.exists() else None
    with pytest.raises(InputError) as e:
        convert_checkpoint(src, to, out)
    assert "\n" not in str(e.value)
    assert (src.read_bytes() if src.exists() else None) == before
    if out != src and case not in ("same-path-spelled-differently", "out-is-a-folder"):
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


# --------------------------------------------------------------------------- CLI
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.run(["convert-params", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_json(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def test_cli_numbers_json(capsys):
    code, out, err = run_cli(capsys, "--log-z", "2", "--beta", "0.5", "--json")
    assert code == 0 and one_json(out) == {"alpha": 2.0, "v_soft_s0": 4.0}
    assert list(one_json(out)) == ["alpha", "v_soft_s0"]
    code, out, err = run_cli(capsys, "--alpha", "2", "--v-soft-s0", "4", "--json")
    assert code == 0 and one_json(out) == {"beta": 0.5, "log_z": 2.0}
    code, out, err = run_cli(capsys, "--log-z", "-2", "--beta", "0.25", "--json")
    assert code == 0 and one_json(out) == {"alpha": 4.0, "v_soft_s0": -8.0}


def test_cli_numbers_table(capsys):
    code, out, err = run_cli(capsys, "--log-z", "2", "--beta", "0.5")
    assert code == 0 and err == ""
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert rows["alpha = 1/beta"] == "2" and rows["v_soft_s0 = alpha log_z"] == "4"
    code, out, err = run_cli(capsys, "--alpha", "2", "--v-soft-s0", "4")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert code == 0 and rows["beta = 1/alpha"] == "0.5" and rows["log_z = v_soft_s0 / alpha"] == "2"


def test_cli_checkpoint(capsys, rtb_ck, tmp_path):
    before = rtb_ck.read_bytes()
    out = tmp_path / "t.safetensors"
    code, stdout, err = run_cli(capsys, str(rtb_ck), "--to", "trust-pcl", "--out", str(out), "--json")
    assert code == 0, err
    r = one_json(stdout)
    assert r["checkpoint"] == str(out) and r["from"] == "rtb" and r["to"] == "trust-pcl"
    assert r["alpha"] == 2.0 and r["v_soft_s0"] == 2 * r["log_z"] and r["sha256"] == sha256_file(out)
    assert load_checkpoint(out).algo == "trust-pcl" and rtb_ck.read_bytes() == before
    code, stdout, err = run_cli(capsys, str(out), "--to", "RTB", "-o", str(tmp_path / "r.safetensors"))
    assert code == 0 and "trust-pcl -> rtb" in stdout and load_checkpoint(tmp_path / "r.safetensors").algo == "rtb"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--log-z", "2"], "--beta"),
        (["--beta", "0.5"], "--log-z"),
        (["--alpha", "2"], "--v-soft-s0"),
        (["--v-soft-s0", "4"], "--alpha"),
        (["--log-z", "2", "--beta", "0.5", "--alpha", "2", "--v-soft-s0", "4"], "mix"),
        (["--log-z", "2", "--alpha", "2"], "mix"),
        ([], "nothing to convert"),
        (["--log-z", "2", "--beta", "0"], "--beta"),
        (["--log-z", "2", "--beta", "-1"], "--beta"),
        (["--log-z", "2", "--beta", "inf"], "--beta"),
        (["--log-z", "2", "--beta", "nan"], "--beta"),
        (["--log-z", "nan", "--beta", "0.5"], "--log-z"),
        (["--log-z", "-inf", "--beta", "0.5"], "--log-z"),
        (["--alpha", "0", "--v-soft-s0", "4"], "--alpha"),
        (["--alpha", "2", "--v-soft-s0", "inf"], "--v-soft-s0"),
        (["--log-z", "1", "--beta", "1e-320"], "overflows"),
        (["--to", "rtb", "--out", "x.safetensors"], "checkpoint"),
        (["CKPT", "--log-z", "2", "--beta", "0.5", "--to", "rtb", "--out", "OUT"], "checkpoint"),
        (["CKPT", "--out", "OUT"], "--to"),
        (["CKPT", "--to", "trust-pcl"], "--out"),
        (["CKPT"], "--to and --out"),
        (["CKPT", "--to", "trust-pcl", "--out", "CKPT"], "input checkpoint itself"),
        (["CKPT", "--to", "rtb", "--out", "OUT"], "already"),
        (["CKPT", "--to", "legacy-rl", "--out", "OUT"], "--to"),
        (["MISSING", "--to", "trust-pcl", "--out", "OUT"], "not found"),
        (["CKPT", "--to", "trust-pcl", "--out", "NODIR"], "does not exist"),
    ],
)
def test_cli_errors(capsys, rtb_ck, tmp_path, args, needle):
    before = rtb_ck.read_bytes()
    subst = {
        "CKPT": str(rtb_ck),
        "OUT": str(tmp_path / "out.safetensors"),
        "MISSING": str(tmp_path / "missing.safetensors"),
        "NODIR": str(tmp_path / "nodir" / "out.safetensors"),
    }
    code, out, err = run_cli(capsys, *[subst.get(a, a) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("rtbcli: error:") and err.count("\n") == 1 and needle in err, err
    assert rtb_ck.read_bytes() == before and not (tmp_path / "out.safetensors").exists()


def test_conversion_reads_the_objective_registry():
    """The convertible objectives are the registry's objectives with a learned scalar, and the scalar map is the
    registry's alpha^k log Z; rtb -> trust-pcl stays exactly rtb_to_trust_pcl_params (V = log Z / beta)."""
    from rtbcli.conversion import TARGETS, convert_scalar
    from rtbcli.objectives import OBJECTIVES

    assert TARGETS == tuple(n for n, o in OBJECTIVES.items() if o.scalar is not None) and {"rtb", "trust-pcl"} <= set(TARGETS)
    for beta in (0.3, 0.5, 2.0):
        for a in TARGETS:
            for b in TARGETS:
                want = OBJECTIVES[b].scalar_from_log_z(OBJECTIVES[a].log_z(1.7, 1 / beta), 1 / beta)
                assert convert_scalar(1.7, a, b, beta) == pytest.approx(want, rel=1e-15)
        assert convert_scalar(0.7, "rtb", "trust-pcl", beta) == rtb_to_trust_pcl_params(0.7, beta)["v_soft_s0"]
        assert convert_scalar(4.0, "trust-pcl", "rtb", beta) == pytest.approx(trust_pcl_to_rtb_params(1 / beta, 4.0)["log_z"], rel=1e-15)
