"""The published numbers to compare with: Sendera et al. 2024, Table 1 / Table C.1
(rtbcli/data/sendera2024_table1.json, with its citation and how each number was verified).

Each row has, per target ("gmm25", "funnel", "manywell") and metric ("delta_log_z",
"delta_log_z_rw", "w2"), [mean, std] over 5 runs, or null where the paper has no value.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from ..errors import InputError

TABLE_FILE = "sendera2024_table1.json"
METRICS = ("delta_log_z", "delta_log_z_rw", "w2")


@lru_cache(maxsize=1)
def load_table1() -> dict:
    """The whole file: title, citation, verification, notes, targets and rows."""
    return json.loads((resources.files("rtbcli") / "data" / TABLE_FILE).read_text(encoding="utf-8"))


def best_row(target: str, metric: str, amortized_only: bool = True) -> tuple[str, float, float]:
    """(method, mean, std) of the row with the smallest mean for `metric` on `target`
    (amortised samplers only by default: the MCMC rows SMC and GGNS are left out)."""
    table = load_table1()
    if target not in table["targets"] or metric not in METRICS:
        raise InputError(f"no published {metric!r} for {target!r}: targets {list(table['targets'])}, metrics {list(METRICS)}")
    cells = [
        (r["method"], *r[target][metric]) for r in table["rows"] if r[target][metric] is not None and (r["amortized"] or not amortized_only)
    ]
    return min(cells, key=lambda c: c[1])
