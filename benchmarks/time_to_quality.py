"""Time to quality on the reference task: rtbcli's RTB fine-tuning against torchgfn's, one recipe on both sides.

    pip install 'rtbcli[bench]'                          # torchgfn 2.4.1, for this benchmark only
    python benchmarks/time_to_quality.py                  # the quick recipe: 1,000 steps of batch 200, lr 3e-3
    python benchmarks/time_to_quality.py --json           # one JSON object

Both sides start from the shipped reference prior (the same 21,122 weights: torchgfn's network is loaded with them, as
in bench_peer.py, whose torchgfn set-up this reuses) and train RTB toward p_data r with the same batch, T, Adam learning
rates (policy and log Z), exploration schedule (rtbcli's, planned for the run's length, handed to torchgfn's sampler
step by step) and no gradient clipping. Every --every steps each policy is scored the same way, by rtbcli's mode
metrics (`rtbcli.metrics.sample_metrics`: mode-weight KL and off-target mass against the exact target) on --n samples
of its own; rtbcli scores inside its loop (`finetune`'s eval_every), torchgfn's network is copied into an rtbcli
sampler and scored by the same function. The clocks count training steps only (scoring excluded). The report gives
each side's curve, the first step and training seconds at which the mode-weight KL reaches --threshold, and the ratio
of those times (torchgfn / rtbcli). The two runs are not interleaved (each is one long run), so on a shared machine
read the ratio beside each side's median step time in the same report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import SHIPPED_PRIOR, Peer, fail, same_drift, start, store_drift_net  # noqa: E402

from rtbcli.checkpoint import load_checkpoint  # noqa: E402
from rtbcli.finetune import finetune  # noqa: E402
from rtbcli.metrics import sample_metrics  # noqa: E402
from rtbcli.presets_loader import load_preset  # noqa: E402
from rtbcli.runtime import make_generator  # noqa: E402
from rtbcli.script_support import run_script
from rtbcli.suites import tilted_target  # noqa: E402
from rtbcli.tasks import Task  # noqa: E402
from rtbcli.trainer import Schedule  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="fine-tuning steps of each side (the reference quick run's)")
    ap.add_argument("--batch", type=int, default=200, help="trajectories per step (the quick run's)")
    ap.add_argument("--lr", type=float, default=3e-3, help="the policy's Adam learning rate (the quick run's); log Z's is the preset's")
    ap.add_argument("--every", type=int, default=100, help="score both policies every this-many steps (and at the last)")
    ap.add_argument("--n", type=int, default=10_000, help="samples per score (the quick run's)")
    ap.add_argument("--threshold", type=float, default=0.05, help="the mode-weight KL that counts as reached")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "every", "n", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not (args.lr > 0 and args.threshold > 0):
        fail("--lr and --threshold must be positive")
    return args


def reached(curve: list[dict], threshold: float) -> dict | None:
    """The first scored point whose mode-weight KL is at most `threshold`, or None."""
    return next((p for p in curve if p["kl_mode"] <= threshold), None)


def score(sampler, target, n: int, seed: int, step: int) -> dict:
    x = sampler.sample(n, 0.0, make_generator(seed * 1_000_003 + step, torch.device("cpu")))[-1]
    m = sample_metrics(x, target)
    return {"kl_mode": m["kl_mode"], "off_target": m["off_target"], "mode_coverage": m["mode_coverage"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    start(args.threads)
    device = torch.device("cpu")
    base, _ = load_preset("reference")
    preset = base.updated("finetune", steps=args.steps, batch_size=args.batch, lr=args.lr, eval_every=args.every).updated(
        "evaluate", n=args.n
    )
    spec, cfg = preset.sampler, preset.finetune
    target = tilted_target(Task(preset, preset.beta), preset.beta)
    prior_ck = load_checkpoint(SHIPPED_PRIOR)

    # rtbcli: one run, its loop scoring the policy every --every steps (training seconds to each point in its log)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ft.jsonl"
        res = finetune(
            prior_ck, preset, "reference", "rtb", Path(tmp) / "ft.safetensors", seed=args.seed, device=device, progress=False,
            log_path=log, save_every=0,
        )  # fmt: skip
        records = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [{"step": r["step"], "seconds": r["seconds"], **{k: r["eval"][k] for k in ("kl_mode", "off_target", "mode_coverage")}}
            for r in records if "eval" in r]  # fmt: skip

    # torchgfn: the same recipe, its network scored by the same function at the same steps
    prior_net = prior_ck.sampler("policy", device).net
    peer = Peer(prior_net, spec.steps, args.batch, spec.sigma2, spec.hidden, spec.time_features, spec.layers, device,
                lr=cfg.lr, lr_logz=cfg.lr_logz)  # fmt: skip
    scorer = prior_ck.sampler("policy", device)
    schedule = Schedule(cfg, cfg.steps)
    theirs, peer_steps, clock = [], [], 0.0
    for it in range(cfg.steps):
        peer.exploration = torch.tensor(schedule.exploration(it))
        t0 = time.perf_counter()
        peer.finetune_step()
        dt = time.perf_counter() - t0
        clock += dt
        peer_steps.append(dt)
        step = it + 1
        if step % args.every == 0 or step == cfg.steps:
            store_drift_net(scorer.net, peer.pf_post.module)
            theirs.append({"step": step, "seconds": clock, **score(scorer, target, args.n, args.seed, step)})
    drift_diff = same_drift(peer.pf_post.module, scorer.net, spec.steps, device)  # the copy is the peer's function

    at_mine, at_theirs = reached(mine, args.threshold), reached(theirs, args.threshold)
    report = {
        "threshold_kl_mode": args.threshold,
        "rtbcli_reached": at_mine,
        "torchgfn_reached": at_theirs,
        "time_to_quality_ratio": at_theirs["seconds"] / at_mine["seconds"] if at_mine and at_theirs else None,
        "step_time_ratio": statistics.median(peer_steps) / statistics.median(res.step_seconds),
        "median_step_s": {"rtbcli": statistics.median(res.step_seconds), "torchgfn": statistics.median(peer_steps)},
        "total_train_s": {"rtbcli": sum(res.step_seconds), "torchgfn": clock},
        "curves": {"rtbcli": mine, "torchgfn": theirs},
        "copied_drift_max_abs_diff": drift_diff,
        "recipe": {
            "steps": cfg.steps,
            "batch": args.batch,
            "T": spec.steps,
            "lr": cfg.lr,
            "lr_logz": cfg.lr_logz,
            "exploration": f"{cfg.exploration} held for {cfg.exploration_hold:.0%}, linear to 0 by {cfg.exploration_end:.0%}",
            "grad_clip": None,
            "n": args.n,
            "every": args.every,
            "seed": args.seed,
        },  # fmt: skip
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torchgfn": metadata.version("torchgfn"),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.json:
        print(json.dumps(report))
    else:
        show(report)
    return 0


def show(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    r = rep["recipe"]
    con.print(
        f"[bold]time to quality, rtbcli vs torchgfn {rep['torchgfn']}[/]: reference task, RTB, {r['steps']} steps of batch "
        f"{r['batch']}, T = {r['T']}, lr {r['lr']:g} (log Z {r['lr_logz']:g}), exploration {r['exploration']}; "
        f"{rep['cpu_capability']}, {rep['threads']} threads of {rep['cpu_count']}, torch {rep['torch']}, {rep['date']}"
    )
    t = Table(title=f"mode-weight KL against the exact target, n = {r['n']:,} (training seconds, scoring excluded)")
    for c in ("step", "rtbcli s", "rtbcli KL", "rtbcli off", "torchgfn s", "torchgfn KL", "torchgfn off"):
        t.add_column(c, justify="right")
    for a, b in zip(rep["curves"]["rtbcli"], rep["curves"]["torchgfn"], strict=True):
        t.add_row(
            str(a["step"]),
            f"{a['seconds']:.1f}",
            f"{a['kl_mode']:.3f}",
            f"{100 * a['off_target']:.1f}%",
            f"{b['seconds']:.1f}",
            f"{b['kl_mode']:.3f}",
            f"{100 * b['off_target']:.1f}%",
        )
    con.print(t)
    for side in ("rtbcli", "torchgfn"):
        p = rep[f"{side}_reached"]
        con.print(
            f"{side}: mode KL <= {rep['threshold_kl_mode']:g} "
            + (f"at step {p['step']}, {p['seconds']:.1f} s of training" if p else "not reached")
            + f"; median step {rep['median_step_s'][side] * 1e3:.0f} ms"
        )
    ratio = rep["time_to_quality_ratio"]
    con.print(
        f"time to quality, torchgfn / rtbcli: {ratio:.2f}x" if ratio else "time to quality: not reached by both",
        f"(step time ratio {rep['step_time_ratio']:.2f}x)",
    )


if __name__ == "__main__":
    sys.exit(run_script(main))
