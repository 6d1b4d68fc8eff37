"""Why ManyWell-32 samples diverged, and the box term of pretraining that removes the cause.

The cause (measured on the prior shipped before the box term): pretraining's NLL constrains the drift only where the
data's bridges go; beyond them the network extrapolated freely, and on one coordinate (x1 of pair 15) it pointed
outward (f = -71 at x1 = -4, t = 0.99, where the exact drift is +115), so the rare sample that wandered past the left
well (x1 ~ -3) was pushed out geometrically: 8 of 100,000 prior samples ended at |x| > 6, and fine-tuned samplers,
whose target is p_prior * r, inherited them. The exact drift's implied endpoint x + (1 - t) f*(x, t) = E[x_T | x_t = x]
lies in the data's box at every x; the box term penalises the distance to the box at states wider than the bridges.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtbcli.checkpoint import load_checkpoint
from rtbcli.presets_loader import load_preset
from rtbcli.pretrain import BOX_SPREAD, box_loss, box_residuals, data_box, pairs_loss, setup, train_step
from rtbcli.tasks import Task


class _TimeOnly(nn.Module):
    """A drift f(x, t) given as a function; the 'time table' is t itself (on the uniform grid), so box_residuals sees the true t."""

    uniform = True

    def __init__(self, steps: int, drift):
        super().__init__()
        self.steps, self.drift = steps, drift

    def time_table(self) -> torch.Tensor:
        return (torch.arange(self.steps, dtype=torch.float64) / self.steps)[:, None]

    def net(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.drift(x, temb[:, :1])


def _two_point_exact(sigma2: float):
    """The exact drift for data {-1, +1} (equal weights) in 1-D: (E[y | x_t = x] - x) / (1 - t), E[y | x] = tanh(t x / v)."""

    def drift(x, t):
        v = sigma2 * t * (1 - t)
        return (torch.tanh(t * x / v) - x) / (1 - t)

    return drift


def test_box_residual_of_a_zero_drift_is_the_hand_value():
    """f = 0: m = x; x = (2.0, 0.5) at t = 1/2 in the box [-1, 1]^2 is 1.0 out on the first coordinate: 1 / (1/2)^2 = 4."""
    s = _TimeOnly(4, lambda x, t: torch.zeros_like(x))
    box = (torch.full((2,), -1.0, dtype=torch.float64), torch.full((2,), 1.0, dtype=torch.float64))
    x = torch.tensor([[2.0, 0.5], [0.3, -0.2], [-1.5, -3.0]], dtype=torch.float64)
    r = box_residuals(s, x, torch.tensor([2, 3, 1]), box)  # t = 1/2, 3/4, 1/4
    # row 3: distances (0.5, 2.0) at t = 1/4: (0.25 + 4) / (3/4)^2
    torch.testing.assert_close(r, torch.tensor([4.0, 0.0, 4.25 / 0.5625], dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_the_exact_drift_pays_nothing_even_far_from_the_data():
    """The box term is zero at the exact drift at every state (here up to 50 units out), and positive for an outward one."""
    sigma2, T = 2.0, 10
    exact = _two_point_exact(sigma2)
    box = (torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    x = torch.linspace(-50, 50, 201, dtype=torch.float64)[:, None].repeat(T - 1, 1)
    i = torch.arange(1, T).repeat_interleave(201)
    # zero up to the rounding of x + (1 - t) (m - x) / (1 - t) at |x| = 50 (1e-14 out, squared)
    assert float(box_residuals(_TimeOnly(T, exact), x, i, box).abs().max()) < 1e-24
    # 10 units outward on top: the endpoint moves 10 (1 - t) beyond where it was
    outward = _TimeOnly(T, lambda x, t: exact(x, t) + 10 * torch.sign(x))
    r = box_residuals(outward, torch.tensor([[4.0]], dtype=torch.float64), torch.tensor([5]), box)  # t = 1/2
    m = math.tanh(0.5 * 4.0 / (sigma2 * 0.25)) + 0.5 * 10  # the exact endpoint plus 5
    assert float(r) == pytest.approx(((m - 1.0) / 0.5) ** 2, rel=1e-12)


def test_box_loss_is_in_the_nll_units(float64, reference):
    """box_loss = T dt mean(residual) / (2 sigma2) on its own draws: states BOX_SPREAD times wider than the bridge's."""
    from test_sampler import seeded

    task = Task(reference)
    s = seeded(4, std=0.5, steps=5)
    box = data_box(task)
    n = 4000
    g = torch.Generator().manual_seed(11)
    loss = box_loss(s, task, box, n, g)
    g = torch.Generator().manual_seed(11)  # the same draws, in the same order
    i = torch.randint(0, 5, (n,), generator=g)
    t = (i.double() / 5)[:, None]
    y = task.data.sample(n, g, dtype=torch.float64)
    x = t * y + BOX_SPREAD * torch.sqrt(5.0 * t * (1 - t)) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    want = box_residuals(s, x, i, box).mean() / (2 * 5.0)  # T dt = 1
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert loss.item() > 0  # a random network's endpoints leave the box somewhere


def test_the_data_box_is_the_range_of_the_rows(reference):
    lo, hi = data_box(Task(reference))
    assert lo.shape == hi.shape == (2,)
    assert float(lo.max()) < -10.0 and float(hi.min()) > 10.0  # the outer modes at +-10 with std 0.55
    assert float(lo.min()) > -14.0 and float(hi.max()) < 14.0


@pytest.mark.usefixtures("one_thread")
def test_pretraining_adds_the_weighted_box_term(float64, tiny_preset, tmp_path):
    """A step's loss is the pairs loss plus box_weight times box_loss on a quarter as many states, from the run's generator."""
    preset = tiny_preset.updated("pretrain", box_weight=0.7, batch_size=8)
    run = setup(preset, "tiny", tmp_path / "p.safetensors", seed=5)
    run.sampler.double()
    run.box = tuple(b.double() for b in run.box)  # type: ignore[assignment]
    g = torch.Generator()
    g.set_state(run.gen.get_state())
    n = 8 * run.sampler.steps
    with torch.no_grad():
        want = pairs_loss(run.sampler, run.task, n, g) + 0.7 * box_loss(run.sampler, run.task, run.box, n // 4, g)
    from rtbcli.distributed import Dist

    got = train_step(run, Dist())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_the_box_term_brings_extrapolated_endpoints_into_the_box(tiny_preset):
    """Where it is used: a short pretraining run with the box term leaves the endpoints at wide states near the box,
    one without it does not (so this fails if pretraining stops constraining the drift beyond the data)."""
    from rtbcli.distributed import Dist

    def residual(box_weight: float) -> float:
        preset = tiny_preset.updated("pretrain", box_weight=box_weight, steps=150, batch_size=32, lr=3e-3, lr_schedule="constant")
        run = setup(preset, "tiny", "unused.safetensors", seed=2)
        run.box = data_box(run.task) if run.box is None else run.box
        for _ in range(150):
            train_step(run, Dist())
        with torch.no_grad():
            return float(box_loss(run.sampler, run.task, run.box, 20_000, torch.Generator().manual_seed(99)))

    with_box, without = residual(10.0), residual(0.0)
    assert with_box < 0.2 * without, (with_box, without)


def test_the_manywell32_preset_pretrains_with_the_box_term():
    assert load_preset("manywell32")[0].pretrain.box_weight > 0


def test_the_manywell32_preset_and_its_shipped_prior_use_the_time_grid_of_power_2():
    """The grid that took the prior's path KL from 3.4 to 1.9 nats (README): the preset pretrains on it, and the
    shipped prior was pretrained on it (reproduce refuses a prior whose sampler differs from the preset's)."""
    from importlib.resources import files

    preset = load_preset("manywell32")[0]
    assert preset.sampler.time_power == 2.0
    assert load_checkpoint(str(files("rtbcli") / "data" / "prior-manywell32.safetensors")).preset.sampler == preset.sampler


@pytest.mark.slow
def test_the_shipped_manywell32_prior_has_no_diverging_sample():
    """The shipped prior (pretrained with the box term): none of 100,000 samples ends outside the data's box widened by
    its width (n_far), and its drift at the box's edge at t = 0.99 points back in on every coordinate."""
    from importlib.resources import files

    ck = load_checkpoint(str(files("rtbcli") / "data" / "prior-manywell32.safetensors"))
    s = ck.sampler("policy")
    g = torch.Generator().manual_seed(0)
    task = Task(ck.preset, allow_import=False)
    lo, hi = data_box(task)
    width = float((hi - lo).max())
    far = 0
    for _ in range(10):
        x = s.sample(10_000, 0.0, g)[-1].double()
        far += int(((x < lo - width) | (x > hi + width) | ~torch.isfinite(x)).any(1).sum())
    assert far == 0
    i = torch.full((32,), 99)
    with torch.no_grad():
        for edge, sign in ((lo, 1.0), (hi, -1.0)):
            x = torch.diag(edge.float() - sign * 1.0)  # one coordinate 1 beyond the edge, the others at 0
            f = s.net(x, s.time_table()[i])
            assert bool((sign * f.diagonal() > 0).all()), f.diagonal()


def test_a_negative_box_weight_is_a_one_line_input_error(tmp_path, reference):
    from conftest import to_toml
    from rtbcli.errors import InputError

    data = reference.model_dump()
    data["pretrain"]["box_weight"] = -1.0
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(data))
    with pytest.raises(InputError, match=r"bad value for 'pretrain.box_weight'") as e:
        load_preset(str(path))
    assert "\n" not in str(e.value)
