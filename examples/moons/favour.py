"""A reward for the two-moons example: favour the upper moon.

    log r(x) = log sigmoid(sharpness * y)

close to 0 on the upper moon (y > 0) and very negative on the lower one. rtbcli calls it on a
float tensor x of shape (B, 2), without gradient, and expects log r of shape (B,).
"""

import torch.nn.functional as F


def log_reward(x, sharpness: float = 4.0):
    return F.logsigmoid(sharpness * x[:, 1])
