"""Write moons.csv: 4,000 points of two interleaved half-circles (numpy only, seeded).

    python make_moons.py                                   # the worked example's data: noise 0.1
    python make_moons.py --noise 0.05 --out thin.csv       # data nearer the curves (README: thin data)
    python make_moons.py --noise 0.05 --n 20000 --seed 7 --out exact.npy   # more draws of the same law, a reference
"""

import argparse

import numpy as np

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--noise", type=float, default=0.1, help="std of the Gaussian noise added to each point (in data units)")
ap.add_argument("--n", type=int, default=4000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="moons.csv", help=".csv (with a header line) or .npy")
a = ap.parse_args()

rng = np.random.default_rng(a.seed)
n = a.n
t = rng.uniform(0, np.pi, n)
upper = rng.random(n) < 0.5
x = np.where(upper, np.cos(t), 1 - np.cos(t))
y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
points = 2.5 * np.stack([x - 0.5, y - 0.25], axis=1) + a.noise * rng.standard_normal((n, 2))
if a.out.endswith(".npy"):
    np.save(a.out, points)
else:
    np.savetxt(a.out, points, delimiter=",", header="x,y", comments="", fmt="%.6f")
print(f"wrote {a.out}: {n} points")
