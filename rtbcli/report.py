"""Reports: the tables people read, and `--require` checks, both read from `rtbcli.metric_registry`.

`REPORT_KEYS` (every key `rtbcli evaluate --json` may print, with its meaning) is the registry's;
`--require 'KEY OP NUMBER'` accepts its number keys and `floor.KEY`.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from . import metric_registry as reg
from .errors import InputError
from .objectives import OBJECTIVES

REPORT_KEYS: dict[str, str] = {k: m.doc for k, m in reg.METRICS.items()}
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_CHECK = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Check:
    key: str
    op: str
    value: float
    text: str

    def lookup(self, report: dict):
        return reg.lookup(report, self.key)

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
    if key not in reg.requirable():
        if key in reg.RENAMED:
            hint = f" (renamed '{reg.RENAMED[key]}')"
        else:
            close = [k for k in reg.requirable() if k.startswith(key[:3])][:4]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"--require '{text}': '{key}' is not a number in an evaluation report{hint}; see `rtbcli evaluate --help`")
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


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, escape(fmt(v)))
    return t


def evaluation_table(m: dict) -> Table:
    """The metrics of one evaluation, tier by tier, with the floor beside each metric that has one."""
    t = Table(
        title=escape(f"{m['checkpoint']}  ({m['kind']}{', ' + m['algo'] if m['algo'] else ''}; d = {m['dim']}, n = {m['n']:,})"),
        title_justify="left",
        caption=escape(f"target: {m['target']} [{m['target_method']}]"),
        caption_justify="left",
    )
    t.add_column("metric", style="bold")
    t.add_column("model", justify="right")
    t.add_column("floor", justify="right")
    for tier in ("3", "2", "suite"):
        rows = _metric_rows(m, tier)
        if tier == "2" and "reference" in m:
            rows.insert(0, ("reference samples", escape(m["reference"]), ""))
        for row in rows:
            t.add_row(*row)
        if rows:
            t.add_section()
    for row in _log_z_rows(m):
        t.add_row(*row)
    return t


def _metric_rows(m: dict, tier: str) -> list[tuple[str, str, str]]:
    """(label, model, floor) for the registry's labelled metrics of `tier` present in the report; a count without a
    floor only where it is nonzero. Labels may name other keys: 'sliced W2 (n = {n_compared:,})'."""
    rows = []
    for x in reg.METRICS.values():
        if x.tier != tier or x.label is None or x.key not in m or (tier == "3" and x.floor is None):  # log Z: _log_z_rows
            continue
        v = m[x.key]
        if x.floor is None and x.fmt == "count" and not v:
            continue
        label = x.label.format_map(m) if "{" in x.label else x.label
        floor = ""
        if x.floor is not None:
            where = m.get("floor") if x.floor.startswith("floor.") else m
            floor = reg.format_value(x.key, reg.floor_of(m, x.key), report=where) + (" (real)" if x.floor.endswith("_real") else "")
        rows.append((escape(label), escape(reg.format_value(x.key, v, report=m)), escape(floor)))
    return rows


def _log_z_rows(m: dict) -> list[tuple[str, str, str]]:
    """The reward, the learned scalar, and log Z with its bounds (model column only)."""

    def f(key):
        return reg.format_value(key, m.get(key))

    def label(key):
        return reg.METRICS[key].label

    rows = []
    if "log_r_mean" in m:
        rows.append(("log r: mean (5% / 50% / 95%)", f"{f('log_r_mean')} ({f('log_r_q05')} / {f('log_r_q50')} / {f('log_r_q95')})"))
    obj = OBJECTIVES.get(m.get("algo") or "")
    if obj is not None and obj.scalar_alpha_power and obj.scalar in m:  # a scalar other than log Z itself, beside its alpha
        rows.append((f"{obj.scalar} learned (alpha)", f"{fmt(m[obj.scalar])} ({fmt(m.get('alpha'))})"))
    if "log_z_learned" in m:
        rows.append((label("log_z_learned"), f("log_z_learned")))
    if "elbo_prior" in m:
        rows += [
            (f"{label('log_z_is')} (ESS)", f"{f('log_z_is')} ({f('ess_fraction')})"),
            (label("elbo_prior"), f("elbo_prior")),
            (label("path_kl"), f("path_kl")),
        ]
    if "elbo" in m:
        rows += [
            (label("log_z_true"), f("log_z_true")),
            (label("log_z_is_data"), f("log_z_is_data")),
            ("ELBO <= log Z_data <= EUBO", f"{f('elbo')} <= . <= {f('eubo')}"),
        ]
        if "elbo_prior" not in m:  # ess_fraction is then the data-relative weights' (a prior scored without a reward)
            rows.append(("ESS of the weights", f("ess_fraction")))
    return [(escape(a), escape(b), "") for a, b in rows]


def checks_table(results: list[dict]) -> Table:
    t = Table(title="required checks", title_justify="left")
    for c in ("check", "value", "result"):
        t.add_column(c)
    for r in results:
        t.add_row(escape(r["check"]), escape(fmt(r["value"])), "pass" if r["passed"] else "FAIL")
    return t


def summary_columns(rows: list[dict], every: bool = False) -> list[str]:
    """The registry's summary columns that some row has (with mode metrics, those kept to summary.json left out unless
    `every`; the far-sample count only where some row has far samples)."""

    def have(key):
        return any(r.get(key) is not None for r in rows)

    modes = have("kl_mode") and not every
    return [
        k
        for k in reg.SUMMARY_COLUMNS
        if have(k) and not (modes and k in reg.BESIDE_MODES_ONLY_IN_JSON) and (k != "n_far" or any(r.get("n_far") for r in rows))
    ]


def summary_cell(row: dict, key: str) -> str:
    """One cell of a summary table: a reproduce row's value of `key`, formatted by the registry."""
    if key in ("train_seconds", "peak_memory_mb"):
        return "-" if row.get(key) is None else f"{row[key]:.0f}"
    if key == "trainable_parameters":
        return "-" if row.get(key) is None else f"{row[key]:,}"
    return reg.format_value(key, row.get(key), summary=True, report=row)


def summary_table(summary: dict) -> Table:
    """`rtbcli reproduce`: one row per method, the prior and the floor; columns by what the task reports."""
    rows = [summary["prior_row"], *summary["rows"], summary["floor"]]
    runs = {"trainable_parameters": "trainable", "peak_memory_mb": "peak MB", "train_seconds": "train s"}  # a run's, not a metric
    cols = summary_columns(rows) + [k for k in runs if any(r.get(k) is not None for r in rows)]
    t = Table(
        title=escape(
            f"reproduce {summary['preset']} ({'quick' if summary['quick'] else 'full'}; n = {summary['eval_n']:,}, seed {summary['seed']})"
        ),
        title_justify="left",
    )
    t.add_column("method", no_wrap=True)
    for key in cols:
        t.add_column((reg.METRICS[key].short or key) if key in reg.METRICS else runs[key], justify="right", no_wrap=True)
    for i, row in enumerate(rows):
        style = "dim" if i == 0 else ("italic" if i == len(rows) - 1 else None)
        cells = ["diverged", *["-"] * (len(cols) - 1)] if row.get("diverged") else [summary_cell(row, key) for key in cols]
        t.add_row(escape(row["method"]), *cells, style=style)
    return t
