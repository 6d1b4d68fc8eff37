"""Print a `rtbcli reproduce` summary.json as a Markdown table (for the README).

    python benchmarks/summary_table.py runs/full/summary.json [--all]

The columns and their formats are the ones `rtbcli reproduce` prints (rtbcli.metric_registry), so the
README's tables and the terminal's agree; `--all` adds the columns the terminal leaves to summary.json
where the task has mode metrics (sliced W2, MMD^2, log Z_data by IS, EUBO).
"""

import json
import sys

from rtbcli.metric_registry import METRICS
from rtbcli.report import summary_cell, summary_columns


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


def main(argv: list[str]) -> None:
    paths = [a for a in argv if a != "--all"]
    if len(paths) != 1:
        sys.exit("usage: python benchmarks/summary_table.py SUMMARY.json [--all]")
    with open(paths[0]) as f:
        print(markdown(json.load(f), every="--all" in argv))


if __name__ == "__main__":
    main(sys.argv[1:])
