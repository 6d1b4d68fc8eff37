"""Time rtbcli's fine-tuning and pretraining steps against torchgfn's, and against a GEMM floor.

    pip install 'rtbcli[bench]'                      # torchgfn 2.4.1, for this benchmark only
    python benchmarks/bench_peer.py                  # batch 500, T = 100, 2 CPU threads, 5 rounds
    python benchmarks/bench_peer.py --json           # one JSON object

The peer is torchgfn 2.4.1 set up, through its public API, the way its example
`tutorials/examples/train_diffusion_rtb.py` sets itself up: `DiffusionSampling` on the
`gmm25_posterior9` target (the reference task: 25-mode prior data, reward log p9 - log p25),
`PinnedBrownianMotionForward` estimators around `DiffusionPISGradNetForward` networks,
`RelativeTrajectoryBalanceGFlowNet` with a frozen prior, a `Sampler` with exploration noise,
`loss(..., recalculate_all_logprobs=True)`, Adam; its prior is pretrained with `MLEDiffusion`
(maximum likelihood on Brownian-bridge trajectories from the data), as in the example.
`pretrain_ratio` compares it with rtbcli's default pretraining step (the Rao-Blackwellised
'pairs' estimator, the same network work); `pretrain_trajectory_ratio` with rtbcli's
'trajectory' estimator, torchgfn's own.

At d = 32 (`--d32`, on by default) it also times energy-mode fine-tuning on ManyWell (rtbcli's
`manywell-energy` preset: RTB against the Brownian prior, i.e. trajectory balance) against
torchgfn's `TBGFlowNet` on its `many_well` target with the fixed Brownian-bridge backward, both
from the same fresh network, at the preset's batch (300; `--batch-d32`): `d32_finetune_ratio`.

Both sides run the same task, batch, T, per-step variance and network (the same 21,122 weights
at the reference size: torchgfn's networks are loaded with rtbcli's prior, and the benchmark checks
that both compute the same drift). rtbcli's steps are timed inside its own training loops
(`rtbcli.finetune.finetune`, `rtbcli.pretrain.pretrain`, which record every step's wall time);
torchgfn's steps are timed around the example's loop body. The machine is noisy, so the two run
interleaved in rounds (who goes first alternates), the first steps of every round are discarded,
and the report gives medians over all rounds and the ratio of each round's medians.

The GEMM floor is the matrix-multiplication work a fine-tuning step cannot avoid, run as plain
float32 `torch.mm` calls of those shapes just before and just after rtbcli's fine-tuning steps in
every round (under the same load): the policy's forward over the T*B states while sampling (T
sequential calls per layer, B rows each), the frozen prior's forward over the T*B states for its
log-probabilities, and the weight- and input-gradient products of one backward pass (and the
T-row time MLP's share of each). `finetune_floor_ratio` is rtbcli's step over that floor.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from rtbcli.checkpoint import load_checkpoint
from rtbcli.finetune import brownian_start, finetune
from rtbcli.presets_loader import load_preset
from rtbcli.pretrain import pretrain
from rtbcli.runtime import keep_freed_memory
from rtbcli.script_support import run_script

EXTRA = "pip install 'rtbcli[bench]'"
SHIPPED_PRIOR = Path(__file__).resolve().parents[1] / "rtbcli" / "data" / "prior-reference.safetensors"
D32 = 32  # ManyWell's dimension (rtbcli's manywell-energy preset, torchgfn's many_well target)
# instruction-set limits, to emulate an AVX2 machine on an AVX-512 one (ATen's kernels, MKL's GEMM, oneDNN): reported as set
ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
EXPLORATION = 0.5  # s_e of the example's (and rtbcli's) early steps; both sides explore alike

STEP_CONTENTS = {
    "rtbcli finetune": "sample B trajectories of T steps (no autograd, keeping the policy's activations); policy log-probs from "
    "the residuals; frozen prior scores all T*B transitions in one no-grad pass; log r; RTB loss; autograd for "
    "log Z and dL/dlpf, one hand-written backward over T*B transitions (+ time MLP by autograd); grad-norm clip; "
    "Adam step (log line every 50 steps)",
    "rtbcli finetune bf16": "the same step with --matmul-dtype bfloat16: the frozen prior's pass and the backward's products "
    "under bf16 autocast (float32 accumulation), the sampling loop and everything else float32",
    "rtbcli pretrain bf16": "the pretraining step ('pairs') with --matmul-dtype bfloat16: the hidden and output layers' "
    "products, forward and backward, under bf16 autocast (float32 accumulation), everything else float32",
    "torchgfn finetune": "Sampler.sample_trajectories: T estimator calls over B states (T-1 Gaussian steps, then the exit "
    "action at t = (T-1)/T), with autograd enabled as in the example; loss(recalculate_all_logprobs=True): the policy's forward over all "
    "states again, with grad, and the frozen prior's forward without grad; log r; RTB loss; backward; Adam step",
    "rtbcli pretrain": "the default 'pairs' estimator: B*T bridge-marginal triples (the network work of B trajectories of T steps), "
    "one forward with autograd, backward, Adam step",
    "rtbcli pretrain trajectory": "the 'trajectory' estimator (torchgfn's and the authors'): B whole bridge trajectories drawn "
    "in one vectorised pass, -mean log p_F of all T*B transitions in one forward with autograd, "
    "backward, Adam step",
    "rtbcli finetune d32": "energy mode, manywell-energy preset (d = 32, on-policy): the fine-tuning step above with the "
    "Brownian prior's closed-form log-probabilities in place of a network prior, log r from the ManyWell density",
    "torchgfn finetune d32": "TBGFlowNet on its many_well target: Sampler.sample_trajectories (T estimator calls, autograd on), "
    "loss(recalculate_all_logprobs=True) with the fixed Brownian-bridge backward; backward; Adam step",
    "torchgfn pretrain": "MLEDiffusion.loss: B data points, a Brownian bridge drawn back to 0 step by step (T steps), the policy's "
    "forward with grad at each step (T calls of B rows), -mean log p_F; backward; Adam step",
}
PEER_EXTRA_WORK = (
    "torchgfn's step does work rtbcli's does not, a fair part of its cost: it computes the policy's forward twice "
    "(while sampling, with an autograd graph that is then dropped, and again with grad in the loss), runs the time "
    "MLP for every one of the T*B states (rtbcli: once per time step, a T-row table), and checks each network output for NaN (a host sync)"
)


def fail(msg: str, code: int = 2) -> None:
    print(f"bench_peer.py: {msg}", file=sys.stderr)
    raise SystemExit(code)


def median(v: list[float]) -> float:
    return statistics.median(v)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- the peer: torchgfn
class Peer:
    """torchgfn 2.4.1's diffusion RTB fine-tuning and MLE pretraining, set up as its example does."""

    def __init__(
        self,
        prior_net: torch.nn.Module,
        T: int,
        batch: int,
        sigma2: float,
        hidden: int,
        time_features: int,
        layers: int,
        device: torch.device,
        lr: float = 1e-3,
        lr_logz: float = 0.1,
    ):
        from gfn.estimators import PinnedBrownianMotionBackward, PinnedBrownianMotionForward
        from gfn.gflownet import RelativeTrajectoryBalanceGFlowNet
        from gfn.gflownet.mle import MLEDiffusion
        from gfn.gym.diffusion_sampling import DiffusionSampling
        from gfn.samplers import Sampler
        from gfn.utils.modules import DiffusionFixedBackwardModule, DiffusionPISGradNetForward

        self.T, self.batch, self.device = T, batch, device
        # the example calls torch.set_default_device(device); on the CPU (the default already) that only adds a Python
        # hook to every torch call, so it is left out there
        self.on_device = (lambda: torch.device(device)) if device.type != "cpu" else contextlib.nullcontext
        # per-step variance sigma^2 * t_scale * dt: the example's sigma = 2, t_scale = 5 would give 20 dt; the reference
        # task's is 5 dt. t_scale = 1 keeps MLEDiffusion's bridge (whose variance ignores t_scale) consistent with it.
        sigma, t_scale = math.sqrt(sigma2), 1.0

        def forward_estimator() -> PinnedBrownianMotionForward:
            module = DiffusionPISGradNetForward(
                s_dim=2,
                harmonics_dim=time_features,
                t_emb_dim=hidden,
                s_emb_dim=hidden,
                hidden_dim=hidden,
                joint_layers=layers,
                zero_init=True,
                clipping=False,
                gfn_clip=1e4,
                t_scale=t_scale,
                log_var_range=4.0,
                learn_variance=False,
            )
            return PinnedBrownianMotionForward(s_dim=2, pf_module=module, sigma=sigma, num_discretization_steps=T, n_variance_outputs=0).to(
                device
            )

        with self.on_device():
            # fine-tuning: the example's main()
            self.env = DiffusionSampling(
                target_str="gmm25_posterior9", target_kwargs=None, num_discretization_steps=T, device=device, debug=False
            )
            self.pf_post, self.pf_prior = forward_estimator(), forward_estimator()
            load_drift_net(self.pf_prior.module, prior_net)
            self.pf_post.load_state_dict(self.pf_prior.state_dict())
            self.pf_prior.eval()
            for p in self.pf_prior.parameters():
                p.requires_grad_(False)
            self.gflownet = RelativeTrajectoryBalanceGFlowNet(pf=self.pf_post, prior_pf=self.pf_prior, init_logZ=0.0, beta=1.0).to(device)
            self.sampler = Sampler(estimator=self.pf_post)
            self.opt = torch.optim.Adam(
                [{"params": self.gflownet.pf.parameters(), "lr": lr}, {"params": self.gflownet.logz_parameters(), "lr": lr_logz}],
                lr=lr,
                weight_decay=0.0,
            )
            self.exploration = torch.tensor(EXPLORATION)
            # pretraining: the example's pretrain_prior(), with the fixed Brownian-bridge backward
            self.env_data = DiffusionSampling(
                target_str="gmm25_prior", target_kwargs=None, num_discretization_steps=T, device=device, debug=False
            )
            self.pf_pre = forward_estimator()
            pb = PinnedBrownianMotionBackward(
                s_dim=2,
                pb_module=DiffusionFixedBackwardModule(2),
                sigma=sigma,
                num_discretization_steps=T,
                n_variance_outputs=0,
                pb_scale_range=0.0,
            ).to(device)
            self.opt_pre = torch.optim.Adam([{"params": self.pf_pre.parameters(), "lr": 1e-3}], lr=1e-3, weight_decay=0.0)
            self.mle = MLEDiffusion(
                pf=self.pf_pre, pb=pb, num_steps=T, sigma=sigma, t_scale=t_scale, pb_scale_range=0.1, learn_variance=False, debug=False
            )

    def finetune_step(self) -> None:
        with self.on_device():
            trajectories = self.sampler.sample_trajectories(
                self.env, n=self.batch, save_logprobs=False, save_estimator_outputs=False, exploration_std=self.exploration
            )
            self.opt.zero_grad()
            loss = self.gflownet.loss(self.env, trajectories, recalculate_all_logprobs=True)
            loss.backward()
            self.opt.step()
        self.last_trajectories = trajectories

    def pretrain_step(self) -> None:
        with self.on_device():
            with torch.no_grad():
                data = self.env_data.target.sample(self.batch)
            self.opt_pre.zero_grad()
            loss = self.mle.loss(self.env_data, data, exploration_std=0.0)
            loss.backward()
            self.opt_pre.step()

    def timed(self, step, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync(self.device)
            t0 = time.perf_counter()
            step()
            sync(self.device)
            out.append(time.perf_counter() - t0)
        return out


class ManyWellPeer:
    """torchgfn 2.4.1's trajectory balance on its `many_well` target (d = 32, energy mode): a
    pinned-Brownian forward estimator, the fixed Brownian-bridge backward, `TBGFlowNet`, on-policy
    sampling, `loss(..., recalculate_all_logprobs=True)`, Adam (rtbcli's manywell-energy preset:
    RTB against the Brownian prior, which is trajectory balance with that backward)."""

    def __init__(self, net: torch.nn.Module, T: int, batch: int, sigma2: float, hidden: int, time_features: int, layers: int, device):
        from gfn.estimators import PinnedBrownianMotionBackward, PinnedBrownianMotionForward
        from gfn.gflownet import TBGFlowNet
        from gfn.gym.diffusion_sampling import DiffusionSampling
        from gfn.samplers import Sampler
        from gfn.utils.modules import DiffusionFixedBackwardModule, DiffusionPISGradNetForward

        self.batch, self.device, dim, sigma = batch, device, D32, math.sqrt(sigma2)
        self.env = DiffusionSampling(target_str="many_well", target_kwargs=None, num_discretization_steps=T, device=device, debug=False)
        module = DiffusionPISGradNetForward(
            s_dim=dim,
            harmonics_dim=time_features,
            t_emb_dim=hidden,
            s_emb_dim=hidden,
            hidden_dim=hidden,
            joint_layers=layers,
            zero_init=True,
            clipping=False,
            gfn_clip=1e4,
            t_scale=1.0,
            log_var_range=4.0,
            learn_variance=False,
        )
        load_drift_net(module, net)
        pf = PinnedBrownianMotionForward(s_dim=dim, pf_module=module, sigma=sigma, num_discretization_steps=T, n_variance_outputs=0)
        pb = PinnedBrownianMotionBackward(
            s_dim=dim,
            pb_module=DiffusionFixedBackwardModule(dim),
            sigma=sigma,
            num_discretization_steps=T,
            n_variance_outputs=0,
            pb_scale_range=0.0,
        )
        self.pf = pf.to(device)
        self.gflownet = TBGFlowNet(pf=self.pf, pb=pb.to(device), init_logZ=0.0).to(device)
        self.sampler = Sampler(estimator=self.pf)
        self.opt = torch.optim.Adam(
            [{"params": self.gflownet.pf.parameters(), "lr": 1e-3}, {"params": self.gflownet.logz_parameters(), "lr": 0.1}], lr=1e-3
        )

    def finetune_step(self) -> None:
        trajectories = self.sampler.sample_trajectories(self.env, n=self.batch, save_logprobs=False, save_estimator_outputs=False)
        self.opt.zero_grad()
        loss = self.gflownet.loss(self.env, trajectories, recalculate_all_logprobs=True)
        loss.backward()
        self.opt.step()

    timed = Peer.timed


def load_drift_net(peer_module: torch.nn.Module, net: torch.nn.Module) -> None:
    """Copy rtbcli's DriftNet weights into torchgfn's DiffusionPISGradNetForward.

    Both are PIS networks with the same layers in the same order (time phases, time MLP, state
    layer, joint layers, output); only their names and the phases' shape (64 vs 1 x 64) differ.
    """
    mine, theirs = list(net.named_parameters()), list(peer_module.named_parameters())
    shapes = [p.numel() for _, p in mine], [p.numel() for _, p in theirs]
    if shapes[0] != shapes[1]:
        raise RuntimeError(f"the two networks' parameters differ: {shapes[0]} vs {shapes[1]}")
    with torch.no_grad():
        for (_, src), (_, dst) in zip(mine, theirs):
            dst.copy_(src.reshape(dst.shape))


def store_drift_net(net: torch.nn.Module, peer_module: torch.nn.Module) -> None:
    """The other way: copy torchgfn's DiffusionPISGradNetForward weights into rtbcli's DriftNet (to score it with rtbcli)."""
    with torch.no_grad():
        for (_, dst), (_, src) in zip(net.named_parameters(), peer_module.named_parameters(), strict=True):
            dst.copy_(src.reshape(dst.shape))


def same_drift(peer_module: torch.nn.Module, net: torch.nn.Module, T: int, device: torch.device) -> float:
    """max |f_rtbcli(x, t) - f_torchgfn(x, t)| at random states and every t_i: the two networks compute one function."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (5 * torch.randn(T, 64, 2, generator=g)).to(device)
    t = (torch.arange(T, dtype=torch.float32) / T).to(device)
    with torch.no_grad():
        f_mine = net(x, net.time(t)[:, None, :])
        inp = torch.cat([x, t[:, None, None].expand(T, 64, 1)], dim=-1).reshape(-1, 3)
        f_peer = peer_module(inp).reshape(T, 64, 2)
    return float((f_mine - f_peer).abs().max())


# ---------------------------------------------------------------------- the GEMM floor
def floor_ops(T: int, B: int, d: int, H: int, F: int, L: int) -> list[dict]:
    """The matrix products a fine-tuning step needs: (what, m, k, n, calls, transposed A)."""
    N = T * B
    net_fwd = lambda who, rows, calls: [  # noqa: E731
        (f"{who} state layer", rows, d, H, calls, False),
        *[(f"{who} hidden {i + 1}", rows, H, H, calls, False) for i in range(L)],
        (f"{who} output layer", rows, H, d, calls, False),
    ]
    ops = [
        ("policy time MLP 1", T, 2 * F, H, 1, False),
        ("policy time MLP 2", T, H, H, 1, False),
        *net_fwd("sampling:", B, T),  # T sequential calls of B rows per layer
        ("prior time MLP 1", T, 2 * F, H, 1, False),
        ("prior time MLP 2", T, H, H, 1, False),
        *net_fwd("prior:", N, 1),  # all T*B states in one pass
        ("backward: output weight grad", d, N, H, 1, True),
        ("backward: output input grad", N, d, H, 1, False),
    ]
    for i in range(L, 0, -1):
        ops += [(f"backward: hidden {i} weight grad", H, N, H, 1, True), (f"backward: hidden {i} input grad", N, H, H, 1, False)]
    ops += [
        ("backward: state weight grad", d, N, H, 1, True),
        ("backward: time MLP 2 weight grad", H, T, H, 1, True),
        ("backward: time MLP 2 input grad", T, H, H, 1, False),
        ("backward: time MLP 1 weight grad", H, T, 2 * F, 1, True),
    ]
    return [dict(what=w, m=m, k=k, n=n, calls=c, transposed_a=ta, gflop=2 * m * k * n * c / 1e9) for w, m, k, n, c, ta in ops]


class GemmFloor:
    def __init__(self, ops: list[dict], device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.device, self.work = device, []
        for op in ops:
            m, k, n = op["m"], op["k"], op["n"]
            if op["transposed_a"]:  # a weight gradient g^T h: A is the transpose of a row-major (rows, features) tensor
                a = torch.randn(k, m, generator=g).to(device).t()
            else:
                a = torch.randn(m, k, generator=g).to(device)
            b = torch.randn(k, n, generator=g).to(device)
            self.work.append((a, b, torch.empty(m, n, device=device), op["calls"]))

    def run(self) -> tuple[float, list[float]]:
        """Wall time of the whole floor, and of each product (all its calls)."""
        sync(self.device)
        t0 = last = time.perf_counter()
        each = []
        for a, b, out, calls in self.work:
            for _ in range(calls):
                torch.mm(a, b, out=out)
            sync(self.device)
            now = time.perf_counter()
            each.append(now - last)
            last = now
        return last - t0, each


# ---------------------------------------------------------------------- the run
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=500, help="trajectories per fine-tuning step; data points per pretraining step")
    ap.add_argument("--steps-T", type=int, default=100, help="T, the sampler's number of steps")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=10, help="rtbcli steps timed per round and loop (after the warm-up)")
    ap.add_argument("--peer-steps", type=int, default=4, help="torchgfn steps timed per round and loop (they are slower)")
    ap.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of every round and loop")
    ap.add_argument(
        "--floor-reps",
        type=int,
        default=6,
        help="GEMM-floor repetitions per round, half just before rtbcli's fine-tuning steps and half just after",
    )
    ap.add_argument(
        "--d32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time fine-tuning at d = 32 (ManyWell, energy mode) against torchgfn's many_well",
    )
    ap.add_argument("--batch-d32", type=int, default=None, help="trajectories per d = 32 step (default: the manywell-energy preset's)")
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time rtbcli's fine-tuning and pretraining steps with --matmul-dtype bfloat16 (their network products in bf16)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for name in ("batch", "steps_T", "rounds", "steps", "peer_steps", "floor_reps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_d32 is not None and args.batch_d32 < 1:
        fail(f"--batch-d32 must be at least 1, got {args.batch_d32}")
    if args.warmup < 0:
        fail(f"--warmup must be 0 or more, got {args.warmup}")
    cores = os.cpu_count() or 1
    if not 1 <= args.threads <= cores:
        fail(f"--threads must be between 1 and the machine's {cores} cores, got {args.threads}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        fail(f"unsupported device '{args.device}': use cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available: use --device cpu")
    return args


def start(threads: int) -> None:
    """torchgfn importable (else the one-line message naming the extra, exit 2), the thread count, and glibc told to keep
    freed memory as rtbcli's command line does (process-wide, so torchgfn's steps get it too)."""
    try:
        import gfn  # noqa: F401
    except ImportError:
        fail(f"torchgfn is not installed; the peer benchmark needs it: {EXTRA}")
    torch.set_num_threads(threads)
    keep_freed_memory()


def main(argv=None) -> int:
    args = parse_args(argv)
    start(args.threads)
    device = torch.device(args.device)
    T, B, warm = args.steps_T, args.batch, args.warmup
    preset, _ = load_preset("reference")
    preset = preset.updated("sampler", steps=T)
    spec = preset.sampler

    times: dict[str, list[list[float]]] = {
        k: []
        for k in (
            "rtbcli finetune",
            *(("rtbcli finetune bf16",) if args.bf16 else ()),
            "torchgfn finetune",
            "rtbcli pretrain",
            "rtbcli pretrain trajectory",
            *(("rtbcli pretrain bf16",) if args.bf16 else ()),
            "torchgfn pretrain",
            "gemm floor",
            *(("rtbcli finetune d32", "torchgfn finetune d32") if args.d32 else ()),
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prior_ck = load_checkpoint(SHIPPED_PRIOR)
        prior_source = "the shipped reference prior"
        if prior_ck.preset.sampler != spec:  # another T: a prior of this T from a short, untimed rtbcli pretraining
            p = preset.updated("pretrain", steps=2, batch_size=B)
            prior_ck = load_checkpoint(pretrain(p, "reference", tmp / "prior.safetensors", device=device, progress=False, save_every=0).out)
            prior_source = "those of a 2-step rtbcli pretraining; the weights do not change the work"
        prior_net = prior_ck.sampler("policy", device).net
        peer = Peer(prior_net, T, B, spec.sigma2, spec.hidden, spec.time_features, spec.layers, device)
        drift_diff = same_drift(peer.pf_prior.module, prior_net, T, device)
        params = {"rtbcli": sum(p.numel() for p in prior_net.parameters()), "torchgfn": sum(p.numel() for p in peer.pf_post.parameters())}
        ops = floor_ops(T, B, 2, spec.hidden, spec.time_features, spec.layers)
        floor = GemmFloor(ops, device)
        log_every = 1 if device.type == "cuda" else 50  # on CUDA rtbcli's step times need a host sync every step
        ft = preset.updated("finetune", steps=warm + args.steps, batch_size=B)
        pt = preset.updated("pretrain", steps=warm + args.steps, batch_size=B, estimator="pairs")
        pt_traj = pt.updated("pretrain", estimator="trajectory")

        def rtbcli_finetune(r: int, ft=ft) -> list[float]:
            res = finetune(
                prior_ck,
                ft,
                "reference",
                "rtb",
                tmp / "ft.safetensors",
                seed=r,
                device=device,
                progress=False,
                log_every=log_every,
                save_every=0,
            )
            return res.step_seconds[warm:]

        def rtbcli_pretrain(r: int, preset=pt) -> list[float]:
            res = pretrain(
                preset, "reference", tmp / "pt.safetensors", seed=r, device=device, progress=False, log_every=log_every, save_every=0
            )
            return res.step_seconds[warm:]

        if args.d32:  # ManyWell, d = 32: both sides start from the same network (rtbcli's fresh policy)
            mw, _ = load_preset("manywell-energy")
            b32 = args.batch_d32 or mw.finetune.batch_size
            mw = mw.updated("sampler", steps=T).updated("finetune", steps=warm + args.steps, batch_size=b32)
            _, policy32 = brownian_start(mw, 0, device, torch.float32)
            peer32 = ManyWellPeer(
                policy32.net, T, b32, mw.sampler.sigma2, mw.sampler.hidden, mw.sampler.time_features, mw.sampler.layers, device
            )

        def rtbcli_finetune_d32(r: int) -> list[float]:
            res = finetune(
                None,
                mw,
                "manywell-energy",
                "rtb",
                tmp / "mw.safetensors",
                seed=r,
                device=device,
                progress=False,
                log_every=log_every,
                save_every=0,
            )
            return res.step_seconds[warm:]

        op_times: list[list[float]] = []
        half = (args.floor_reps + 1) // 2

        def floor_reps(n: int) -> None:
            floor.run()  # warm-up: brings its operands back into cache
            for _ in range(n):
                total, each = floor.run()
                round_floor.append(total)
                op_times.append(each)

        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)  # who goes first alternates from round to round
            round_floor: list[float] = []
            for loop in ("finetune", "pretrain", *(("d32",) if args.d32 else ())):
                for side in order:
                    if loop == "d32":
                        if side == 0:
                            times["rtbcli finetune d32"].append(rtbcli_finetune_d32(r))
                        else:
                            times["torchgfn finetune d32"].append(peer32.timed(peer32.finetune_step, warm + args.peer_steps)[warm:])
                    elif side == 0:
                        if loop == "finetune":  # the floor's repetitions just before and just after it: the same load
                            floor_reps(half)
                            times["rtbcli finetune"].append(rtbcli_finetune(r))
                            floor_reps(args.floor_reps - half)
                            if args.bf16:
                                times["rtbcli finetune bf16"].append(rtbcli_finetune(r, ft.updated("finetune", matmul_dtype="bfloat16")))
                        else:
                            times["rtbcli pretrain"].append(rtbcli_pretrain(r))
                            times["rtbcli pretrain trajectory"].append(rtbcli_pretrain(r, pt_traj))
                            if args.bf16:
                                times["rtbcli pretrain bf16"].append(rtbcli_pretrain(r, pt.updated("pretrain", matmul_dtype="bfloat16")))
                    else:
                        step = peer.finetune_step if loop == "finetune" else peer.pretrain_step
                        times[f"torchgfn {loop}"].append(peer.timed(step, warm + args.peer_steps)[warm:])
            times["gemm floor"].append(round_floor)
        peer_calls = int(peer.last_trajectories.actions.tensor.shape[0])

    med = {k: median([x for rnd in v for x in rnd]) for k, v in times.items()}
    per_round = {
        "finetune_ratio": [median(p) / median(m) for p, m in zip(times["torchgfn finetune"], times["rtbcli finetune"])],
        "pretrain_ratio": [median(p) / median(m) for p, m in zip(times["torchgfn pretrain"], times["rtbcli pretrain"])],
        "pretrain_trajectory_ratio": [
            median(p) / median(m) for p, m in zip(times["torchgfn pretrain"], times["rtbcli pretrain trajectory"])
        ],
        "finetune_floor_ratio": [median(m) / median(f) for m, f in zip(times["rtbcli finetune"], times["gemm floor"])],
    }
    if args.bf16:
        per_round["finetune_bf16_ratio"] = [
            median(p) / median(m) for p, m in zip(times["torchgfn finetune"], times["rtbcli finetune bf16"])
        ]
        per_round["finetune_bf16_floor_ratio"] = [median(m) / median(f) for m, f in zip(times["rtbcli finetune bf16"], times["gemm floor"])]
        per_round["pretrain_bf16_ratio"] = [
            median(p) / median(m) for p, m in zip(times["torchgfn pretrain"], times["rtbcli pretrain bf16"])
        ]
    if args.d32:
        per_round["d32_finetune_ratio"] = [
            median(p) / median(m) for p, m in zip(times["torchgfn finetune d32"], times["rtbcli finetune d32"])
        ]
    gflop = sum(op["gflop"] for op in ops)
    for i, op in enumerate(ops):
        op["median_s"] = median([each[i] for each in op_times])
    report = {
        "finetune_ratio": med["torchgfn finetune"] / med["rtbcli finetune"],
        "pretrain_ratio": med["torchgfn pretrain"] / med["rtbcli pretrain"],
        "finetune_floor_ratio": med["rtbcli finetune"] / med["gemm floor"],
        "pretrain_trajectory_ratio": med["torchgfn pretrain"] / med["rtbcli pretrain trajectory"],
        "finetune_bf16_ratio": med["torchgfn finetune"] / med["rtbcli finetune bf16"] if args.bf16 else None,
        "finetune_bf16_floor_ratio": med["rtbcli finetune bf16"] / med["gemm floor"] if args.bf16 else None,
        "pretrain_bf16_ratio": med["torchgfn pretrain"] / med["rtbcli pretrain bf16"] if args.bf16 else None,
        "d32_finetune_ratio": med["torchgfn finetune d32"] / med["rtbcli finetune d32"] if args.d32 else None,
        "d32_batch": b32 if args.d32 else None,
        "params_d32": (
            {"rtbcli": sum(p.numel() for p in policy32.parameters()), "torchgfn": sum(p.numel() for p in peer32.pf.parameters())}
            if args.d32
            else None
        ),
        "median_s": med,
        "per_round": per_round,
        "n_steps": {k: sum(len(rnd) for rnd in v) for k, v in times.items()},
        "rounds": args.rounds,
        "warmup_discarded_per_round": warm,
        "batch": B,
        "T": T,
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torchgfn": metadata.version("torchgfn"),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": params,
        "network": (
            "the same PIS network on both sides (time features sin/cos of 64 frequencies -> Linear(128,64) -> GELU -> "
            "Linear(64,64); state Linear(2,64); sum -> GELU -> 2 x [Linear(64,64), GELU] -> Linear(64,2)), loaded with "
            f"the same weights ({prior_source}); torchgfn also learns log Z (1 parameter, counted in neither). "
            "Differences: torchgfn evaluates the time MLP for each of the T*B states, rtbcli once per time step; "
            "torchgfn's T network calls per trajectory are T-1 Gaussian steps and an exit action (its sample is the "
            "state at t = (T-1)/T), rtbcli's are T Gaussian steps to t = 1: the same network work"
        ),
        "drift_max_abs_diff": drift_diff,
        "peer_estimator_calls_per_trajectory": peer_calls,
        "step_contents": STEP_CONTENTS,
        "peer_extra_work": PEER_EXTRA_WORK,
        "peer_setup": (
            "torchgfn as in tutorials/examples/train_diffusion_rtb.py, but debug=False (the example passes __debug__, "
            "True unless python -O, which adds checks and a loss.item() per pretraining step) and sigma = sqrt(5), "
            "t_scale = 1 (per-step variance 5 dt, the reference task's; the example's sigma 2, t_scale 5 give 20 dt); "
            f"exploration std {EXPLORATION} in both"
        ),
        "gemm_floor": {"gflop": gflop, "gflop_per_s": gflop / med["gemm floor"], "ops": ops},
    }
    if args.json:
        print(json.dumps(report))
        return 0
    show(report)
    return 0


def show(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(
        f"[bold]rtbcli vs torchgfn {rep['torchgfn']}[/]: batch {rep['batch']}, T = {rep['T']}, {rep['device']} "
        f"({rep['cpu_capability']}, {rep['threads']} threads of {rep['cpu_count']}), torch {rep['torch']}, {rep['date']}"
        + "".join(f", {k}={v}" for k, v in rep["isa_env"].items())
    )
    con.print(
        f"parameters: rtbcli {rep['params']['rtbcli']:,}, torchgfn {rep['params']['torchgfn']:,}; "
        f"same drift to {rep['drift_max_abs_diff']:.1e}"
    )
    t = Table(
        title=f"median step time over {rep['rounds']} interleaved rounds ({rep['warmup_discarded_per_round']} warm-up steps "
        "per round discarded)"
    )
    for c in ("", "rtbcli", "torchgfn", "torchgfn / rtbcli", "per round"):
        t.add_column(c, justify="right" if c else "left")
    m, pr = rep["median_s"], rep["per_round"]
    for loop in ("finetune", "pretrain"):
        t.add_row(
            loop,
            f"{m['rtbcli ' + loop] * 1e3:.1f} ms",
            f"{m['torchgfn ' + loop] * 1e3:.1f} ms",
            f"{rep[loop + '_ratio']:.2f}x",
            " ".join(f"{x:.2f}" for x in pr[loop + "_ratio"]),
        )
    t.add_row(
        "pretrain, trajectory estimator",
        f"{m['rtbcli pretrain trajectory'] * 1e3:.1f} ms",
        f"{m['torchgfn pretrain'] * 1e3:.1f} ms",
        f"{rep['pretrain_trajectory_ratio']:.2f}x",
        " ".join(f"{x:.2f}" for x in pr["pretrain_trajectory_ratio"]),
    )
    if rep["d32_finetune_ratio"] is not None:
        t.add_row(
            f"finetune d = 32 (ManyWell, batch {rep['d32_batch']})",
            f"{m['rtbcli finetune d32'] * 1e3:.1f} ms",
            f"{m['torchgfn finetune d32'] * 1e3:.1f} ms",
            f"{rep['d32_finetune_ratio']:.2f}x",
            " ".join(f"{x:.2f}" for x in pr["d32_finetune_ratio"]),
        )
    if rep["finetune_bf16_ratio"] is not None:
        t.add_row(
            "finetune, --matmul-dtype bfloat16",
            f"{m['rtbcli finetune bf16'] * 1e3:.1f} ms",
            f"{m['torchgfn finetune'] * 1e3:.1f} ms",
            f"{rep['finetune_bf16_ratio']:.2f}x",
            " ".join(f"{x:.2f}" for x in pr["finetune_bf16_ratio"]),
        )
    if rep["pretrain_bf16_ratio"] is not None:
        t.add_row(
            "pretrain, --matmul-dtype bfloat16",
            f"{m['rtbcli pretrain bf16'] * 1e3:.1f} ms",
            f"{m['torchgfn pretrain'] * 1e3:.1f} ms",
            f"{rep['pretrain_bf16_ratio']:.2f}x",
            " ".join(f"{x:.2f}" for x in pr["pretrain_bf16_ratio"]),
        )
    t.add_row("GEMM floor (fine-tuning)", f"{m['gemm floor'] * 1e3:.1f} ms", "", "", "")
    t.add_row(
        "rtbcli finetune / floor", f"{rep['finetune_floor_ratio']:.2f}x", "", "", " ".join(f"{x:.2f}" for x in pr["finetune_floor_ratio"])
    )
    if rep["finetune_bf16_floor_ratio"] is not None:
        t.add_row(
            "rtbcli finetune bf16 / float32 floor",
            f"{rep['finetune_bf16_floor_ratio']:.2f}x",
            "",
            "",
            " ".join(f"{x:.2f}" for x in pr["finetune_bf16_floor_ratio"]),
        )
    con.print(t)
    f = Table(
        title=f"GEMM floor: {rep['gemm_floor']['gflop']:.2f} GFLOP at {rep['gemm_floor']['gflop_per_s']:.1f} GFLOP/s (float32 torch.mm)"
    )
    for c in ("product", "m x k x n", "calls", "GFLOP", "ms"):
        f.add_column(c, justify="left" if c == "product" else "right")
    for op in rep["gemm_floor"]["ops"]:
        f.add_row(
            op["what"],
            f"{op['m']}x{op['k']}{'ᵀ' if op['transposed_a'] else ''}x{op['n']}",
            str(op["calls"]),
            f"{op['gflop']:.3f}",
            f"{op['median_s'] * 1e3:.2f}",
        )
    con.print(f)
    con.print("[bold]each step includes[/]")
    for k, v in rep["step_contents"].items():
        con.print(f"  {k}: {v}")
    con.print(f"  note: {rep['peer_extra_work']}")
    con.print(f"  peer set-up: {rep['peer_setup']}")
    con.print(f"  network: {rep['network']}")


if __name__ == "__main__":
    sys.exit(run_script(main))
