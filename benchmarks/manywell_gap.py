"""Where a ManyWell-32 sampler's ELBO gap sits: -ELBO = E[log q(tau) - log p_B(tau | x) - log pi(x)] against the exact
target (p_data for a prior, p_data r^beta for a fine-tuned run), split by pair and by k, the number of tilted pairs
whose x1 lies in the left well (x1 < 0).

    python benchmarks/manywell_gap.py rtbcli/data/prior-manywell32.safetensors -n 100000
    python benchmarks/manywell_gap.py runs/mw/rtb.safetensors
    python benchmarks/manywell_gap.py my-prior.safetensors --network net.py:Drift   (a prior of your own network class)

Every Gaussian log-probability is a sum over coordinates, so each trajectory's log-ratio splits exactly into one term per
pair (x1_j, x2_j): its forward steps' log-probabilities minus the backward bridge's, minus the pair's own log-density.
The pairs' terms add up to the whole (printed beside the library's own lpf - lpb - log pi as a check). The exact target
is a product over pairs, so a sampler that matches it has a gap of 0 in every row; a learned prior's grows with k where
its data, in which each pair sits in the left well 15.6% of the time, hold few such states. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.datasets.manywell import PAIRS, ManyWell, left_mass1, tilted_target
from rtbcli.errors import InputError
from rtbcli.evaluate import sampling_policy
from rtbcli.gaussian import gaussian_log_prob
from rtbcli.networks import attach_network
from rtbcli.script_support import run_script


def pair_terms(policy, traj: torch.Tensor) -> torch.Tensor:
    """(n, pairs): sum_k [log p_F(x_k | x_{k-1}) - log p_B(x_{k-1} | x_k)] per pair, in float64. Both processes are
    isotropic Gaussians, so a pair's share is the library's own log-probability of its two coordinates: the pairs are
    folded into the batch (the policy's means come from the whole state; the bridge's last step is left out, as in
    `bridge_log_prob`)."""
    steps1, n, d = traj.shape
    pairs = traj.double().reshape(steps1, n * d // 2, 2)
    means = policy.means(traj).double().reshape(steps1 - 1, n * d // 2, 2)
    lpf = gaussian_log_prob(pairs[1:], means, policy.step_var).sum(0)
    return (lpf - policy.backward_log_prob(pairs)).reshape(n, d // 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a prior or fine-tuned checkpoint of the manywell32 preset")
    ap.add_argument("-n", type=int, default=20000, help="trajectories")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--network", help="the checkpoint's own network class, named again ('net.py:Class'), for one of yours")
    a = ap.parse_args()
    ck = load_checkpoint(a.checkpoint)
    try:
        attach_network(ck, a.network)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rw = ck.preset.reward
    if getattr(ck.preset.prior_data, "dataset", None) != "manywell32" or ck.preset.sampler.model is not None:
        print(
            f"error: {a.checkpoint} is not a checkpoint of the manywell32 preset: give one whose prior data are ManyWell-32",
            file=sys.stderr,
        )
        sys.exit(2)
    finetuned = ck.kind == "finetuned"
    kw = dict(getattr(rw, "kwargs", None) or {}) if finetuned else {}
    tilted, c = int(kw.get("pairs", 8)) if finetuned else 0, float(kw.get("c", 1.0))
    beta = ck.preset.beta if finetuned else 0.0
    target = tilted_target(beta, tilted, c)[0] if tilted else ManyWell()
    kt = max(tilted, 8)  # k counts the left-well pairs among the first kt
    torch.manual_seed(a.seed)
    policy = sampling_policy(ck, torch.device("cpu"))  # a Langevin policy gets its reward's gradient again
    with torch.no_grad():
        traj = policy.sample(a.n)
        x = traj[-1].double()
        xp = x.reshape(-1, PAIRS, 2)  # the target is a product of one-pair ManyWells: the tilted pairs', then the rest
        log_pi = torch.cat([ManyWell(1, [beta * c]).log_prob(xp[:, :tilted]), ManyWell(1).log_prob(xp[:, tilted:])], 1)
        gap = pair_terms(policy, traj) - log_pi  # (n, pairs)
        whole = policy.log_prob(traj).double() - policy.backward_log_prob(traj).double()
        whole -= target.log_prob(x).double()
    total = gap.sum(1)
    left = xp[..., 0] < 0  # (n, pairs): which pairs' x1 lie in the left well
    k = left[:, :kt].sum(1)
    p_left = left_mass1(beta * c) if tilted else left_mass1(0.0)  # the target's left-well mass of each of the first kt pairs
    name = "p_data r^beta" if tilted else "p_data"
    print(
        f"{a.checkpoint} against {name}: -ELBO {float(total.mean()):.3f} (sum of the pairs' terms; lpf - lpb - log pi: "
        f"{float(whole.mean()):.3f}), n = {a.n}, log r = {tilted and f'-{c:g} * sum of x1 over the first {tilted} pairs' or 'none'}\n"
    )
    print("| pair | " + " | ".join(str(j) for j in range(gap.shape[1])) + " |")
    print("|---" * (gap.shape[1] + 1) + "|")
    print("| -ELBO | " + " | ".join(f"{v:.3f}" for v in gap.mean(0).tolist()) + " |\n")
    print("| pairs | well | share of their terms | exact share | -ELBO per pair term |")
    print("|---|---|---|---|---|")
    for name_j, cols, p_exact in ((f"first {kt}", slice(0, kt), p_left), (f"other {PAIRS - kt}", slice(kt, PAIRS), left_mass1(0.0))):
        for well, m, share in (("left", left[:, cols], p_exact), ("right", ~left[:, cols], 1 - p_exact)):
            g = gap[:, cols][m]
            per = f"{float(g.mean()):.3f}" if g.numel() >= 5 else "-"
            print(f"| {name_j} | {well} | {float(m.double().mean()):.4f} | {share:.4f} | {per} |")
    print()
    print(
        f"| k (of the first {kt} pairs in the left well) | share of samples | exact target's share | -ELBO | first {kt} pairs' | other pairs' |"
    )
    print("|---|---|---|---|---|---|")
    for kk in range(kt + 1):
        m = k == kk
        exact = math.comb(kt, kk) * p_left**kk * (1 - p_left) ** (kt - kk)
        if int(m.sum()) < 5:
            print(f"| {kk} | {float(m.float().mean()):.5f} | {exact:.5f} | - | - | - |")
            continue
        g = gap[m]
        print(
            f"| {kk} | {float(m.float().mean()):.5f} | {exact:.5f} | {float(g.sum(1).mean()):.3f} | {float(g[:, :kt].sum(1).mean()):.3f} | {float(g[:, kt:].sum(1).mean()):.3f} |"
        )


if __name__ == "__main__":
    sys.exit(run_script(main))
