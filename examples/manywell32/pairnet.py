"""A drift network with ManyWell-32's structure: one small MLP shared by the 16 pairs (x1, x2).

ManyWell-32 is 16 independent copies of one 2-D density, and the tilted target of the `manywell32` preset is still a
product over pairs (the reward tilts each of the first 8 pairs on its own). rtbcli's `DriftNet`, one MLP over all 32
coordinates, has to learn that from data; it comes out worst where several pairs sit in the left well at once, states
its data hold rarely (k >= 7 of the 8 tilted pairs: 1 in 10^5 of them) and the tilted target often (64%): README,
"ManyWell-32".

Here the drift of pair j is f_j(x, t) = MLP(x_j, t, e_j): the same weights for every pair, with a learned embedding e_j
of the pair's index (zero at the start), so that fine-tuning can tell a tilted pair from an untilted one. It sees each
pair's own coordinates only, so what it learns from one pair's data holds for every combination of wells. Its MLP is
rtbcli's DriftNet at d = 2 (GELU, sinusoidal time features, last layer zero: f = 0 at the start).

    rtbcli pretrain --preset examples/manywell32/pairs.toml --out prior-pairs.safetensors
    rtbcli finetune --prior prior-pairs.safetensors --network examples/manywell32/pairnet.py:PairDrift --algo rtb --out rtb-pairs.safetensors
"""

import torch
from torch import nn

from rtbcli.sampler import TimeEncoding


class PairDrift(nn.Module):
    def __init__(self, dim: int = 32, width: int = 64, n_freq: int = 64, layers: int = 2, embed: int = 8):
        super().__init__()
        if dim % 2:
            raise ValueError(f"PairDrift needs an even dimension (pairs of coordinates), got d = {dim}")
        self.pairs = dim // 2
        self.time = TimeEncoding(n_freq, width)
        self.state = nn.Linear(2, width)
        self.index = nn.Parameter(torch.zeros(self.pairs, embed))  # e_j, learned
        self.embed = nn.Linear(embed, width, bias=False)
        body: list[nn.Module] = [nn.GELU()]
        for _ in range(layers):
            body += [nn.Linear(width, width), nn.GELU()]
        out = nn.Linear(width, 2)
        nn.init.zeros_(out.weight)  # f = 0 at the start: the Brownian motion
        nn.init.zeros_(out.bias)
        body.append(out)
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, 32), t (B,) -> the drift (B, 32), pair by pair."""
        b = x.shape[0]
        h = self.state(x.reshape(b, self.pairs, 2)) + self.embed(self.index) + self.time(t)[:, None, :]
        return self.body(h).reshape(b, -1)
