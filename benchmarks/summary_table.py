"""Print a `rtbcli reproduce` summary.json as a Markdown table (for the README).

    python benchmarks/summary_table.py runs/full/summary.json
"""

import json
import sys


def main(path: str) -> None:
    s = json.load(open(path))
    print("| method | modes | mode KL | off-target | hist KL | log Z learned | log Z (IS) | ELBO | EUBO | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, d: "-" if v is None else f"{v:.{d}f}"

    def row(name, r):
        cov = "-" if r.get("mode_coverage") is None else f"{r['mode_coverage']}/{r['n_target_modes']}"
        off = "-" if r.get("off_target") is None else f"{100 * r['off_target']:.1f}%"
        print(f"| {name} | {cov} | {f(r.get('kl_mode'), 4)} | {off} | {f(r.get('kl_hist'), 3)} | {f(r.get('log_z_learned'), 3)} | "
              f"{f(r.get('log_z_is'), 3)} | {f(r.get('elbo'), 3)} | {f(r.get('eubo'), 3)} | {f(r.get('train_seconds'), 0)} |")

    row("prior (no fine-tuning)", s["prior_row"])
    for r in s["rows"]:
        row(r["method"], r)
    row("exact sampler (floor)", s["floor"])


if __name__ == "__main__":
    main(sys.argv[1])
