"""Would bf16 matmuls speed up a step? Times the fine-tuning step's GEMM shapes in float32 and bfloat16 on this CPU.

The shapes are those of the reference configuration (batch B = 500, T = 100, hidden 64, d = 2): the policy's and the
prior's hidden layers over the T*B states, forward (T*B x 64 @ 64 x 64) and the two backward products (input and
weight gradients). Rounds alternate float32 and bfloat16; the output gives per-round times, their medians and the
ratio float32 / bfloat16 (> 1: bf16 faster). torch reports the CPU capability (AVX512 includes native bf16 dot
products where the CPU has avx512_bf16; on AVX2 bf16 is emulated).

    python benchmarks/bench_bf16.py --threads 2 --rounds 7 [--json]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from rtbcli.script_support import ScriptParser, at_least, run_script


def gemms(n: int, h: int, dtype: torch.dtype, reps: int) -> float:
    """Seconds per repetition of one hidden layer's forward and both backward products at (n x h) @ (h x h)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(dtype)
    w = torch.randn(h, h, generator=g).to(dtype)
    gy = torch.randn(n, h, generator=g).to(dtype)
    for _ in range(2):  # warm-up
        x @ w, gy @ w.T, x.T @ gy
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ w  # forward
        gy @ w.T  # input gradient
        x.T @ gy  # weight gradient
    return (time.perf_counter() - t0) / reps


def main() -> int:
    ap = ScriptParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--rounds", type=at_least(1), default=7)
    ap.add_argument("--reps", type=at_least(1), default=20)
    ap.add_argument("--batch", type=at_least(1), default=500)
    ap.add_argument("--steps", type=at_least(1), default=100)
    ap.add_argument("--hidden", type=at_least(1), default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads < 1 or a.rounds < 1 or a.reps < 1:
        print("bench_bf16: --threads, --rounds and --reps must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    n = a.batch * a.steps
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(a.rounds):
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            times[name].append(gemms(n, a.hidden, dt, a.reps))
    ratios = [f / b for f, b in zip(times["float32"], times["bfloat16"])]
    res = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": a.threads,
        "shape": [n, a.hidden, a.hidden],
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio_float32_over_bf16": statistics.median(ratios),
        "per_round_ratios": ratios,
        "torch": torch.__version__,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['cpu_capability']}, {a.threads} thread(s), (n x h) @ (h x h) at n = {n}, h = {a.hidden}: forward + 2 backward products"
        )
        for k, v in res["median_ms"].items():
            print(f"  {k:9s} {v:8.2f} ms (median of {a.rounds} rounds)")
        print(f"  float32 / bfloat16 = {res['ratio_float32_over_bf16']:.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
