"""Drawing samples from a checkpoint and saving them (.npy float32 (n, d), or .csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .runtime import atomic_path, make_generator
from .sampler import DiffusionSampler


@torch.no_grad()
def draw_samples(
    ck: Checkpoint,
    n: int,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    chunk: int = 50_000,
    which: str = "policy",
    policy: DiffusionSampler | None = None,
) -> np.ndarray:
    """n samples x_T from the checkpoint's own policy (or, `which="prior"`, a finetuned checkpoint's frozen prior;
    or `policy`, built from it elsewhere: `rtbcli.evaluate.sampling_policy`), on-policy, no exploration, float32 (n, d)."""
    policy = policy if policy is not None else ck.sampler(which, device)
    gen = make_generator(seed, device)
    parts = [policy.sample(min(chunk, n - i), 0.0, gen)[-1].cpu() for i in range(0, n, chunk)]
    return torch.cat(parts).numpy().astype(np.float32)


def save_samples(path: Path, x: np.ndarray) -> None:
    """Write atomically; the format follows the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            header = ",".join(f"x{i}" for i in range(x.shape[1]))
            np.savetxt(tmp, x, delimiter=",", header=header, comments="", fmt="%.9g")  # 9 digits: float32 exactly
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, x, allow_pickle=False)
