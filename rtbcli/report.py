"""Reports: every key an evaluation can hold, the tables people read, and `--require` checks.

`REPORT_KEYS` is the one list of what `rtbcli evaluate --json` may print (a key is absent when
its tier does not apply to the task); `--require 'KEY OP NUMBER'` accepts exactly these keys
(and `floor.KEY`).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from .errors import InputError

REPORT_KEYS: dict[str, str] = {
    # what was scored
    "checkpoint": "the checkpoint file", "kind": "prior or finetuned", "algo": "the objective it was trained with",
    "preset": "the preset it was trained under", "suite": "the benchmark suite recognised (generic, digits, manywell32)",
    "dim": "the dimension d", "n": "samples scored", "seed": "the evaluation seed", "step": "training steps done",
    "beta": "the target's inverse temperature", "target": "the target", "target_method": "exact, grid, sir or reference",
    # tier 1
    "log_r_mean": "mean log r over the samples", "log_r_q05": "5% quantile of log r", "log_r_q25": "25% quantile of log r",
    "log_r_q50": "median log r", "log_r_q75": "75% quantile of log r", "log_r_q95": "95% quantile of log r",
    "elbo_prior": "mean(lpp + beta log r - lpf) <= log Z relative to the learned prior",
    "log_z_is": "log Z by importance sampling (relative to the prior; for a prior checkpoint, to the data)",
    "ess_fraction": "effective sample size fraction of those importance weights, in (0, 1]",
    "path_kl": "mean(lpf - lpp): the path KL to the prior, >= the KL between the marginals",
    "log_z_learned": "learned log Z (rtb) or V(s0) / alpha (trust-pcl)", "v_soft_s0": "learned V(s0) (trust-pcl)",
    "alpha": "alpha = 1 / beta (trust-pcl)",
    # tier 2
    "sw2": "sliced Wasserstein-2 distance to the reference samples", "sw2_floor": "the same between two halves of the reference",
    "mmd2": "unbiased MMD^2 (RBF kernel, median bandwidth) to the reference", "mmd2_floor": "the same between two halves of the reference",
    "mmd_bandwidth": "the one kernel bandwidth of mmd2 and mmd2_floor: the median pairwise distance of the reference",
    "n_compared": "sample size of each side of sw2/mmd2", "n_reference": "reference samples available",
    "n_dropped_nonfinite": "model samples dropped as non-finite",
    "n_far": "model samples outside the reference's bounding box widened on every side by its largest width (diverged trajectories)", "reference": "what the reference samples are",
    # tier 3
    "mode_coverage": "target modes with q_k >= p_k / 4", "n_target_modes": "target modes", "kl_mode": "mode-weight KL",
    "off_target": "mass outside the target modes' cells", "kl_hist": "histogram KL (2-D)", "floor": "the exact sampler's values",
    "cells": "per-mode target mass and frequency, and 'elsewhere'",
    "log_z_true": "the exact log Z of the target", "log_z_is_data": "log Z_data by importance sampling against the data density",
    "elbo": "ELBO <= log Z_data", "eubo": "EUBO >= log Z_data",
    # suites
    "well_mass_max_abs_err": "manywell: max over pairs of |left-well mass - exact|",
    "well_mass_mean_abs_err": "manywell: mean over pairs of |left-well mass - exact|",
    "well_mass_max_abs_err_floor": "manywell: the same for exact samples", "well_mass_mean_abs_err_floor": "manywell: the same for exact samples",
    "well_masses": "manywell: left-well mass of each pair", "well_masses_exact": "manywell: exact left-well masses",
    "digit": "digits: the class c", "class_fraction": "digits: fraction classified as c",
    "class_fraction_target": "digits: the target's own class fraction, by self-normalised importance weights of these samples",
    "class_fraction_real": "digits: the same for held-out real images of c", "diversity": "digits: mean pairwise distance",
    "diversity_real": "digits: the same for real images of c", "nearest_train_distance": "digits: mean distance to the nearest training image",
    "nearest_train_distance_real": "digits: the same for held-out real images",
    "plot": "the figure written",
}
FLOOR_KEYS = ("mode_coverage", "n_target_modes", "kl_mode", "off_target", "kl_hist")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_CHECK = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Check:
    key: str
    op: str
    value: float
    text: str

    def lookup(self, report: dict):
        v = report
        for part in self.key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return v

    def passes(self, report: dict) -> tuple[bool, object]:
        v = self.lookup(report)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
            return False, v
        return bool(OPS[self.op](v, self.value)), v


def parse_check(text: str) -> Check:
    """'kl_mode < 0.05' -> Check; unknown keys and bad syntax are input errors (before any work)."""
    m = _CHECK.match(text)
    if not m:
        raise InputError(f"--require '{text}': write KEY OP NUMBER with OP one of < <= > >= == != (e.g. 'kl_mode < 0.05')")
    key, op, num = m.groups()
    head, _, rest = key.partition(".")
    if head == "floor" and rest in FLOOR_KEYS:
        pass
    elif key not in REPORT_KEYS or key in ("floor", "cells", "well_masses", "well_masses_exact"):
        close = [k for k in REPORT_KEYS if k.startswith(key[:3])][:4]
        raise InputError(f"--require '{text}': '{key}' is not a number in an evaluation report"
                         + (f" (did you mean {', '.join(close)}?)" if close else "") + "; see `rtbcli evaluate --help`")
    return Check(key, op, float(num), text.strip())


def run_checks(checks: list[Check], report: dict) -> list[dict]:
    return [{"check": c.text, "value": v, "passed": ok} for c in checks for ok, v in [c.passes(report)]]


# ----------------------------------------------------------------------------- tables
def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, escape(fmt(v)))
    return t


def evaluation_table(m: dict) -> Table:
    """The metrics of one evaluation, tier by tier, with the floor beside each sample metric."""
    t = Table(title=escape(f"{m['checkpoint']}  ({m['kind']}{', ' + m['algo'] if m['algo'] else ''}; d = {m['dim']}, n = {m['n']:,})"),
              title_justify="left", caption=escape(f"target: {m['target']} [{m['target_method']}]"), caption_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("model", justify="right")
    t.add_column("floor", justify="right")
    f = m.get("floor", {})
    if "kl_mode" in m or "kl_hist" in m:
        cov = lambda d: "-" if d.get("mode_coverage") is None else f"{d['mode_coverage']}/{d['n_target_modes']}"
        t.add_row("mode coverage", cov(m), cov(f))
        t.add_row("mode-weight KL", fmt(m.get("kl_mode")), fmt(f.get("kl_mode")))
        t.add_row("off-target mass", pct(m.get("off_target")), pct(f.get("off_target")))
        t.add_row("histogram KL", fmt(m.get("kl_hist")), fmt(f.get("kl_hist")))
        t.add_section()
    if "reference" in m:
        t.add_row("reference samples", escape(m["reference"]), "")
    if "sw2" in m:
        t.add_row(f"sliced W2 (n = {m['n_compared']:,})", fmt(m["sw2"]), fmt(m["sw2_floor"]))
        t.add_row("MMD^2", fmt(m["mmd2"]), fmt(m["mmd2_floor"]))
        if m.get("n_far"):
            t.add_row("samples far outside the reference (diverged)", f"{m['n_far']:,}", "")
        t.add_section()
    if "well_mass_mean_abs_err" in m:
        t.add_row("left-well mass error, mean over pairs", fmt(m["well_mass_mean_abs_err"]), fmt(m["well_mass_mean_abs_err_floor"]))
        t.add_row("left-well mass error, max over pairs", fmt(m["well_mass_max_abs_err"]), fmt(m["well_mass_max_abs_err_floor"]))
        t.add_section()
    if "class_fraction" in m:
        t.add_row(f"classified as {m['digit']}", pct(m["class_fraction"]), pct(m["class_fraction_real"]) + " (real)")
        if "class_fraction_target" in m:
            t.add_row("  the target's own, by importance weights", pct(m["class_fraction_target"]), "")
        t.add_row("diversity (mean pairwise distance)", fmt(m["diversity"]), fmt(m["diversity_real"]) + " (real)")
        t.add_row("nearest training image", fmt(m["nearest_train_distance"]), fmt(m["nearest_train_distance_real"]) + " (real)")
        t.add_section()
    if "log_r_mean" in m:
        t.add_row("log r: mean (5% / 50% / 95%)", f"{fmt(m['log_r_mean'])} ({fmt(m['log_r_q05'])} / {fmt(m['log_r_q50'])} / {fmt(m['log_r_q95'])})", "")
    if m.get("algo") == "trust-pcl":
        t.add_row("V(s0) learned (alpha)", f"{fmt(m['v_soft_s0'])} ({fmt(m['alpha'])})", "")
    if "log_z_learned" in m:
        t.add_row("log Z learned", fmt(m["log_z_learned"]), "")
    if "elbo_prior" in m:
        t.add_row("log Z_prior, importance-weighted (ESS)", f"{fmt(m['log_z_is'])} ({100 * m['ess_fraction']:.1f}%)", "")
        t.add_row("ELBO vs learned prior", fmt(m["elbo_prior"]), "")
        t.add_row("path KL to the prior", fmt(m["path_kl"]), "")
    if "elbo" in m:
        t.add_row("log Z_data true", fmt(m.get("log_z_true")), "")
        t.add_row("log Z_data, importance-weighted", fmt(m["log_z_is_data"]), "")
        t.add_row("ELBO <= log Z_data <= EUBO", f"{fmt(m['elbo'])} <= . <= {fmt(m.get('eubo'))}", "")
        if m["kind"] == "prior":
            t.add_row("ESS of the weights", f"{100 * m['ess_fraction']:.1f}%", "")
    return t


def checks_table(results: list[dict]) -> Table:
    t = Table(title="required checks", title_justify="left")
    for c in ("check", "value", "result"):
        t.add_column(c)
    for r in results:
        t.add_row(escape(r["check"]), escape(fmt(r["value"])), "pass" if r["passed"] else "FAIL")
    return t


def summary_table(summary: dict) -> Table:
    """`rtbcli reproduce`: one row per method, the prior and the floor; columns by what the task reports."""
    rows = [summary["prior_row"], *summary["rows"], summary["floor"]]
    have = lambda key: any(r.get(key) is not None for r in rows)
    cols = [("modes", None), ("mode KL", "kl_mode"), ("off-target", "off_target"), ("hist KL", "kl_hist"),
            ("well err", "well_mass_mean_abs_err"), ("well err max", "well_mass_max_abs_err"), ("class", "class_fraction"), ("class (target, IS)", "class_fraction_target"), ("diversity", "diversity"),
            ("sliced W2", "sw2"), ("MMD^2", "mmd2"), ("far", "n_far"), ("log Z", "log_z_learned"), ("log Z (IS)", "log_z_is"),
            ("log Z_data (IS)", "log_z_is_data"), ("ELBO", "elbo"), ("EUBO", "eubo"), ("train s", "train_seconds")]
    modes = have("kl_mode")  # the mode metrics say it all; sliced W2, MMD^2, the EUBO and log Z_data stay in summary.json
    cols = [(name, key) for name, key in cols if (key is None and have("mode_coverage")) or (key is not None and have(key))
            and not (modes and key in ("sw2", "mmd2", "eubo", "log_z_is_data")) and (key != "n_far" or any(r.get("n_far") for r in rows))]
    t = Table(title=escape(f"reproduce {summary['preset']} ({'quick' if summary['quick'] else 'full'}; n = {summary['eval_n']:,}, "
                           f"seed {summary['seed']})"), title_justify="left")
    t.add_column("method", no_wrap=True)
    for name, _ in cols:
        t.add_column(name, justify="right", no_wrap=True)

    def cell(row: dict, key: str | None) -> str:
        if key is None:
            return "-" if row.get("mode_coverage") is None else f"{row['mode_coverage']}/{row['n_target_modes']}"
        v = row.get(key)
        if v is None:
            return "-"
        if key in ("off_target", "class_fraction", "class_fraction_target"):
            return f"{100 * v:.1f}%"
        if key in ("train_seconds", "n_far"):
            return f"{v:.0f}"
        return f"{v:.4f}" if key in ("kl_mode", "well_mass_mean_abs_err", "well_mass_max_abs_err", "mmd2") else f"{v:.3f}"

    for i, row in enumerate(rows):
        style = "dim" if i == 0 else ("italic" if i == len(rows) - 1 else None)
        cells = ["diverged", *["-"] * (len(cols) - 1)] if row.get("diverged") else [cell(row, key) for _, key in cols]
        t.add_row(escape(row["method"]), *cells, style=style)
    return t
