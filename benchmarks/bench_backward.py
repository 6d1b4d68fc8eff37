"""Time the policy gradient of a fine-tuning step two ways (batch 500, T = 100, the reference network).

    python benchmarks/bench_backward.py            # 2 CPU threads
    python benchmarks/bench_backward.py --device cuda

`rtbcli.rollout.policy_grad` takes the fused backward (`rollout.backward`: the rollout's kept
activations, aten's GELU backward, DriftNet's layout restated) for DriftNet, and autograd of one
batched re-forward of all T*B transitions (`rollout.autograd_backward`) for any other network.
The fused path stays while this shows it faster. Rounds alternate the two; medians are reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.rollout import Workspace, policy_grad, rollout
from rtbcli.runtime import keep_freed_memory, resolve_device
from rtbcli.script_support import ScriptParser, at_least, run_script


def main() -> None:
    ap = ScriptParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=at_least(1), default=30)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = resolve_device(args.device)
    prior = Path(__file__).resolve().parents[1] / "rtbcli" / "data" / "prior-reference.safetensors"
    s = load_checkpoint(prior).sampler("policy", device)
    ro = rollout(s, Workspace(s, 500), 0.25, torch.Generator(device=device).manual_seed(0))
    g = torch.randn(s.steps, 500, generator=torch.Generator(device=device).manual_seed(1), device=device)
    times: dict[str, list[float]] = {"fused": [], "autograd": []}
    for r in range(args.rounds + 2):
        for name, fused in (("fused", True), ("autograd", False)):
            s.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            policy_grad(ro, g, fused=fused)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "device": device.type,
        "threads": args.threads,
        "torch": torch.__version__,
        "batch": 500,
        "T": s.steps,
        "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "autograd_over_fused": round(med["autograd"] / med["fused"], 2),
        "n": args.rounds,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"device {device.type}, {args.threads} threads, torch {torch.__version__}; batch 500, T = {s.steps}")
    for k, v in med.items():
        print(f"  {k:<9} median {v * 1e3:7.1f} ms")
    print(f"  autograd of a batched re-forward takes {report['autograd_over_fused']}x the fused backward")


if __name__ == "__main__":
    sys.exit(run_script(main))
