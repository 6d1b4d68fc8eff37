"""Tasks beyond the reference one: the `mixture` reward kind, the SIR target, and a 5-D task end to end."""

from __future__ import annotations

import math

import pytest
import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.config import Preset
from rtbcli.evaluate import evaluate
from rtbcli.finetune import finetune
from rtbcli.pretrain import pretrain
from rtbcli.suites import tilted_target
from rtbcli.targets import CELL_MASS
from rtbcli.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")


def log_gauss(x: torch.Tensor, mean, var: float) -> torch.Tensor:
    """log N(x; mean, var I), written out."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    d = x.shape[-1]
    return -0.5 * ((x - mean) ** 2).sum(-1) / var - 0.5 * d * math.log(2 * math.pi * var)


def log_mix(x: torch.Tensor, means, variance: float, weights) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return torch.logsumexp(torch.stack([log_gauss(x, m, variance) + lw for m, lw in zip(means, w.log())]), 0)


DATA3 = {"means": [[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], "variance": 0.5, "weights": [1, 2, 1]}


def preset3(reward: dict, beta: float = 1.0) -> Preset:
    return Preset.model_validate(
        {"name": "three-d", "beta": beta, "prior_data": DATA3, "reward": reward, "sampler": {"steps": 10, "hidden": 16, "time_features": 8}}
    )


# ----------------------------------------------------------------------------- the reward kinds
def test_mixture_reward_is_log_q_and_ratio_is_log_q_minus_log_p():
    q = {"means": [[2.0, 0.0, 0.0], [0.0, 3.0, 1.0]], "variance": 1.0, "weights": [3, 1]}
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    log_q = log_mix(x, q["means"], 1.0, q["weights"])
    log_p = log_mix(x, DATA3["means"], 0.5, DATA3["weights"])
    plain = Task(preset3({"type": "mixture", "mixture": q}))
    ratio = Task(preset3({"type": "mixture_ratio", "mixture": q}))
    torch.testing.assert_close(plain.log_reward(x), log_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ratio.log_reward(x), log_q - log_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain.data_log_prob(x), log_p, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the SIR target
def exact_log_z(q_means, q_var: float, q_weights, beta: float) -> float:
    """log int p_data(x) q(x)^beta dx for the Gaussian mixture p_data = DATA3 and a Gaussian q
    (beta any) or a mixture q (beta = 1): Gaussian products integrate to Gaussians of the means."""
    d, pv = 3, DATA3["variance"]
    pw = torch.tensor(DATA3["weights"], dtype=torch.float64)
    pw = pw / pw.sum()
    if beta == 1.0:
        qw = torch.tensor(q_weights, dtype=torch.float64)
        qw = qw / qw.sum()
        terms = [
            math.log(pw[j]) + math.log(qw[k]) + float(log_gauss(torch.tensor(mu, dtype=torch.float64), nu, pv + q_var))
            for j, mu in enumerate(DATA3["means"])
            for k, nu in enumerate(q_means)
        ]
        return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))
    assert len(q_means) == 1
    # N(x; nu, s2)^beta = (2 pi s2)^(-d beta / 2) (2 pi s2 / beta)^(d / 2) N(x; nu, s2 / beta)
    log_c = -0.5 * d * beta * math.log(2 * math.pi * q_var) + 0.5 * d * math.log(2 * math.pi * q_var / beta)
    terms = [
        math.log(pw[j]) + float(log_gauss(torch.tensor(mu, dtype=torch.float64), q_means[0], pv + q_var / beta))
        for j, mu in enumerate(DATA3["means"])
    ]
    return log_c + float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))


@pytest.mark.parametrize(
    "q,beta",
    [
        ({"means": [[2.0, 0.0, 0.0], [0.0, 3.0, 1.0]], "variance": 1.0, "weights": [3, 1]}, 1.0),
        ({"means": [[1.0, 1.0, 0.0]], "variance": 2.0}, 0.5),
        ({"means": [[1.0, 1.0, 0.0]], "variance": 2.0}, 2.0),
    ],
)
def test_sir_target_log_z_against_the_exact_value(q, beta):
    task = Task(preset3({"type": "mixture", "mixture": q}, beta))
    t = tilted_target(task, beta)
    assert t.method == "sir" and not t.log_z_exact
    exact = exact_log_z(q["means"], q["variance"], q.get("weights"), beta)
    assert t.log_z == pytest.approx(exact, abs=0.01)
    # its samples are the tilted target's: the mean of x under p q^beta, by importance weights on fresh data
    xs = task.data.sample(200_000, torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.softmax(beta * task.log_reward(xs), 0)
    mean = (w[:, None] * xs).sum(0)
    got = t.sample(20_000, torch.Generator().manual_seed(2)).mean(0)
    assert (got - mean).abs().max() < 0.05


# ----------------------------------------------------------------------------- a 5-D task end to end
MEANS5 = [[4.0, 0, 0, 0, 0], [-4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, -4.0, 0, 0, 0]]


def chi2_5_cdf(x: float) -> float:
    """P(chi^2_5 <= x), closed form for 5 degrees of freedom."""
    return math.erf(math.sqrt(x / 2)) - math.sqrt(2 * x / math.pi) * math.exp(-x / 2) * (1 + x / 3)


def test_five_dimensional_task_end_to_end(tmp_path):
    preset = Preset.model_validate(
        {
            "name": "five-d",
            "beta": 1.0,
            "prior_data": {"means": MEANS5, "variance": 0.5},
            "reward": {"type": "mixture_ratio", "mixture": {"means": MEANS5[:2], "variance": 0.5, "weights": [1, 3]}},
            "sampler": {"steps": 10, "hidden": 16, "time_features": 8},
            "pretrain": {"steps": 30, "batch_size": 32, "lr": 1e-2},
            "finetune": {"steps": 5, "batch_size": 32},
        }
    )
    prior_path, ft_path = tmp_path / "prior.safetensors", tmp_path / "ft.safetensors"
    pretrain(preset, "five-d", prior_path, seed=0, progress=False)
    prior = load_checkpoint(prior_path)
    finetune(prior, preset, "five-d", "rtb", ft_path, seed=0, progress=False)
    n = 2000
    ev = evaluate(load_checkpoint(ft_path), n=n, seed=0)
    m = ev.metrics
    assert ev.samples.shape == (n, 5) and m["dim"] == 5 and m["target_method"] == "exact"
    assert m["n_target_modes"] == 2 and m["kl_hist"] is None and m["log_z_true"] == 0.0
    for key in ("kl_mode", "off_target", "elbo", "eubo", "log_z_is", "log_z_learned", "sw2", "mmd2"):
        assert math.isfinite(m[key]), key
    # the mode cells hold 97.65% of a component in any dimension: the radius is the chi^2_5 quantile
    radius = ev.target.radius
    assert chi2_5_cdf(radius**2 / 0.5) == pytest.approx(CELL_MASS, abs=1e-9)
    assert radius > 1.5 * math.sqrt(0.5 / 0.3)  # wider than the 2-D radius at this variance
    # the exact sampler's own off-target mass is 1 - 0.9765 (it was 18% with the 2-D radius)
    assert m["floor"]["off_target"] == pytest.approx(1 - CELL_MASS, abs=4 * math.sqrt(CELL_MASS * (1 - CELL_MASS) / n))
    # the prior scored against the same target: its 4 equal modes against the target's 1:3 on two
    assert evaluate(prior, n=n, seed=0, beta=1.0).metrics["kl_mode"] > 0.3
