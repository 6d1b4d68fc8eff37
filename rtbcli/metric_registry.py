"""Every key an evaluation report can hold, said once: its meaning, tier, format and floor.

`rtbcli evaluate --json` prints a subset of `METRICS` (a key is absent where its tier does not apply;
docs/maths.md#evaluation-tiers); the tables (`rtbcli.report`), `rtbcli reproduce`'s rows and floor row,
the figures' headlines, benchmarks/summary_table.py and `--require` all read this registry, so a new
metric is one entry here.

Naming: a count of effective samples is `*ess` (the training log's `weights_ess`); a fraction is
`ess_fraction`. A metric's floor (what an exact sampler of the target scores at the same size) lives
where `Metric.floor` says: `floor.KEY` (the exact-sampler floor of the mode metrics, a nested dict) or
a top-level key (`sw2_floor`, `class_fraction_real`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TIERS = {
    "run": "what was scored",
    "1": "the reward and the importance weights relative to the prior",
    "2": "distances to reference samples",
    "3": "exact mode metrics and log Z of a known target",
    "suite": "a benchmark suite's own metrics",
    "output": "what the command wrote",
}


@dataclass(frozen=True)
class Metric:
    key: str
    doc: str  # one line
    tier: str  # a key of TIERS
    fmt: str = "num"  # num (4 significant digits; 3 decimals in summaries), fine (4 decimals in summaries), pct, count,
    #                   coverage (k/K with n_target_modes), text, json
    floor: str | None = None  # where its floor lives in a report: "floor.KEY" or a top-level key
    label: str | None = None  # its row in the evaluation table (None: not a row of its own)
    short: str | None = None  # its column in summary tables and its name in figure headlines
    row: bool = False  # kept in `rtbcli reproduce`'s rows (summary.json)

    @property
    def number(self) -> bool:
        """A number `--require` can check."""
        return self.fmt not in ("text", "json")


def _m(key, doc, tier, fmt="num", floor=None, label=None, short=None, row=False) -> Metric:
    return Metric(key, doc, tier, fmt, floor, label, short or label, row)


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        # what was scored
        _m("checkpoint", "the checkpoint file", "run", "text"),
        _m("kind", "prior or finetuned", "run", "text"),
        _m("algo", "the objective it was trained with", "run", "text"),
        _m("preset", "the preset it was trained under", "run", "text"),
        _m("suite", "the benchmark suite recognised (generic, digits, manywell32)", "run", "text"),
        _m("dim", "the dimension d", "run", "count"),
        _m("n", "samples scored", "run", "count"),
        _m("seed", "the evaluation seed", "run", "count"),
        _m("step", "training steps done", "run", "count"),
        _m("beta", "the target's inverse temperature", "run"),
        _m("target", "the target", "run", "text"),
        _m("target_method", "exact, grid, sir or reference", "run", "text"),
        # tier 1
        _m("log_r_mean", "mean log r over the samples", "1", row=True),
        *(_m(f"log_r_q{q:02d}", f"{q}% quantile of log r" if q != 50 else "median log r", "1") for q in (5, 25, 50, 75, 95)),
        _m(
            "elbo_prior",
            "mean(lpp + beta log r - lpf) <= log Z relative to the learned prior",
            "1",
            label="ELBO vs learned prior",
            row=True,
        ),
        _m(
            "log_z_is",
            "log Z by importance sampling (relative to the prior; for a prior checkpoint, to the data)",
            "1",
            label="log Z_prior, importance-weighted",
            short="log Z (IS)",
            row=True,
        ),
        _m(
            "ess_fraction",
            "effective sample size of those importance weights as a fraction of n, in (0, 1]",
            "1",
            "pct",
            label="ESS",
            row=True,
        ),
        _m(
            "path_kl",
            "mean(lpf - lpp): the path KL to the prior, >= the KL between the marginals",
            "1",
            label="path KL to the prior",
            row=True,
        ),
        _m("log_z_learned", "learned log Z (rtb) or V(s0) / alpha (trust-pcl)", "1", label="log Z learned", short="log Z", row=True),
        _m("v_soft_s0", "learned V(s0) (trust-pcl)", "1"),
        _m("alpha", "alpha = 1 / beta (trust-pcl)", "1"),
        # tier 3: the mode metrics, each beside the exact sampler's value (the nested `floor`)
        _m("mode_coverage", "target modes with q_k >= p_k / 4", "3", "coverage", "floor.mode_coverage", "mode coverage", "modes", row=True),
        _m("n_target_modes", "target modes", "3", "count", "floor.n_target_modes", row=True),
        _m("kl_mode", "mode-weight KL", "3", "fine", "floor.kl_mode", "mode-weight KL", "mode KL", row=True),
        _m("off_target", "mass outside the target modes' cells", "3", "pct", "floor.off_target", "off-target mass", "off-target", row=True),
        _m("kl_hist", "histogram KL (2-D)", "3", "num", "floor.kl_hist", "histogram KL", "hist KL", row=True),
        # suites
        _m(
            "well_mass_mean_abs_err",
            "manywell: mean over pairs of |left-well mass - exact|",
            "suite",
            "fine",
            "well_mass_mean_abs_err_floor",
            "left-well mass error, mean over pairs",
            "well err",
            row=True,
        ),
        _m(
            "well_mass_max_abs_err",
            "manywell: max over pairs of |left-well mass - exact|",
            "suite",
            "fine",
            "well_mass_max_abs_err_floor",
            "left-well mass error, max over pairs",
            "well err max",
            row=True,
        ),
        _m("well_mass_max_abs_err_floor", "manywell: the same for exact samples", "suite", "fine"),
        _m("well_mass_mean_abs_err_floor", "manywell: the same for exact samples", "suite", "fine"),
        _m("well_masses", "manywell: left-well mass of each pair", "suite", "json"),
        _m("well_masses_exact", "manywell: exact left-well masses", "suite", "json"),
        _m("digit", "digits: the class c", "suite", "count"),
        _m(
            "class_fraction",
            "digits: fraction classified as c",
            "suite",
            "pct",
            "class_fraction_real",
            "classified as {digit}",
            "class",
            row=True,
        ),
        _m(
            "class_fraction_target",
            "digits: the target's own class fraction, by self-normalised importance weights of these samples",
            "suite",
            "pct",
            None,
            "  the target's own, by importance weights",
            "class (target, IS)",
            row=True,
        ),
        _m("class_fraction_real", "digits: the same for held-out real images of c", "suite", "pct"),
        _m(
            "diversity",
            "digits: mean pairwise distance",
            "suite",
            "num",
            "diversity_real",
            "diversity (mean pairwise distance)",
            "diversity",
            row=True,
        ),
        _m("diversity_real", "digits: the same for real images of c", "suite"),
        _m(
            "diversity_target",
            "digits: the target's own diversity, by self-normalised importance weights of these samples",
            "suite",
            "num",
            None,
            "  the target's own, by importance weights",
            "diversity (target, IS)",
            row=True,
        ),
        _m(
            "nearest_train_distance",
            "digits: mean distance to the nearest training image",
            "suite",
            "num",
            "nearest_train_distance_real",
            "nearest training image",
            "nearest train",
            row=True,
        ),
        _m("nearest_train_distance_real", "digits: the same for held-out real images", "suite"),
        # tier 2
        _m(
            "sw2",
            "sliced Wasserstein-2 distance to the reference samples",
            "2",
            "num",
            "sw2_floor",
            "sliced W2 (n = {n_compared:,})",
            "sliced W2",
            row=True,
        ),
        _m("sw2_floor", "the same between two halves of the reference", "2", row=True),
        _m(
            "mmd2",
            "unbiased MMD^2 (Gaussian kernel, bandwidth mmd_bandwidth) to the reference",
            "2",
            "fine",
            "mmd2_floor",
            "MMD^2",
            row=True,
        ),
        _m("mmd2_floor", "the same between two halves of the reference, with the same bandwidth", "2", "fine", row=True),
        _m(
            "mmd_bandwidth", "the one kernel bandwidth of mmd2 and mmd2_floor: the median pairwise distance of the reference", "2", row=True
        ),
        _m(
            "nn_dist",
            "mean distance from a sample to its nearest reference row: above its floor, samples spread off a thin reference",
            "2",
            "num",
            "nn_dist_floor",
            "distance to the nearest reference row",
            "nn dist",
            row=True,
        ),
        _m("nn_dist_floor", "the same for the other half of the reference", "2", row=True),
        _m("n_compared", "sample size of each side of sw2/mmd2/nn_dist", "2", "count", row=True),
        _m("n_reference", "reference samples available", "2", "count"),
        _m("n_dropped_nonfinite", "model samples dropped as non-finite", "2", "count"),
        _m(
            "n_far",
            "model samples outside the reference's bounding box widened on every side by its largest width (diverged trajectories)",
            "2",
            "count",
            label="samples far outside the reference (diverged)",
            short="far",
            row=True,
        ),
        _m("reference", "what the reference samples are", "2", "text"),
        # tier 3: log Z of a known target
        _m("floor", "the exact sampler's values of the mode metrics", "3", "json"),
        _m("cells", "per-mode target mass and frequency, and 'elsewhere'", "3", "json"),
        _m("log_z_true", "the exact log Z of the target", "3", label="log Z_data true", row=True),
        _m(
            "log_z_is_data",
            "log Z_data by importance sampling against the data density",
            "3",
            label="log Z_data, importance-weighted",
            short="log Z_data (IS)",
            row=True,
        ),
        _m("elbo", "ELBO <= log Z_data (energy mode: mean(lw), lw = log pi + lpb - lpf)", "3", label="ELBO", row=True),
        _m(
            "eubo",
            "EUBO >= log Z_data (energy mode: mean(lw) over exact samples of pi with bridge trajectories)",
            "3",
            label="EUBO",
            row=True,
        ),
        # energy mode: Table 1 of Sendera et al. 2024 (rtbcli.energy.metrics.table_from_weights derives them, in one place)
        _m(
            "log_z_rw",
            "energy mode: log mean exp(lw), lw = log pi + lpb - lpf (log Z^RW; log_z_is_data of the Brownian prior's law)",
            "suite",
            label="log Z, importance-weighted (RW)",
            short="log Z (RW)",
            row=True,
        ),
        _m(
            "delta_log_z",
            "energy mode: |log_z_true - elbo| (Table 1's delta log Z)",
            "suite",
            label="delta log Z (ELBO)",
            short="dlogZ",
            row=True,
        ),
        _m(
            "delta_log_z_rw",
            "energy mode: |log_z_true - log_z_rw| (Table 1's delta log Z^RW)",
            "suite",
            label="delta log Z (RW)",
            short="dlogZ RW",
            row=True,
        ),
        _m(
            "w2",
            "energy mode: exact 2-Wasserstein distance (POT emd2, squared Euclidean cost) between n_w2 model and n_w2 exact samples",
            "suite",
            "num",
            "w2_floor",
            label="W2, exact OT (n = {n_w2:,})",
            short="W2",
            row=True,
        ),
        _m("w2_floor", "energy mode: the same between two independent sets of n_w2 exact samples", "suite", row=True),
        _m(
            "w2_stratified",
            "energy mode, 25GMM: w2 against n_w2 samples drawn with an equal count per mode, as the paper's code drew its Table 1 "
            "reference (not exact: it removes the mode counts' multinomial noise and lowers W2)",
            "suite",
            "num",
            "w2_stratified_floor",
            label="W2 vs stratified (the paper's protocol)",
            short="W2 strat",
            row=True,
        ),
        _m("w2_stratified_floor", "energy mode, 25GMM: the same between n_w2 exact samples and the stratified draw", "suite", row=True),
        _m(
            "log_pi_mean",
            "energy mode: mean log pi(x) over the model's (finite) samples; below log_pi_mean_exact, the sampler puts mass where "
            "pi is low (too wide, or between modes); it bounds the ELBO gap's marginal part",
            "suite",
            "num",
            "log_pi_mean_exact",
            label="mean log pi (exact samples)",
            short="E log pi",
            row=True,
        ),
        _m("log_pi_mean_exact", "energy mode: mean log pi(y) over the n exact samples of the target", "suite", row=True),
        _m("n_w2", "energy mode: samples of each side of w2", "suite", "count", row=True),
        _m("plot", "the figure written", "output", "text"),
    )
}

RENAMED = {"ess": "ess_fraction"}  # old report keys, named in the error that meets them
# reproduce's summary table, in this order ("train s" follows); with mode metrics the rest stay in summary.json
SUMMARY_COLUMNS = (
    "mode_coverage",
    "kl_mode",
    "off_target",
    "kl_hist",
    "well_mass_mean_abs_err",
    "well_mass_max_abs_err",
    "class_fraction",
    "class_fraction_target",
    "diversity",
    "sw2",
    "mmd2",
    "n_far",
    "log_z_learned",
    "log_z_is",
    "log_z_is_data",
    "elbo",
    "eubo",
    "delta_log_z",
    "delta_log_z_rw",
    "w2",
)
BESIDE_MODES_ONLY_IN_JSON = ("sw2", "mmd2", "eubo", "log_z_is_data")
HEADLINE = (
    "mode_coverage",
    "kl_mode",
    "off_target",
    "kl_hist",
    "sw2",
    "mmd2",
    "delta_log_z",
    "delta_log_z_rw",
    "w2",
)  # a figure's headline, where present


def metric(key: str) -> Metric:
    return METRICS[key]


def floor_keys() -> tuple[str, ...]:
    """The keys of a report's nested `floor` (the exact sampler's mode metrics)."""
    return tuple(m.key for m in METRICS.values() if m.floor == f"floor.{m.key}")


def with_floor() -> tuple[Metric, ...]:
    """The metrics that have a floor, in registry order."""
    return tuple(m for m in METRICS.values() if m.floor is not None)


def row_keys() -> tuple[str, ...]:
    """The keys `rtbcli reproduce` keeps in each row of summary.json."""
    return tuple(m.key for m in METRICS.values() if m.row)


def lookup(report: dict, path: str):
    """report['a']['b'] for 'a.b'; None where any part is missing."""
    v: object = report
    for part in path.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def floor_of(report: dict, key: str):
    """The floor of `key` in a report, or None."""
    m = METRICS[key]
    return None if m.floor is None else lookup(report, m.floor)


def requirable() -> tuple[str, ...]:
    """Every KEY `--require 'KEY OP NUMBER'` accepts: the number keys and floor.KEY."""
    return tuple(m.key for m in METRICS.values() if m.number) + tuple(f"floor.{k}" for k in floor_keys())


def format_value(key: str, v, summary: bool = False, report: dict | None = None) -> str:
    """`v` as the tables show metric `key`: 4 significant digits (fixed decimals in summaries), percentages, counts, k/K."""
    if v is None:
        return "-"
    fmt = METRICS[key].fmt if key in METRICS else "num"
    if fmt == "coverage":
        k = (report or {}).get("n_target_modes")
        return f"{v}/{k}" if k is not None else str(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if fmt == "pct":
        return f"{100 * v:.1f}%" if summary else f"{100 * v:.2f}%"
    if fmt == "count":
        return f"{v:.0f}"
    if summary:
        return f"{v:.4f}" if fmt == "fine" else f"{v:.3f}"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
