"""Where a ManyWell-32 sampler's ELBO gap sits: -ELBO = E[log q(tau) - log p_B(tau | x) - log pi(x)] against the exact
target (p_data for a prior, p_data r^beta for a fine-tuned run), split by pair and by k, the number of tilted pairs
whose x1 lies in the left well (x1 < 0).

    python benchmarks/manywell_gap.py rtbcli/data/prior-manywell32.safetensors -n 100000
    python benchmarks/manywell_gap.py runs/mw/rtb.safetensors

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


def pair_terms(policy, traj: torch.Tensor) -> torch.Tensor:
    """(n, pairs): sum_k [log p_F(x_k | x_{k-1}) - log p_B(x_{k-1} | x_k)] per pair, in float64 (the bridge's last step,
    to x_0 = 0, is a point mass and left out, as `bridge_log_prob` does)."""
    means = policy.means(traj).double()
    traj = traj.double()
    var = policy.step_var
    var = var.double().reshape(-1, 1, 1) if torch.is_tensor(var) else torch.tensor(float(var), dtype=torch.float64)
    t = policy.times().double()
    ratio = (t[1:-1] / t[2:])[:, None, None]
    bvar = policy.sigma2 * t.diff()[1:, None, None] * ratio

    def logn(x, m, v):
        return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)

    per_coord = logn(traj[1:], means, var).sum(0) - logn(traj[1:-1], ratio * traj[2:], bvar).sum(0)  # (n, d)
    return per_coord.reshape(traj.shape[1], -1, 2).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a prior or fine-tuned checkpoint of the manywell32 preset")
    ap.add_argument("-n", type=int, default=20000, help="trajectories")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ck = load_checkpoint(a.checkpoint)
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
    target, log_z = tilted_target(beta, tilted, c) if tilted else (ManyWell(), 0.0)
    torch.manual_seed(a.seed)
    policy = ck.sampler("policy")
    with torch.no_grad():
        traj = policy.sample(a.n)
        x = traj[-1].double()
        x1, x2 = x[:, 0::2], x[:, 1::2]
        log_z1 = ManyWell().log_z_unnormalised() / PAIRS  # each untilted pair's normaliser
        log_pi = -(x1**4) + 6 * x1**2 + 0.5 * x1 - 0.5 * x2**2 - log_z1  # (n, pairs), p_data's pair densities
        log_pi[:, :tilted] -= beta * c * x1[:, :tilted] + log_z / max(tilted, 1)  # the tilt r^beta and its normaliser
        gap = pair_terms(policy, traj) - log_pi  # (n, pairs)
        whole = policy.log_prob(traj).double() - policy.backward_log_prob(traj).double()
        whole -= target.log_prob(x).double()
    total = gap.sum(1)
    k = (x1[:, : max(tilted, 8)] < 0).sum(1)
    kt = max(tilted, 8)
    p_left = left_mass1(beta * c) if tilted else left_mass1(0.0)  # the target's left-well mass of each of the first kt pairs
    name = "p_data r^beta" if tilted else "p_data"
    print(
        f"{a.checkpoint} against {name}: -ELBO {float(total.mean()):.3f} (sum of the pairs' terms; lpf - lpb - log pi: "
        f"{float(whole.mean()):.3f}), n = {a.n}, log r = {tilted and f'-{c:g} * sum of x1 over the first {tilted} pairs' or 'none'}\n"
    )
    print("| pair | " + " | ".join(str(j) for j in range(gap.shape[1])) + " |")
    print("|---" * (gap.shape[1] + 1) + "|")
    print("| -ELBO | " + " | ".join(f"{v:.3f}" for v in gap.mean(0).tolist()) + " |\n")
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
    main()
