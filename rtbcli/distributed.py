"""Several processes, one run: torch.distributed as torchrun launches it.

`torchrun --nproc-per-node N -m rtbcli finetune ...` starts N copies of the command with the
usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...); a plain `rtbcli ...` is one
process. The run is the same run at any N:

- the batch size is the global batch; every random draw of a step is made for the whole global
  batch from the run's generator (identical on every rank) and each rank keeps its own share,
  so rank r's trajectories are exactly trajectories [r*b, (r+1)*b) of the one-process run;
- per-trajectory scalars (log-probabilities, log r) are gathered, so every objective sees the
  global batch: reinforce-kl's importance weights and batch-mean baseline are global, and
  logged metrics are global;
- each rank back-propagates the global loss through its own trajectories; the partial
  gradients of the policy are summed over ranks (all_reduce), which is the gradient of the
  global loss; log Z / V(s0) gets the full gradient on every rank from the gathered scalars;
- rank 0 alone shows progress and writes checkpoints and logs.

Control messages (a stop request after SIGINT/SIGTERM) go over a CPU (gloo) group, so that no
collective on the training device ever syncs with the host inside the loop.

Failures: a process that fails exits (with its own one-line message); the others notice at their
next collective, whose connection to it is closed, and stop with `PeerFailed`; torchrun stops
whatever is left. No process waits on one that is gone.
"""

from __future__ import annotations

import datetime
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from .errors import InputError, PeerFailed


@dataclass
class Dist:
    """This process's place in the job; `Dist()` is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    control: tdist.ProcessGroup | None = field(default=None, repr=False)  # a gloo group for host-side messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def check_batch(self, batch: int, what: str = "--batch-size") -> int:
        """This rank's share of a global batch; the batch must divide evenly."""
        if batch % self.world:
            raise InputError(
                f"{what} {batch} is not divisible by the number of processes ({self.world}): "
                f"use a multiple of {self.world}, e.g. {batch + self.world - batch % self.world}"
            )
        return batch // self.world

    @contextmanager
    def _collective(self):
        """A collective operation; its failure means that another process is gone (`PeerFailed`)."""
        try:
            yield
        except RuntimeError as e:  # gloo and nccl raise RuntimeError (DistBackendError) when a peer is gone
            first = (str(e).strip().splitlines() or [""])[0]
            cause = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:120]  # without gloo's source location
            raise PeerFailed(
                f"process {self.rank} of {self.world} stopped: another process of the job failed or was killed "
                f"(its own message or torchrun's report says why; here: {cause})"
            ) from e

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along the last dimension, in rank order.

        This rank's own slot is `local` itself, so gradients flow back to it (and only to it).
        """
        if not self.active:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        with self._collective():
            tdist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        return torch.cat(parts, dim=-1)

    def sum_grads(self, params) -> None:
        """Sum the .grad of `params` over all ranks, in one flat all_reduce."""
        if not self.active:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self._collective():
            tdist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over all ranks (a new tensor)."""
        t = t.detach().clone()
        if self.active:
            with self._collective():
                tdist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (host-side, over the control group).

        A single process returns the flag itself: no collective, no tensor.
        """
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        with self._collective():
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every rank (over the control group: gloo on the CPU, no device sync)."""
        if self.active:
            with self._collective():
                tdist.barrier(group=self.control)


def launched() -> bool:
    """Started by torchrun (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (if any) and pick this rank's device.

    CPU runs use gloo; CUDA runs use nccl with one GPU per local rank. Returns the single-process
    `Dist()` and `device` unchanged when not launched by torchrun.
    """
    if not launched():
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if have < local_world:
            raise InputError(
                f"--device cuda with {local_world} processes on this machine but {have} GPU(s): "
                f"use --nproc-per-node {have} or fewer, or --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    control = tdist.new_group(backend="gloo") if device.type == "cuda" else None
    dist = Dist(rank, world, local_rank, local_world, control)
    # A rank leaves its group only after every rank has finished connecting to it: a process
    # that failed right after joining (bad input found after the group formed, a reward that
    # raises at once) would otherwise close its sockets while a slower rank is still connecting,
    # and that rank would report gloo's "connectFullMesh failed" instead of the cause.
    dist.barrier()
    return dist, device


def check_batch_before_joining(batch: int, what: str = "--batch-size") -> None:
    """The batch check that every rank can make from torchrun's environment alone, before the
    process group forms: each rank then fails with the same one-line error and none of them waits
    on a group that another has already left."""
    if launched():
        Dist(world=int(os.environ["WORLD_SIZE"])).check_batch(batch, what)


def shutdown(dist: Dist) -> None:
    """Leave the job; after a failure elsewhere the group may already be broken, which is no error here."""
    if dist.active and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except RuntimeError:
            pass
