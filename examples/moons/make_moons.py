"""Write moons.csv: 4,000 points of two interleaved half-circles (numpy only, seeded)."""

import numpy as np

rng = np.random.default_rng(0)
n = 4000
t = rng.uniform(0, np.pi, n)
upper = rng.random(n) < 0.5
x = np.where(upper, np.cos(t), 1 - np.cos(t))
y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
points = 2.5 * np.stack([x - 0.5, y - 0.25], axis=1) + 0.1 * rng.standard_normal((n, 2))
np.savetxt("moons.csv", points, delimiter=",", header="x,y", comments="", fmt="%.6f")
print(f"wrote moons.csv: {n} points")
