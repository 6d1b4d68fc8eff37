"""Scaling of the fine-tuning loop: step time and samples/s against batch size and number of processes.

    python benchmarks/bench_scaling.py                          # CPU: every core, then 1 and 2 processes
    python benchmarks/bench_scaling.py --device cuda --out scaling-cuda.json

Every number comes from the real loop (`rtbcli.finetune.finetune`, rtb, the reference preset,
T = 100, from the shipped prior), which records each step's wall time:

- against the batch size (100 ... 10,000) in one process using every core (`--threads`);
- against the number of processes (`--processes`, launched with torchrun) at a fixed global batch
  (`--proc-batch`), with processes x threads = cores on CPU, one GPU per process on CUDA.

Each run's first step (allocation, first touch of memory) is left out; the number of timed steps
is chosen from the previous batch size's step time so that each size takes about `--budget`
seconds (between 4 and 20 steps). On CUDA every step logs, which is the loop's host sync, so that
each step's time includes its kernels. Processes run as `rtbcli finetune` does (glibc keeps freed
memory, `runtime.keep_freed_memory`). Prints a markdown table; `--out` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtbcli.script_support import ScriptParser, at_least, run_script

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "rtbcli" / "data" / "prior-reference.safetensors"


def finetune_steps(batch: int, steps: int, device: torch.device, out: Path, dist=None) -> list[float]:
    """Wall times of `steps` timed steps of rtb (after one untimed) at global batch `batch`."""
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.finetune import finetune
    from rtbcli.presets_loader import load_preset

    preset, _ = load_preset("reference")
    preset = preset.updated("finetune", steps=steps + 1, batch_size=batch)
    r = finetune(
        load_checkpoint(PRIOR),
        preset,
        "reference",
        "rtb",
        out,
        device=device,
        progress=False,
        save_every=0,
        log_every=1 if device.type == "cuda" else 50,
        dist=dist,
    )
    return r.step_seconds[1:]


def summary(batch: int, processes: int, threads: int | None, times: list[float]) -> dict:
    med = statistics.median(times)
    return {
        "batch": batch,
        "processes": processes,
        "threads": threads,
        "steps": len(times),
        "median_s": med,
        "p90_s": sorted(times)[round(0.9 * (len(times) - 1))],
        "samples_per_s": batch / med,
    }


def batch_sweep(args, device: str) -> list[dict]:
    rows, per_sample = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            steps = 20 if per_sample is None else max(4, min(20, round(args.budget / (per_sample * batch))))
            times = finetune_steps(batch, steps, torch.device(device), Path(tmp) / "ft.safetensors")
            row = summary(batch, 1, args.threads if device == "cpu" else None, times)
            per_sample = row["median_s"] / batch
            rows.append(row)
            print(f"  batch {batch:>6}: median {row['median_s'] * 1e3:8.1f} ms over {steps} steps", file=sys.stderr, flush=True)
    return rows


def process_sweep(args, device: str) -> list[dict]:
    """One torchrun job per process count, each running this file with --worker."""
    rows = []
    for n in args.processes:
        threads = max(1, args.threads // n) if device == "cpu" else None
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads or 1),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(n),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "localhost:0",
                __file__,
                "--worker",
                "--device",
                device,
                "--proc-batch",
                str(args.proc_batch),
                "--proc-steps",
                str(args.proc_steps),
                "--result",
                str(result),
            ]
            done = subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the {n}-process run failed:\n{done.stderr[-3000:]}")
            times = json.loads(result.read_text())["step_seconds"]
        rows.append(summary(args.proc_batch, n, threads, times))
        print(f"  {n} process(es): median {rows[-1]['median_s'] * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    return rows


def worker(args) -> None:
    """One process of a torchrun job: join it, run the loop, rank 0 writes the step times."""
    from rtbcli.distributed import init, shutdown
    from rtbcli.runtime import keep_freed_memory, resolve_device

    keep_freed_memory()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist, dev = init(resolve_device(args.device))
    try:
        times = finetune_steps(args.proc_batch, args.proc_steps, dev, Path("ft.safetensors"), dist)
    finally:
        shutdown(dist)
    if dist.is_main:
        Path(args.result).write_text(json.dumps({"step_seconds": times}))


def table(report: dict) -> str:
    lines = [
        f"rtb, reference preset (T = {report['T']}), {report['device']}, {report['cores']} cores, torch {report['torch']}",
        "",
        "| processes x threads | global batch | timed steps | median step (ms) | p90 step (ms) | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["batch_sweep"] + report["process_sweep"]:
        who = f"{row['processes']} x {row['threads']}" if row["threads"] else f"{row['processes']} x GPU"
        lines.append(
            f"| {who} | {row['batch']:,} | {row['steps']} | {row['median_s'] * 1e3:.1f} | {row['p90_s'] * 1e3:.1f} | "
            f"{row['samples_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def counts(text: str) -> list[int]:
    """A comma-separated list of positive integers (an argparse type)."""
    return [at_least(1)(x) for x in text.split(",")]


def main() -> None:
    ap = ScriptParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batches", type=counts, default=[100, 300, 1000, 3000, 10000])
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per batch size (4 to 20 steps)")
    ap.add_argument(
        "--processes",
        type=counts,
        default=None,
        help="process counts [default: 1,2 on CPU; 1 ... the number of GPUs on CUDA]",
    )
    ap.add_argument("--proc-batch", type=at_least(1), default=1000, help="global batch of the process sweep")
    ap.add_argument("--proc-steps", type=at_least(1), default=12, help="timed steps per process count")
    ap.add_argument("--threads", type=at_least(1), default=os.cpu_count(), help="CPU threads in all [default: every core]")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from rtbcli.presets_loader import load_preset
    from rtbcli.runtime import keep_freed_memory, resolve_device

    device = resolve_device(args.device).type
    if device == "cuda":
        args.processes = args.processes or list(range(1, torch.cuda.device_count() + 1))
    else:
        args.processes = args.processes or [1, 2]
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    started = time.perf_counter()
    print(f"batch sweep ({device})", file=sys.stderr)
    rows = batch_sweep(args, device)
    print(f"process sweep ({device}, global batch {args.proc_batch})", file=sys.stderr)
    procs = process_sweep(args, device)
    report = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": "reference",
        "algo": "rtb",
        "T": load_preset("reference")[0].sampler.steps,
        "batch_sweep": rows,
        "process_sweep": procs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(run_script(main))
