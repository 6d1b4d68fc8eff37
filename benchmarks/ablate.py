"""Ablation table: fine-tune one prior (or pretrain one) with variants of the recipe and print what each change does.

Each variant is a name and extra `rtbcli finetune` options; every (variant, algorithm) pair is fine-tuned with
`rtbcli finetune --prior P --preset T --algo A <options>` and scored by `rtbcli evaluate --json`, and the table
(markdown) gives the chosen metrics and the training seconds, with the machine and date. Runs already finished in
--out (same command) are reused, and so are their evaluations (same evaluate options), so the table can be rebuilt
or extended at no cost. With --pretrain instead of --prior, each variant pretrains a prior on the preset's data
(`rtbcli pretrain --preset T <options>`), evaluated against --eval-args (e.g. '--reference exact.npy').

    python benchmarks/ablate.py --preset examples/mixture10d/task.toml --prior prior.safetensors \
        --reward examples/mixture10d/rewards.py:keep_modes --algos rtb \
        --variant "before=" --variant "cosine lr=--lr-schedule cosine" --metrics sliced_w2,sliced_w2_floor --out runs/abl
    python benchmarks/ablate.py --pretrain --preset thin.toml --variant "default=" --variant "sigma2 1=--sigma2 1" \
        --metrics sw2,sw2_floor,nn_dist,nn_dist_floor --eval-args "--reference exact.npy" --out runs/thin
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

from rtbcli.script_support import run_script


def run(args: list[str]) -> dict:
    """`python -m rtbcli ARGS --json`, its last line as JSON (exit status checked)."""
    p = subprocess.run([sys.executable, "-m", "rtbcli", *args, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ablate: `rtbcli {shlex.join(args)}` failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "base"


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--prior", help="the prior every variant fine-tunes")
    what.add_argument("--pretrain", action="store_true", help="each variant pretrains a prior on the preset's data")
    ap.add_argument("--reward", default=None, help="the preset's Python reward, named again for evaluate")
    ap.add_argument("--algos", default="rtb")
    ap.add_argument("--variant", action="append", required=True, help='NAME=OPTIONS, e.g. "cosine lr=--lr-schedule cosine"')
    ap.add_argument("--metrics", required=True, help="evaluate --json keys, comma-separated")
    ap.add_argument("--run-metrics", default="", help="keys of the training command's --json result, e.g. trainable_parameters")
    ap.add_argument("--eval-args", default="", help="extra evaluate options, e.g. '--n 5000'")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    metrics = a.metrics.split(",")
    run_metrics = [k for k in a.run_metrics.split(",") if k]
    rows = []
    for spec in a.variant:
        name, _, opts = spec.partition("=")
        for algo in ["prior"] if a.pretrain else a.algos.split(","):
            ck = a.out / f"{slug(name)}-{algo}.safetensors"
            if a.pretrain:
                cmd = ["pretrain", "--preset", a.preset, *shlex.split(opts), "--out", str(ck), "-q"]
            else:
                cmd = ["finetune", "--prior", a.prior, "--preset", a.preset, "--algo", algo, *shlex.split(opts), "--out", str(ck), "-q"]
                cmd += ["--reward", a.reward] if a.reward else []
            ev_cmd = ["evaluate", str(ck), *(["--reward", a.reward] if a.reward else []), *shlex.split(a.eval_args)]
            done = a.out / f"{ck.stem}.run.json"
            saved = json.loads(done.read_text()) if done.exists() else {}
            if saved.get("command") != cmd:  # train (again): the run is missing or was made by another command
                saved = {"command": cmd, "result": run(cmd)}
            if saved.get("eval_command") != ev_cmd:  # a finished run is evaluated once per set of evaluate options
                saved.update(eval_command=ev_cmd, eval=run(ev_cmd))
            done.write_text(json.dumps(saved))
            res, ev = saved["result"], saved["eval"]
            rows.append(
                {
                    "variant": name,
                    "options": opts,
                    "algo": algo,
                    "train_seconds": res.get("seconds"),
                    **{m: ev.get(m) for m in metrics},
                    **{m: res.get(m) for m in run_metrics},
                }
            )
            print(f"{name} / {algo}: " + ", ".join(f"{m} {fmt(ev.get(m))}" for m in metrics), file=sys.stderr)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    source = "pretraining on its data" if a.pretrain else f"from {a.prior}"
    print(f"Ablation on {a.preset} {source}, {dt.date.today()} ({machine}):\n")
    print("| variant | options | algo | " + " | ".join(metrics + run_metrics) + " | train s |")
    print("|---" * (len(metrics) + len(run_metrics) + 4) + "|")
    for r in rows:
        print(
            f"| {r['variant']} | `{r['options'] or '-'}` | {r['algo']} | "
            + " | ".join(fmt(r[m]) for m in metrics + run_metrics)
            + f" | {fmt(r['train_seconds'])} |"
        )
    (a.out / "ablation.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
