"""Energy mode: sampling an unnormalised density pi with no data (Sendera et al. 2024, Table 1).

Library pieces, each with its maths in its docstring and in docs/maths.md#energy-mode:

- `targets`: gmm25, funnel, manywell as log-densities with exact samplers and exact log Z;
- `prior`: the drift-free Brownian prior (terminal law N(0, sigma2 I)) and the derived reward
  log r = log pi - log N(0, sigma2 I), so that p_prior r = pi at beta = 1;
- `buffer`: a FIFO replay buffer sampled by rank, and the bridge backward process;
- `local_search`: MALA toward pi with the paper's step-size adaptation;
- `langevin`: the Langevin parametrisation of the drift;
- `metrics`: delta log Z, delta log Z^RW, EUBO and exact W2.
(VarGrad is `rtbcli.objectives.vargrad_loss`, registered as OBJECTIVES["vargrad"].)
"""

from .buffer import ReplayBuffer, backward_trajectories, rank_weights
from .langevin import LangevinDriftNet, LangevinSampler, LangevinScale, clipped_grad
from .local_search import MalaResult, mala
from .metrics import (
    delta_log_z,
    delta_log_z_rw,
    elbo,
    eubo,
    log_weights,
    log_z_rw,
    table_metrics,
    w2_exact,
)
from .prior import BrownianPrior, EnergyReward, energy_log_reward
from .targets import (
    ENERGY_TARGETS,
    GMM25,
    EnergyTarget,
    Funnel,
    ManyWellEnergy,
    get_target,
)

__all__ = [
    "ENERGY_TARGETS",
    "GMM25",
    "BrownianPrior",
    "EnergyReward",
    "EnergyTarget",
    "Funnel",
    "LangevinDriftNet",
    "LangevinSampler",
    "LangevinScale",
    "MalaResult",
    "ManyWellEnergy",
    "ReplayBuffer",
    "backward_trajectories",
    "clipped_grad",
    "delta_log_z",
    "delta_log_z_rw",
    "elbo",
    "energy_log_reward",
    "eubo",
    "get_target",
    "log_weights",
    "log_z_rw",
    "mala",
    "rank_weights",
    "table_metrics",
    "w2_exact",
]
