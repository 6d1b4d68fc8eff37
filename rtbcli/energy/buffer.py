"""A replay buffer of terminal states, sampled by rank, and the backward process that replays them.

As in Sendera et al. 2024 (gfn-diffusion, buffer.py), the buffer keeps the last `capacity`
terminal states x with their log r(x) (FIFO: the oldest leave first) and draws a batch with
replacement with probabilities by the rank of log r among the N states held:

    w_i = 1 / (k N + rank_i),   rank_i = 0 for the largest log r, ..., N - 1 for the smallest,
    P(i) = w_i / sum_j w_j,     k = 0.01 (`rank_k`; smaller k prioritises more steeply).

Ties are ranked in the order of the states' slots (a stable sort); a NaN log r ranks last. A
replayed state becomes a training trajectory through the sampler's fixed backward process
(`backward_sample`: the Brownian bridge pinned at 0 on its time grid, `backward_trajectories` on
the uniform one; a DDPM's noising process), whose trajectories have no behaviour
log-probability: they serve trajectory-balance objectives (rtb, trust-pcl, vargrad), not
reinforce-kl.

Everything lives in tensors on the buffer's device. `add` and `sample` never copy to the host
(the sizes they need are Python ints known from the shapes); the rank order is recomputed lazily
by one sort of the N states at the first `sample` after an `add` (as the paper's code re-ranks on
every add; about 0.25 s for N = 600,000 on 2 CPU threads, negligible on a GPU), and the cumulative
rank weights are cached, since they depend on N alone. `state_dict` / `load_state_dict` save and restore the buffer exactly
(tensors only, for safetensors).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..sampler import bridge_sample


def rank_weights(n: int, k: float = 0.01, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Unnormalised weights by rank position, w_r = 1 / (k n + r), r = 0..n-1: shape (n,)."""
    return 1.0 / (k * n + torch.arange(n, dtype=dtype, device=device))


class ReplayBuffer:
    """FIFO buffer of `capacity` states (dim d) with log r (and, in energy mode, log pi)."""

    def __init__(
        self,
        capacity: int,
        dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rank_k: float = 0.01,
        with_log_pi: bool = False,
        rank_by_log_pi: bool = False,
    ):
        if capacity <= 0:
            raise InputError(f"the buffer size must be > 0, got {capacity}: set a positive buffer size")
        if rank_by_log_pi and not with_log_pi:
            raise InputError("a buffer ranked by log pi must keep log pi (with_log_pi=True)")
        if not rank_k > 0:
            raise InputError(f"the rank weight k must be > 0, got {rank_k}")
        self.capacity, self.dim, self.rank_k = int(capacity), int(dim), float(rank_k)
        self.x = torch.empty(self.capacity, self.dim, dtype=dtype, device=device)
        self.log_r = torch.empty(self.capacity, dtype=dtype, device=device)
        self.log_pi = torch.empty(self.capacity, dtype=dtype, device=device) if with_log_pi else None
        self.rank_by_log_pi = rank_by_log_pi  # rank by log pi (energy mode, as the paper's code) instead of log r
        self.size = 0  # states held (a Python int: known without a sync)
        self.head = 0  # the slot the next state goes to; when full, the oldest state's slot
        self._order: torch.Tensor | None = None  # slots by decreasing log r, cached until the next add
        self._cdf: torch.Tensor | None = None  # cumulative rank weights for the current size (they depend on it alone)

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return self.x.device

    # ------------------------------------------------------------------ adding
    def add(self, x: torch.Tensor, log_r: torch.Tensor, log_pi: torch.Tensor | None = None) -> None:
        """Append states x (n, d) with log r (n,) [and log pi (n,)], evicting the oldest when full.

        If n > capacity only the last `capacity` rows are kept (what n single adds would leave).
        """
        n = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.dim or log_r.shape != (n,):
            raise InputError(f"expected x (n, {self.dim}) and log_r (n,), got {tuple(x.shape)} and {tuple(log_r.shape)}")
        if (self.log_pi is None) != (log_pi is None):
            raise InputError("log_pi must be given exactly when the buffer keeps it (with_log_pi)")
        if n == 0:
            return
        if n > self.capacity:
            self.head = (self.head + n - self.capacity) % self.capacity
            x, log_r = x[-self.capacity :], log_r[-self.capacity :]
            log_pi = None if log_pi is None else log_pi[-self.capacity :]
            n = self.capacity
        slots = (self.head + torch.arange(n, device=self.device)) % self.capacity
        self.x.index_copy_(0, slots, x.detach().to(self.x))
        self.log_r.index_copy_(0, slots, log_r.detach().to(self.log_r))
        if log_pi is not None and self.log_pi is not None:  # both or neither (checked above)
            self.log_pi.index_copy_(0, slots, log_pi.detach().to(self.log_pi))
        self.head = (self.head + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._order = None

    # ------------------------------------------------------------------ sampling
    def order(self) -> torch.Tensor:
        """Slots of the held states by decreasing log r, or log pi if `rank_by_log_pi` (NaN last; ties by slot): shape (size,)."""
        if self._order is None:
            held = self.log_pi if self.rank_by_log_pi and self.log_pi is not None else self.log_r
            key = torch.nan_to_num(held[: self.size], nan=float("-inf"))
            self._order = torch.sort(key, descending=True, stable=True).indices
        return self._order

    def probabilities(self) -> torch.Tensor:
        """P(slot i) for the held states, shape (size,), by the rank formula (float64)."""
        w = rank_weights(self.size, self.rank_k, device=self.device)
        p = torch.empty_like(w)
        p[self.order()] = w / w.sum()
        return p

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x (batch, d), log_r (batch,), log_pi (batch,) or None), drawn with replacement by rank.

        Inverse-CDF draw on the cumulative rank weights: no host synchronisation.
        """
        if self.size == 0:
            raise InputError("the replay buffer is empty: add states before sampling")
        if self._cdf is None or self._cdf.numel() != self.size:
            self._cdf = torch.cumsum(rank_weights(self.size, self.rank_k, device=self.device), 0)
        cdf = self._cdf
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=self.device) * cdf[-1]
        pos = torch.searchsorted(cdf, u, right=True).clamp_(max=self.size - 1)
        idx = self.order()[pos]
        return self.x[idx], self.log_r[idx], None if self.log_pi is None else self.log_pi[idx]

    def states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The held states, oldest first: (x, log_r, log_pi or None)."""
        slots = (self.head - self.size + torch.arange(self.size, device=self.device)) % self.capacity
        return self.x[slots], self.log_r[slots], None if self.log_pi is None else self.log_pi[slots]

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the buffer exactly (slots as held, `head`, `size`, `capacity`)."""
        d = {
            "x": self.x[: self.size].clone(),
            "log_r": self.log_r[: self.size].clone(),
            "meta": torch.tensor([self.capacity, self.head, self.size], dtype=torch.int64),
        }
        if self.log_pi is not None:
            d["log_pi"] = self.log_pi[: self.size].clone()
        return d

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        capacity, head, size = (int(v) for v in d["meta"].tolist())
        if capacity != self.capacity or d["x"].shape != (size, self.dim):
            raise InputError(
                f"the saved buffer holds {tuple(d['x'].shape)} states of capacity {capacity}; "
                f"this buffer has capacity {self.capacity} and dimension {self.dim}"
            )
        if ("log_pi" in d) != (self.log_pi is not None):
            raise InputError("the saved buffer and this one disagree on keeping log pi")
        self.head, self.size = head, size
        self.x[:size] = d["x"].to(self.x)
        self.log_r[:size] = d["log_r"].to(self.log_r)
        if self.log_pi is not None:
            self.log_pi[:size] = d["log_pi"].to(self.log_pi)
        self._order = None


def backward_trajectories(x_end: torch.Tensor, steps: int, sigma2: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training trajectories (T + 1, B, d) for replayed states x_end (B, d): the fixed backward
    process, the Brownian bridge pinned at x_0 = 0 and x_T = x_end,
    p_B(x_i | x_{i+1}) = N(i/(i+1) x_{i+1}, sigma2 dt i/(i+1) I) (`rtbcli.sampler.bridge_sample`)."""
    return bridge_sample(x_end, steps, sigma2, generator)
