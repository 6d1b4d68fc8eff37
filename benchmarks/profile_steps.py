"""Where a step's time goes: torch.profiler over rtbcli's fine-tuning and pretraining steps at the reference size.

    python benchmarks/profile_steps.py                  # 2 CPU threads, batch 500, T = 100
    python benchmarks/profile_steps.py --threads 1 --json

Each loop (`rtbcli.finetune.train_step` from the shipped reference prior, `rtbcli.pretrain.train_step` with the default
`pairs` estimator) runs a few warm-up steps, then `--steps` steps under the profiler. The report groups the kernels'
own time into what the speed issue asks about: the matrix products (GEMMs: mm, addmm, bmm, oneDNN's Linear, fused
Linear + GELU included), the exact GELU and its derivative, and everything else (elementwise passes, reductions, random
draws, gathers, Adam), each in ms per step and as a share of the profiled kernel time, with the top kernels by shape.
The profiler's own overhead inflates the per-step total a little; `wall_ms` is the median step without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.distributed import Dist
from rtbcli.presets_loader import load_preset
from rtbcli.runtime import keep_freed_memory
from rtbcli.script_support import ScriptParser, at_least, run_script

SHIPPED_PRIOR = Path(__file__).resolve().parents[1] / "rtbcli" / "data" / "prior-reference.safetensors"
GEMM = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")  # and oneDNN's Linear, any overload
GELU = ("aten::gelu", "aten::gelu_backward")


def kind(name: str) -> str:
    """The group of a kernel: gemm, gelu or other."""
    if name in GEMM or name.startswith("mkldnn::_linear_pointwise"):
        return "gemm"
    return "gelu" if name in GELU else "other"


def profile(step, steps: int, warmup: int) -> dict:
    """Median wall time per step, then the profiled kernels' self time per step by group and by (name, shapes)."""
    for _ in range(warmup):
        step()
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        wall.append(time.perf_counter() - t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.self_cpu_time_total <= 0 or ev.key.startswith(("Optimizer.", "autograd::", "ProfilerStep")):
            continue
        rows.append(
            {"kernel": ev.key, "shapes": str(ev.input_shapes), "calls": ev.count / steps, "ms": ev.self_cpu_time_total / 1e3 / steps}
        )
    total = sum(r["ms"] for r in rows)
    groups = {g: sum(r["ms"] for r in rows if kind(r["kernel"]) == g) for g in ("gemm", "gelu", "other")}
    rows.sort(key=lambda r: -r["ms"])
    return {"wall_ms": 1e3 * statistics.median(wall), "profiled_ms": total, "groups_ms": groups, "top": rows[:12]}


def parse_args(argv=None) -> argparse.Namespace:
    ap = ScriptParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="steps profiled (and timed without the profiler) per loop")
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for opt, v in (("--threads", args.threads), ("--steps", args.steps)):
        if v < 1:
            print(f"error: {opt} must be at least 1 (got {v})", file=sys.stderr)
            sys.exit(2)
    return args


def main(argv=None) -> int:
    from rtbcli import finetune, pretrain

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    preset, _ = load_preset("reference")
    dist = Dist()
    report: dict = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        ft = preset.updated("finetune", steps=args.warmup + 2 * args.steps)
        run = finetune.setup(load_checkpoint(SHIPPED_PRIOR), ft, "reference", "rtb", Path(tmp) / "ft.safetensors")
        run.sched = run.schedule.scheduler(run.opt, 0)
        report["finetune"] = profile(lambda: finetune.train_step(run, dist), args.steps, args.warmup)
        pt = preset.updated("pretrain", steps=args.warmup + 2 * args.steps)
        prun = pretrain.setup(pt, "reference", Path(tmp) / "pt.safetensors")
        report["pretrain"] = profile(lambda: pretrain.train_step(prun, dist), args.steps, args.warmup)
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(width=120)
    con.print(f"batch 500, T = 100; {report['cpu_capability']}, {args.threads} thread(s), torch {report['torch']}")
    for loop in ("finetune", "pretrain"):
        r = report[loop]
        g = r["groups_ms"]
        con.print(
            f"{loop}: {r['wall_ms']:.1f} ms per step ({r['profiled_ms']:.1f} ms of kernels under the profiler): "
            + ", ".join(f"{k} {v:.1f} ms ({100 * v / r['profiled_ms']:.0f}%)" for k, v in g.items())
        )
        t = Table(title=f"{loop}: top kernels per step")
        for c in ("kernel", "input shapes", "calls", "ms", "group"):
            t.add_column(c, justify="right" if c in ("calls", "ms") else "left")
        for row in r["top"]:
            t.add_row(row["kernel"], row["shapes"][:60], f"{row['calls']:.0f}", f"{row['ms']:.2f}", kind(row["kernel"]))
        con.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
