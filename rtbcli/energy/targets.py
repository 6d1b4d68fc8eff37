"""Energy targets: unnormalised log-densities log pi(x) with exact samplers and exact log Z.

The three targets of Sendera et al. 2024 (Table 1; code GFNOrg/gfn-diffusion, energies/),
each with the forward variance sigma^2 (their `t_scale`) the paper trains it with:

| name     | d  | log pi(x)                                                           | log Z    | sigma^2 |
|----------|----|---------------------------------------------------------------------|----------|---------|
| gmm25    | 2  | log (1/25) sum_k N(x; mu_k, 0.3 I),  mu_k in {-10,-5,0,5,10}^2      | 0        | 5       |
| funnel   | 10 | log N(x_0; 0, 9) + sum_{i=1}^{9} log N(x_i; 0, e^{x_0})             | 0        | 1       |
| manywell | 32 | sum_{j<16} -x1_j^4 + 6 x1_j^2 + 0.5 x1_j - 0.5 x2_j^2 (unnormalised)  | 164.6957 | 1       |

(The paper's `hard_funnel`: x_0 ~ N(0, 3^2); its `easy_funnel` has x_0 ~ N(0, 1) and is not
the Table 1 target.) ManyWell's log Z is computed by quadrature
(`rtbcli.datasets.manywell.ManyWell.log_z_unnormalised`), never typed in, and its density is the
one `rtbcli.datasets.manywell.log_density`.

Every target has `log_density(x)`: x (..., d) -> (...), in x's dtype and on x's device, and
differentiable by autograd (local search and the Langevin parametrisation need grad log pi);
`sample(n, generator, dtype, device)`: n exact samples (n, d), drawn in float64 on the
generator's device and then cast, so that a seed gives the same values at any dtype; `log_z`;
`dim`; `sigma2` (the paper's forward variance); `name`.
"""

from __future__ import annotations

import math

import torch

from ..datasets import manywell as _mw
from ..errors import InputError
from ..gaussian import centred_log_prob


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class EnergyTarget:
    """Base class: an unnormalised density pi(x) = exp(log_density(x)) on R^dim with exact log Z."""

    name: str = ""
    dim: int = 0
    sigma2: float = 1.0  # the paper's forward variance sigma^2 (t_scale) for this target

    def log_density(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_density(x)

    @property
    def log_z(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """n exact samples (n, dim) of pi / Z (float64 on the generator's device, then cast)."""
        if n < 0:
            raise InputError(f"the number of samples must be >= 0, got {n}")
        x = self._draw(int(n), generator)
        return x.to(device=x.device if device is None else device, dtype=dtype)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise InputError(f"the {self.name} target has dimension {self.dim}, got x of shape {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, sigma2={self.sigma2})"


class GMM25(EnergyTarget):
    """25 equal-weight Gaussians, means {-10,-5,0,5,10}^2, covariance 0.3 I: normalised, log Z = 0.

    log pi(x) = logsumexp_k log N(x; mu_k, 0.3 I) - log 25
    """

    name, dim, sigma2 = "gmm25", 2, 5.0
    variance = 0.3
    grid = (-10.0, -5.0, 0.0, 5.0, 10.0)

    def __init__(self):
        self.means = torch.tensor([(a, b) for a in self.grid for b in self.grid], dtype=torch.float64)  # (25, 2)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        comp = centred_log_prob(x[..., None, :] - self.means.to(x), self.variance)  # (..., 25)
        return torch.logsumexp(comp, dim=-1) - math.log(len(self.means))

    @property
    def log_z(self) -> float:
        return 0.0

    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        dev = _gen_device(generator)
        k = torch.randint(len(self.means), (n,), generator=generator, device=dev)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64, device=dev)
        return self.means.to(dev)[k] + math.sqrt(self.variance) * eps

    def sample_stratified(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """NOT exact samples of pi: an equal count n // 25 per mode (rows grouped by mode), as the
        paper's code drew its 25GMM reference samples for Table 1 (gfn-diffusion before commit
        0383449, which fixed it to a multinomial draw). Equal counts remove the multinomial noise
        of the mode weights and so lower W2 against them; `sample` is the exact sampler. The
        n % 25 remaining rows go to distinct modes chosen uniformly at random.
        """
        if n < 0:
            raise InputError(f"the number of samples must be >= 0, got {n}")
        dev = _gen_device(generator)
        k = torch.arange(len(self.means), device=dev).repeat_interleave(n // len(self.means))
        extra = torch.randperm(len(self.means), generator=generator, device=dev)[: n % len(self.means)]
        k = torch.cat([k, extra])
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64, device=dev)
        x = self.means.to(dev)[k] + math.sqrt(self.variance) * eps
        return x.to(device=x.device if device is None else device, dtype=dtype)


class Funnel(EnergyTarget):
    """Neal's funnel in d = 10 (the paper's `hard_funnel`): normalised, log Z = 0.

    x_0 ~ N(0, 9),   x_i | x_0 ~ N(0, e^{x_0}), i = 1..9
    log pi(x) = log N(x_0; 0, 9) + sum_{i>=1} [-x_i^2 / (2 e^{x_0}) - x_0 / 2 - log(2 pi) / 2]
    """

    name, dim, sigma2 = "funnel", 10, 1.0
    x0_variance = 9.0

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x0, rest = x[..., 0], x[..., 1:]
        lead = centred_log_prob(x0[..., None], self.x0_variance)
        var = torch.exp(x0)[..., None]
        other = -0.5 * rest.pow(2) / var - 0.5 * x0[..., None] - 0.5 * math.log(2 * math.pi)
        return lead + other.sum(-1)

    @property
    def log_z(self) -> float:
        return 0.0

    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        dev = _gen_device(generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=dev)
        x0 = math.sqrt(self.x0_variance) * eps[:, :1]
        return torch.cat([x0, torch.exp(0.5 * x0) * eps[:, 1:]], dim=1)


class ManyWellEnergy(EnergyTarget):
    """ManyWell-32 as an energy: the unnormalised `rtbcli.datasets.manywell.log_density`,

        log pi(x) = sum_{j<16} -x1_j^4 + 6 x1_j^2 + 0.5 x1_j - 0.5 x2_j^2,

    log Z = 16 [log integral exp(-x^4 + 6 x^2 + 0.5 x) dx + 0.5 log 2 pi] = 164.6957 by quadrature,
    exact samples by inverse CDF on the quadrature grid (x1) and N(0, 1) (x2).
    """

    name, sigma2 = "manywell", 1.0

    def __init__(self, pairs: int = _mw.PAIRS):
        self.data = _mw.ManyWell(pairs)
        self.dim = self.data.dim

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return _mw.log_density(x)

    @property
    def log_z(self) -> float:
        return self.data.log_z_unnormalised()

    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return self.data.sample(n, generator, dtype=torch.float64, device=_gen_device(generator))


ENERGY_TARGETS: dict[str, type[EnergyTarget]] = {"gmm25": GMM25, "funnel": Funnel, "manywell": ManyWellEnergy}


def get_target(name: str) -> EnergyTarget:
    """The shipped target `name` (one of ENERGY_TARGETS)."""
    try:
        return ENERGY_TARGETS[name]()
    except KeyError:
        raise InputError(f"unknown energy target '{name}': choose one of {', '.join(ENERGY_TARGETS)}") from None
