"""Print a `rtbcli reproduce` summary.json as a Markdown table (for the README), or the same table from
`rtbcli evaluate --json` outputs of separate runs (one row each, labelled; the exact sampler's floor row from the first).

    python benchmarks/summary_table.py runs/full/summary.json [--all]
    python benchmarks/summary_table.py --evals "prior (no fine-tuning)=prior.json" rtb=rtb.json ... [--all]

The columns and their formats are the ones `rtbcli reproduce` prints (rtbcli.metric_registry), so the
README's tables and the terminal's agree; `--all` adds the columns the terminal leaves to summary.json
where the task has mode metrics (sliced W2, MMD^2, log Z_data by IS, EUBO).
"""

import json
import sys
from pathlib import Path
from typing import NoReturn

from rtbcli.metric_registry import METRICS
from rtbcli.report import summary_cell, summary_columns
from rtbcli.reproduce_common import floor_row, metrics_of
from rtbcli.script_support import run_script


def markdown(summary: dict, every: bool = False) -> str:
    """The summary as a Markdown table: the prior, every method, the floor; the registry's summary columns."""
    rows = [summary["prior_row"], *summary["rows"], summary["floor"]]
    cols = summary_columns(rows, every) + (["train_seconds"] if any(r.get("train_seconds") is not None for r in rows) else [])
    names = [METRICS[k].short if k in METRICS else "train s" for k in cols]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        cells = ["diverged", *["-"] * (len(cols) - 1)] if r.get("diverged") else [summary_cell(r, k) for k in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


USAGE = "usage: python benchmarks/summary_table.py SUMMARY.json [--all]  or  --evals LABEL=EVAL.json ... [--all]"


def fail(msg: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    print(msg, file=sys.stderr)
    sys.exit(2)


def train_seconds(report: dict) -> float | None:
    """A trained checkpoint's training seconds (fine-tuned, or a prior pretrained by rtbcli): the last record of its
    log (FILE.jsonl beside FILE.safetensors), none without one."""
    log = Path(report["checkpoint"]).with_suffix(".jsonl")
    if report.get("kind") not in ("finetuned", "prior") or not log.exists():
        return None
    last = log.read_text().strip().splitlines()[-1]
    return float(json.loads(last)["seconds"])


def from_evaluations(labelled: list[str]) -> dict:
    """A summary of `rtbcli evaluate --json` reports given as LABEL=FILE: each report's row under its label, with the
    training seconds its log records; the floor row of the first report. Every report must score the same target."""
    rows: list[dict] = []
    target, floor = None, {}
    for item in labelled:
        label, sep, path = item.rpartition("=")
        if not sep or not label:
            fail(f"--evals takes LABEL=FILE.json, got '{item}'")
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"--evals: cannot read '{path}' as an `rtbcli evaluate --json` report ({e})")
        if rows and report.get("target") != target:
            fail(f"{path} scores another target ({report.get('target')}) than the first report ({target}): one table, one target")
        rows.append({"method": label, **metrics_of(report), "train_seconds": train_seconds(report)})
        if len(rows) == 1:
            target, floor = report.get("target"), floor_row(report, report.get("target_method", "exact"))
    return {"prior_row": rows[0], "rows": rows[1:], "floor": floor}


def main(argv: list[str]) -> None:
    every = "--all" in argv
    args = [a for a in argv if a != "--all"]
    if args[:1] == ["--evals"] and len(args) > 1:
        print(markdown(from_evaluations(args[1:]), every))
        return
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if len(args) != 1 or args[0].startswith("-"):
        fail(USAGE)
    try:
        with open(args[0]) as f:
            summary = json.load(f)
        table = markdown(summary, every)
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"cannot read '{args[0]}' as a `rtbcli reproduce` summary.json ({type(e).__name__}: {e})")
    print(table)


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:]))
