"""Energy mode through the schema, the presets and the command line (issue 18, part 1 and evaluate).

Sampling pi with no data: a preset's [target] (or --target), the Brownian prior, the derived
reward, the checkpoint that records them, and `rtbcli evaluate`'s table keys.
"""

from __future__ import annotations

import json

import pytest
import torch

from rtbcli.cli import run
from rtbcli.errors import InputError
from rtbcli.gaussian import centred_log_prob
from rtbcli.presets_loader import load_preset, parse_preset
from rtbcli.tasks import Task

ENERGY_PRESETS = {"gmm25-energy": (2, 5.0), "funnel": (10, 1.0), "manywell-energy": (32, 1.0)}


# ----------------------------------------------------------------------------- schema and presets
@pytest.mark.parametrize("name", sorted(ENERGY_PRESETS))
def test_energy_presets_carry_the_papers_protocol(name):
    p, _ = load_preset(name)
    d, s2 = ENERGY_PRESETS[name]
    assert p.energy and p.prior_data is None and p.reward is None and p.beta == 1.0
    assert (p.dim, p.sampler.steps, p.sampler.sigma2) == (d, 100, s2)
    f = p.finetune
    assert (f.steps, f.batch_size, f.lr, f.lr_logz, p.evaluate.n) == (25_000, 300, 1e-3, 0.1, 2_000)


def test_energy_presets_are_listed(capsys):
    assert run(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, (d, _) in ENERGY_PRESETS.items():
        assert rows[name]["dim"] == d and rows[name]["reward"] == "derived (energy)"


TARGET = '[target]\nlog_density = "rtbcli.energy.targets:gmm25"\n'


@pytest.mark.parametrize(
    "extra,match",
    [
        ("[prior_data]\nmeans = [[0.0, 0.0]]\nvariance = 1.0\n", r"with no data: remove \[prior_data\]"),
        ('[reward]\ntype = "python"\nfunction = "m:f"\n', r"derives its reward .*: remove \[reward\]"),
    ],
)
def test_a_target_preset_refuses_data_and_reward(extra, match):
    with pytest.raises(InputError, match=match) as e:
        parse_preset(f'name = "t"\n{TARGET}{extra}', "t.toml")
    assert "\n" not in str(e.value)


def test_a_target_preset_is_at_beta_one_and_a_preset_needs_data_or_target():
    with pytest.raises(InputError, match=r"at beta = 1 .*remove beta"):
        parse_preset(f'name = "t"\nbeta = 2.0\n{TARGET}', "t.toml")
    with pytest.raises(InputError, match=r"missing key 'prior_data' \(or give \[target\]"):
        parse_preset('name = "t"\n', "t.toml")


def test_shipped_targets_take_their_constructor_kwargs_and_unknown_ones_are_named():
    p = parse_preset(f'name = "t"\n{TARGET.replace("gmm25", "manywell")}[target.kwargs]\npairs = 2\n', "t.toml")
    assert Task(p).dim == 4
    with pytest.raises(InputError, match=r"unknown shipped target .*gmm25.*funnel.*manywell"):
        Task(parse_preset(f'name = "t"\n{TARGET.replace("gmm25", "gmm9")}', "t.toml"))
    with pytest.raises(InputError, match=r"bad \[target.kwargs\]"):
        Task(parse_preset(f'name = "t"\n{TARGET}[target.kwargs]\nwidth = 2\n', "t.toml"))


def test_the_energy_task_is_the_brownian_prior_and_the_derived_reward():
    """data = N(0, sigma2 I) (the prior's exact terminal law); log r = log pi - log N(0, sigma2 I), so p_data r = pi."""
    p, _ = load_preset("gmm25-energy")
    task = Task(p)
    x = torch.randn(64, 2, dtype=torch.float64) * 4
    pi = task.energy.log_density(x)
    torch.testing.assert_close(task.data_log_prob(x), centred_log_prob(x, 5.0))
    torch.testing.assert_close(task.log_reward(x), pi - centred_log_prob(x, 5.0))
    torch.testing.assert_close(task.data_log_prob(x) + task.log_reward(x), pi)
    assert task.energy.log_z == 0.0
