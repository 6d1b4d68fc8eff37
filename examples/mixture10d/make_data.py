"""The 10-D example: a Gaussian mixture sampled to data.npy, and exact samples of the target to target.npy.

Prior data: 8 equal-weight Gaussians in R^10 (std 0.5) at fixed random corners of [-3, 3]^10.
Reward (rewards.py): log r = log p_keep - log p_data with p_keep the mixture of components
0, 2 and 5 weighted 1 : 2 : 3, so the target p_data * r is exactly p_keep (the 10-D analogue of the
reference task). target.npy holds 20,000 exact samples of it, the reference for `rtbcli evaluate`.
"""

import numpy as np

from rewards import KEEP, MEANS, STD, WEIGHTS

rng = np.random.default_rng(1)


def mixture(n, comps, weights):
    k = rng.choice(comps, size=n, p=np.asarray(weights) / np.sum(weights))
    return (MEANS[k] + STD * rng.standard_normal((n, MEANS.shape[1]))).astype(np.float32)


np.save("data.npy", mixture(20_000, np.arange(len(MEANS)), np.ones(len(MEANS))))
np.save("target.npy", mixture(20_000, np.asarray(KEEP), WEIGHTS))
print("wrote data.npy and target.npy (20,000 x 10 each)")
