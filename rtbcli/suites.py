"""Benchmark suites: tasks that know more about their target than a generic task does.

A suite is recognised from the preset (a shipped dataset with the reward that goes with it) and
adds, on top of the generic evaluation:

- `manywell32` (with `rtbcli.rewards.manywell:tilt`): the exact tilted target (samples, log Z),
  and each pair's left-well mass against the exact one, beside the exact-sampler floor;
- `digits` (with `rtbcli.rewards.digits:log_p_class`): held-out real images as reference samples
  (of the class c at beta = 1, where the target is p(x | c)), the classifier's class fraction,
  diversity and nearest-training-image distance beside real images', and image-grid figures.

- `energy` (a preset with [target]): the target pi / Z, exact for the shipped targets (log Z, samples;
  gmm25's mode cells), and the Table 1 metrics of Sendera et al. 2024 (`rtbcli.evaluate`).

Everything else gets the generic `Suite`, which adds nothing. Suites own their targets:
`prior_target(task)` and `tilted_target(task, beta)` here are what evaluation compares with (the
suite's own where it has one, else the generic ones of `rtbcli.targets`).
"""

from __future__ import annotations

import math

import torch

from .config import DatasetSpec, PythonRewardSpec
from .datasets.digits import check_digit, digits_data
from .datasets.digits_metrics import digits_report
from .datasets.manywell import ManyWell, well_mass_errors
from .datasets.manywell import tilted_target as manywell_tilted_target
from .energy.targets import GMM25
from .errors import InputError
from .metrics import hist_edges, mixture_bin_masses
from .targets import Target, accepted_rows, generic_prior_target, generic_tilted_target, shell_mass
from .tasks import Task

MANYWELL_REWARD = "rtbcli.rewards.manywell:tilt"
DIGITS_REWARD = "rtbcli.rewards.digits:log_p_class"


class Suite:
    """No special knowledge: the generic targets, no extra metrics."""

    name = "generic"

    def prior_target(self, task: Task) -> Target:
        return generic_prior_target(task)

    def tilted_target(self, task: Task, beta: float) -> Target:
        return generic_tilted_target(task, beta)

    def extra_metrics(
        self, task: Task, x: torch.Tensor, target: Target, finetuned: bool, seed: int, log_weights: torch.Tensor | None = None
    ) -> dict:
        return {}

    own_figure = False  # the suite draws sample panels its own way (`plot_samples`), not as scatter plots
    figure_samples = 0  # samples a panel of that figure shows

    def plot_samples(self, path, panels: list[tuple[str, torch.Tensor]], title: str | None = None) -> None:
        """Draw a figure of sample panels the suite's own way (only where `own_figure`)."""
        raise NotImplementedError


def _reward_kwargs(task: Task, function: str) -> dict | None:
    spec = task.preset.reward
    if isinstance(spec, PythonRewardSpec) and spec.function == function:
        return dict(spec.kwargs)
    return None


class ManyWellSuite(Suite):
    name = "manywell32"

    def _tilt(self, task: Task) -> tuple[int, float] | None:
        kw = _reward_kwargs(task, MANYWELL_REWARD)
        if kw is None:
            return None
        return int(kw.get("pairs", 8)), float(kw.get("c", 1.0))

    def prior_target(self, task: Task) -> Target:
        mw = ManyWell()
        return Target(
            description="p_data (ManyWell-32)",
            method="exact",
            log_z=0.0,
            log_z_exact=True,
            sample=lambda n, g: mw.sample(n, g, dtype=torch.float64),
            log_density=mw.log_prob,
            extra={"well_masses": mw.left_well_masses()},
        )

    def tilted_target(self, task: Task, beta: float) -> Target:
        tilt = self._tilt(task)
        if tilt is None:
            return super().tilted_target(task, beta)
        pairs, c = tilt
        mw, log_z = manywell_tilted_target(beta, pairs, c)
        return Target(
            description=f"ManyWell-32 tilted on {pairs} pairs (c = {c:g}, beta = {beta:g})",
            method="exact",
            log_z=log_z,
            log_z_exact=True,
            sample=lambda n, g: mw.sample(n, g, dtype=torch.float64),
            log_density=lambda x: mw.log_prob(x) + log_z,
            extra={"well_masses": mw.left_well_masses()},
        )

    def extra_metrics(
        self, task: Task, x: torch.Tensor, target: Target, finetuned: bool, seed: int, log_weights: torch.Tensor | None = None
    ) -> dict:
        exact = target.extra.get("well_masses")
        if exact is None or target.sample is None:
            return {}
        m = well_mass_errors(x, exact)
        floor = well_mass_errors(target.sample(x.shape[0], torch.Generator().manual_seed(seed + 3)), exact)
        return {
            "well_mass_max_abs_err": m["well_mass_max_abs_err"],
            "well_mass_mean_abs_err": m["well_mass_mean_abs_err"],
            "well_mass_max_abs_err_floor": floor["well_mass_max_abs_err"],
            "well_mass_mean_abs_err_floor": floor["well_mass_mean_abs_err"],
            "well_masses": [round(v, 6) for v in m["well_masses"]],
            "well_masses_exact": [round(float(v), 6) for v in exact],
        }


class DigitsSuite(Suite):
    name = "digits"

    def digit(self, task: Task) -> int | None:
        kw = _reward_kwargs(task, DIGITS_REWARD)
        return None if kw is None or "digit" not in kw else check_digit(kw["digit"])

    def prior_target(self, task: Task) -> Target:
        held = digits_data("heldout").double()
        return Target(
            description="p_data (the digits images)",
            method="reference",
            reference=held,
            reference_note=f"the {held.shape[0]} held-out images",
        )

    def tilted_target(self, task: Task, beta: float) -> Target:
        c = self.digit(task)
        if c is None:
            return super().tilted_target(task, beta)
        description = f"p_data * p(c = {c} | x)^beta (beta = {beta:g})"
        if abs(beta - 1.0) < 1e-12:
            ref = digits_data("heldout", c).double()
            note = f"the {ref.shape[0]} held-out real images of class {c} (the target at beta = 1 is p(x | c))"
        else:
            held = digits_data("heldout").double()
            ref = accepted_rows(held, beta * task.log_reward_rows(held))
            note = f"{ref.shape[0]} of {held.shape[0]} held-out images, accepted with probability r^beta / max r^beta"
        return Target(description=description, method="reference", reference=ref, reference_note=note)

    def extra_metrics(
        self, task: Task, x: torch.Tensor, target: Target, finetuned: bool, seed: int, log_weights: torch.Tensor | None = None
    ) -> dict:
        c = self.digit(task)
        if c is None:
            return {}
        return {"digit": c, **digits_report(x.float(), c, log_weights)}

    own_figure, figure_samples = True, 64  # an 8 x 8 grid of images per panel

    def plot_samples(self, path, panels, title=None) -> None:
        from .datasets.digits_plots import plot_digit_grids  # matplotlib: imported only to draw

        plot_digit_grids(path, panels, title=title, n=self.figure_samples)


class EnergySuite(Suite):
    """Energy mode (a [target], the Brownian prior): the target pi / Z itself, exact where the target ships with rtbcli
    (its log Z and exact sampler; for gmm25 also its 25 mode cells and histogram masses); a user's target has neither."""

    name = "energy"

    def tilted_target(self, task: Task, beta: float) -> Target:
        energy = task.energy
        assert energy is not None
        shipped = energy.shipped
        if shipped is None:
            return Target(description=f"pi = exp({energy.reference}) / Z (no exact samples or log Z)", method="density")
        target = Target(
            description=f"pi = {shipped.name} (d = {shipped.dim}, exact log Z and samples)",
            method="exact",
            log_z=float(shipped.log_z),
            log_z_exact=True,
            sample=lambda n, g: shipped.sample(n, g, dtype=torch.float64),
            log_density=lambda x: shipped.log_density(x.double()),
        )
        return _with_gmm25_cells(target, shipped, task) if isinstance(shipped, GMM25) else target


def _with_gmm25_cells(target: Target, gmm: GMM25, task: Task) -> Target:
    """gmm25's mode metrics: 25 equal-weight cells of radius 1.5 (the reference task's, docs/maths.md#metrics) and exact bin masses."""
    ev, radius = task.preset.evaluate, 1.5
    k = gmm.means.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    m = shell_mass(2, gmm.variance, radius)
    target.cell_means, target.radius = gmm.means, radius
    target.cell_masses = torch.cat([w * m, torch.tensor([1.0 - m], dtype=torch.float64)])
    target.target_modes, target.mode_weights = w > 0, w
    target.bin_masses = mixture_bin_masses(gmm.means, w, math.sqrt(gmm.variance), hist_edges(ev.hist_half_width, ev.hist_bin))
    target.hist_half_width, target.hist_bin = ev.hist_half_width, ev.hist_bin
    return target


def suite_of(task: Task) -> Suite:
    if task.energy is not None:
        return EnergySuite()
    spec = task.preset.prior_data
    if isinstance(spec, DatasetSpec):
        if spec.dataset == "manywell32":
            return ManyWellSuite()
        if spec.dataset == "digits":
            return DigitsSuite()
    return Suite()


def prior_target(task: Task) -> Target:
    """The prior data distribution itself (what a prior checkpoint should sample), as the task's suite knows it."""
    return suite_of(task).prior_target(task)


def tilted_target(task: Task, beta: float) -> Target:
    """p_data(x) r(x)^beta / Z as the task's suite knows it: exact where known, else grid (2-D), SIR, or reference rows."""
    return suite_of(task).tilted_target(task, beta)


def check_suite(task: Task) -> None:
    """Bad benchmark settings are input errors before a run (a digit outside 0-9)."""
    suite = suite_of(task)
    if isinstance(suite, DigitsSuite):
        try:
            suite.digit(task)
        except InputError as e:
            raise InputError(f"reward.kwargs: {e}") from None
