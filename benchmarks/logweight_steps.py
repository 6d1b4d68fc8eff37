"""Which sampling steps carry a fine-tuned sampler's distance to its target: the log importance weight
log w = beta log r(x) + sum_k (lpp_k - lpf_k) of the policy's own trajectories, split by steps.

    python benchmarks/logweight_steps.py run.safetensors --reward rtbcli.rewards.digits:log_p_class --reward-arg digit=3

For each block of steps, the mean of sum_k (lpf_k - lpp_k) (that block's share of the path KL(policy || prior)) and its
share of Var[log w] (Cov(block, log w) / Var[log w]; the shares and the reward's sum to 1). log w is constant for a
sampler of the target, so every share is a part of the gap. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli_common import parse_kwargs
from rtbcli.rewards import import_function
from rtbcli.script_support import run_script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a finetuned checkpoint")
    ap.add_argument("--reward", required=True, help="its Python reward again, module:function or file.py:function")
    ap.add_argument("--reward-arg", action="append", default=[], help="key=value for the reward (repeatable)")
    ap.add_argument("-n", type=int, default=256, help="trajectories")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ck = load_checkpoint(a.checkpoint, expect_kind="finetuned")
    fn, kwargs = import_function(a.reward)[0], parse_kwargs(a.reward_arg)
    torch.manual_seed(a.seed)
    policy, prior = ck.sampler("policy"), ck.sampler("prior")
    with torch.no_grad():
        traj = policy.sample(a.n)
        d = prior.step_log_probs(traj) - policy.step_log_probs(traj)  # (K, n): lpp_k - lpf_k
        lr = ck.preset.beta * fn(traj[-1], **kwargs)
    w = d.sum(0) + lr
    var = w.var(unbiased=False)

    def share(x: torch.Tensor) -> float:
        return float(((x - x.mean()) * (w - w.mean())).mean() / var)

    K = d.shape[0]
    cuts = sorted({0, K // 10, K // 4, K // 2, 3 * K // 4, 9 * K // 10, K - 3, K})
    print(f"{a.checkpoint}: Var[log w] {float(var):.3f}, path KL(policy || prior) {float(-d.sum(0).mean()):.3f} nats, n = {a.n}\n")
    print("| steps | mean sum(lpf - lpp) | share of Var[log w] |")
    print("|---|---|---|")
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        block = d[lo:hi].sum(0)
        print(f"| {lo}-{hi - 1} | {float(-block.mean()):.3f} | {share(block):.3f} |")
    print(f"| beta log r | {float(lr.mean()):.3f} | {share(lr):.3f} |")


if __name__ == "__main__":
    sys.exit(run_script(main))
