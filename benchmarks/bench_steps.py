"""Time pretraining and fine-tuning steps at the reference configuration (batch 500, T = 100).

    python benchmarks/bench_steps.py                       # 2 CPU threads, the shipped prior
    python benchmarks/bench_steps.py --device cuda --json  # on a GPU

Every number comes from the real training loops (`rtbcli.pretrain.pretrain`,
`rtbcli.finetune.finetune`), which record each step's wall time. Machines are noisy, so the
loops run in interleaved rounds and the report gives medians over all rounds, and the ratio to
a naive step measured in the same run: the approach of the authors' code (docs/maths.md#the-sampler), the
autograd graph built step by step while sampling and the time features computed per sample.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.finetune import finetune
from rtbcli.presets_loader import load_preset
from rtbcli.pretrain import pretrain
from rtbcli.runtime import keep_freed_memory, resolve_device
from rtbcli.sampler import DiffusionSampler, gaussian_log_prob
from rtbcli.script_support import ScriptParser, at_least, run_script
from rtbcli.tasks import Task


def naive_step(policy: DiffusionSampler, prior: DiffusionSampler, log_z, opt, task: Task, batch: int, extra_var: float):
    """One RTB step the slow way: per-step graph while sampling, per-sample time features."""
    dev = policy.net.state.weight.device
    x = torch.zeros(batch, policy.dim, device=dev)
    lpf = torch.zeros(batch, device=dev)
    lpp = torch.zeros(batch, device=dev)
    for i in range(policy.steps):
        t = torch.full((batch,), i / policy.steps, device=dev)
        mean = x + policy.dt * policy.net(x, policy.net.time(t))  # time features for every sample
        with torch.no_grad():
            mean_prior = x + prior.dt * prior.net(x, prior.net.time(t))
        x_next = (mean + math.sqrt(policy.step_var + extra_var) * torch.randn_like(x)).detach()
        lpf = lpf + gaussian_log_prob(x_next, mean, policy.step_var)
        lpp = lpp + gaussian_log_prob(x_next, mean_prior, prior.step_var)
        x = x_next
    loss = 0.5 * (log_z + lpf - lpp - task.log_reward(x)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = ScriptParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", type=Path, default=None, help="prior checkpoint [default: the shipped reference prior]")
    ap.add_argument("--steps", type=at_least(1), default=60, help="steps per loop per round")
    ap.add_argument("--rounds", type=at_least(1), default=3)
    ap.add_argument("--naive-steps", type=at_least(1), default=4, help="naive steps per round (they are slow)")
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command line's entry point does (`rtbcli.cli.main`)
    device = resolve_device(args.device)
    preset, _ = load_preset("reference")
    prior_path = args.prior or Path(__file__).resolve().parents[1] / "rtbcli" / "data" / "prior-reference.safetensors"
    prior_ck = load_checkpoint(prior_path)
    task = Task(preset)
    warm = 5
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ck.safetensors"
        policy, prior = prior_ck.sampler("policy", device), prior_ck.sampler("policy", device).requires_grad_(False)
        log_z = torch.zeros((), device=device, requires_grad=True)
        opt = torch.optim.Adam([*policy.parameters(), log_z], lr=1e-5)
        for r in range(args.rounds):
            p = preset.updated("pretrain", steps=args.steps + warm)
            times.setdefault("pretrain", []).extend(pretrain(p, "reference", out, device=device, progress=False).step_seconds[warm:])
            for algo in ("rtb", "trust-pcl", "reinforce-kl", "legacy-rl"):
                p = preset.updated("finetune", steps=args.steps + warm)
                res = finetune(prior_ck, p, "reference", algo, out, seed=r, device=device, progress=False)
                times.setdefault(f"finetune {algo}", []).extend(res.step_seconds[warm:])
            for k in range(args.naive_steps + (1 if r == 0 else 0)):
                sync(device)
                t0 = time.perf_counter()
                naive_step(policy, prior, log_z, opt, task, 500, 0.25)
                sync(device)
                if r > 0 or k > 0:
                    times.setdefault("naive rtb step", []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch": 500,
        "T": 100,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "p90_s": {k: round(sorted(v)[int(0.9 * (len(v) - 1))], 4) for k, v in times.items()},
        "n": {k: len(v) for k, v in times.items()},
        "speedup_vs_naive": {k: round(med["naive rtb step"] / v, 1) for k, v in med.items() if k.startswith("finetune")},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"device {report['device']}, {args.threads} threads, torch {torch.__version__}; batch 500, T = 100")
    for k in med:
        extra = f"   ({report['speedup_vs_naive'][k]}x faster than the naive step)" if k in report["speedup_vs_naive"] else ""
        print(f"  {k:<22} median {med[k] * 1e3:7.1f} ms   p90 {report['p90_s'][k] * 1e3:7.1f} ms   (n = {len(times[k])}){extra}")


if __name__ == "__main__":
    sys.exit(run_script(main))
