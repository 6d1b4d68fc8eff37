"""The configuration schema: presets (tasks with their default budgets) and run options.

A preset is a TOML file; `Preset` validates it, rejecting unknown keys and wrong types with an
error that names the key and the file. Every field is documented where it is declared (the
docstring under it), and those docstrings are what `rtbcli presets init` writes as comments and
what the command line's help texts quote. Reading preset files (shipped ones by name, others by
path) is `rtbcli.presets_loader`'s job; this module only declares and validates.

Paths inside a preset (`prior_data.path`, a Python reward's file, `evaluate.reference`) are
relative to the preset file; they are resolved to absolute paths when the preset is validated
with the file's folder as `base_dir`, so a checkpoint's stored config names them unambiguously.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import InputError
from .objectives import DEFAULT_METHODS, METHODS
from .rewards import parse_reference

DATA_SUFFIXES = (".npy", ".csv", ".safetensors")
DATASETS = {"digits": (64, 0.125, -1.0), "manywell32": (32, 1.0, 0.0)}  # shipped datasets: dimension, standard scale and shift


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


PosFloat = Annotated[float, Field(gt=0), AfterValidator(_finite)]
NonNegFloat = Annotated[float, Field(ge=0), AfterValidator(_finite)]
FiniteFloat = Annotated[float, AfterValidator(_finite)]
PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
MatmulDtype = Literal["float32", "bfloat16"]  # `[pretrain]` and `[finetune] matmul_dtype`: the network products' input dtype


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, use_attribute_docstrings=True)


def resolve_path(value: str | None, info: ValidationInfo) -> str | None:
    """A path relative to the preset file (the validation context's `base_dir`) made absolute."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return str(p.resolve()) if (p.is_absolute() or base is not None) else value


# ----------------------------------------------------------------------------- prior data
class MixtureSpec(Strict):
    """An isotropic Gaussian mixture sum_k w_k N(mu_k, variance * I), known exactly."""

    means: list[list[float]] = Field(min_length=1)
    """One mean per component, all of dimension d."""
    variance: PosFloat
    """Per-coordinate variance shared by all components."""
    weights: list[PosFloat] | None = None
    """Unnormalised component weights; omitted means equal weights."""

    @model_validator(mode="after")
    def _shapes(self) -> MixtureSpec:
        dims = {len(m) for m in self.means}
        if len(dims) != 1 or 0 in dims:
            raise ValueError("all means must have the same, positive, dimension")
        if not all(math.isfinite(v) for m in self.means for v in m):
            raise ValueError("means must be finite")
        if self.weights is not None and len(self.weights) != len(self.means):
            raise ValueError(f"{len(self.weights)} weights for {len(self.means)} means")
        return self

    @property
    def dim(self) -> int:
        return len(self.means[0])

    @property
    def kind(self) -> str:
        return "mixture"


class DataFileSpec(Strict):
    """Prior data from a file: the rows of an (N, d) array, used in their own units."""

    path: str
    """.npy, .csv (numeric, an optional header line) or .safetensors (one 2-D tensor); relative to the preset file, or absolute."""
    dim: PosInt | None = None
    """The data's dimension d; filled in from the file when the preset is loaded (a mismatch is an error)."""
    sha256: str | None = None
    """The file's SHA-256; filled in when the preset is loaded, and compared when a prior is fine-tuned."""

    _path = field_validator("path")(resolve_path)

    @property
    def kind(self) -> str:
        return "file"


class DatasetSpec(Strict):
    """A dataset that ships with rtbcli, scaled to the sampler's range: x = raw * scale + shift."""

    dataset: Literal["digits", "manywell32"]
    """digits: scikit-learn's 8x8 digits (64-D, pixel values 0-16; needs `pip install "rtbcli[digits]"`); manywell32: exact ManyWell samples (32-D)."""
    split: Literal["train", "heldout", "all"] = "train"
    """digits: the images used (a fixed, stratified third is held out for evaluation)."""
    scale: PosFloat | None = None
    """Multiplies the raw values; omitted: the dataset's standard scaling (digits 0.125, manywell32 1)."""
    shift: FiniteFloat | None = None
    """Added after scaling; omitted: the dataset's standard shift (digits -1, manywell32 0)."""

    @property
    def dim(self) -> int:
        return DATASETS[self.dataset][0]

    @property
    def scaling(self) -> tuple[float, float]:
        """(scale, shift) with the dataset's standard values filled in."""
        _, scale, shift = DATASETS[self.dataset]
        return (scale if self.scale is None else self.scale, shift if self.shift is None else self.shift)

    @property
    def kind(self) -> str:
        return "dataset"


def _data_kind(v: Any) -> str | None:
    if isinstance(v, (MixtureSpec, DataFileSpec, DatasetSpec)):
        return v.kind
    if not isinstance(v, dict):
        return None
    kinds = [kind for kind, key in DATA_KEYS.items() if key in v]
    return kinds[0] if len(kinds) == 1 else "mixture"


DATA_KEYS = {"mixture": "means", "file": "path", "dataset": "dataset"}  # the key that names each kind of prior data


DataSpec = Annotated[
    Annotated[MixtureSpec, Tag("mixture")] | Annotated[DataFileSpec, Tag("file")] | Annotated[DatasetSpec, Tag("dataset")],
    Discriminator(_data_kind),
]


# ----------------------------------------------------------------------------- rewards
class MixtureRewardSpec(Strict):
    """A reward given by a Gaussian mixture q, through log r.

    - `mixture_ratio`: log r(x) = log q(x) - log p_data(x). At beta = 1 the target p_data * r is
      exactly q (the reference task's p_9 / p_25). Needs mixture prior data.
    - `mixture`: log r(x) = log q(x).
    """

    type: Literal["mixture_ratio", "mixture"]
    """mixture_ratio: log q - log p_data; mixture: log q."""
    mixture: MixtureSpec
    """The mixture q."""

    @property
    def dim(self) -> int:
        return self.mixture.dim


class PythonRewardSpec(Strict):
    """A reward from a Python function: log r(x) = function(x, **kwargs).

    The function takes a float tensor x of shape (B, d) on the run's device and returns log r(x),
    shape (B,); it is called without gradient.
    """

    type: Literal["python"]
    """python: call `function`."""
    function: str
    """'path/to/rewards.py:log_reward' (relative to the preset file) or 'my_package.rewards:log_reward' (an importable module)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the function (a [reward.kwargs] table)."""
    sha256: str | None = None
    """The reward file's SHA-256; filled in when the reward is loaded (a different file later is a warning)."""

    @field_validator("function")
    @classmethod
    def _function(cls, v: str, info: ValidationInfo) -> str:
        path, attr = parse_reference(v)  # the one parser of 'file.py:name' / 'module:name'
        return f"{resolve_path(path, info)}:{attr}" if path is not None else v

    @property
    def dim(self) -> None:
        return None


RewardSpec = Annotated[MixtureRewardSpec | PythonRewardSpec, Field(discriminator="type")]


# ----------------------------------------------------------------------------- energy mode
class TargetSpec(Strict):
    """Energy mode: sample pi(x) = exp(log_density(x)) / Z with no data (docs/maths.md#energy-mode).

    The prior is the drift-free Brownian sampler (terminal law N(0, sigma2 I), `sampler.sigma2`),
    the reward is derived, log r = log pi - log N(0, sigma2 I) at beta = 1, so a preset with a
    [target] has no [prior_data] and no [reward]. The function takes x of shape (B, d) and returns
    log pi(x), shape (B,), unnormalised; it is called with gradient where local search or the
    Langevin parametrisation need grad log pi.
    """

    log_density: str
    """'path/to/target.py:log_pi' (relative to the preset file), 'my_package.targets:log_pi', or a shipped target
    'rtbcli.energy.targets:gmm25' (also funnel, manywell), which brings its exact log Z and exact sampler."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the function (a [target.kwargs] table); for a shipped target, to its constructor."""
    dim: PosInt | None = None
    """The dimension d: a shipped target knows its own; a user's is given here (or --dim) or read from the function's `dim` attribute."""
    sha256: str | None = None
    """The target file's SHA-256; filled in when the target is loaded (a different file later is a warning)."""

    @field_validator("log_density")
    @classmethod
    def _function(cls, v: str, info: ValidationInfo) -> str:
        path, attr = parse_reference(v, "target")
        return f"{resolve_path(path, info)}:{attr}" if path is not None else v


# ----------------------------------------------------------------------------- sampler, budgets
class SamplerSpec(Strict):
    """The diffusion sampler: T Gaussian steps from x_0 = 0 (docs/maths.md#the-sampler)."""

    steps: PosInt = 100
    """T, the number of Gaussian steps; t_i = i / T, dt = 1 / T on the default grid (time_power)."""
    sigma2: PosFloat = 5.0
    """Per-step variance is sigma2 * dt (fixed, not learned); a drift-free sampler ends at N(0, sigma2 I)."""
    time_power: Annotated[float, Field(ge=1.0, le=4.0)] = 1.0
    """The time grid t_i = 1 - (1 - i / T)^time_power (1: uniform). Above 1 the steps shrink toward the end, and the last
    step's noise, sigma2 * T^-time_power, with them: for data thinner than sqrt(sigma2 / T) (docs/maths.md#the-sampler).
    rtbcli's MLP drift only (no network or model), with or without the Langevin parametrisation. In energy mode the Brownian
    prior takes the same grid (it still ends at N(0, sigma2 I) exactly)."""
    hidden: PosInt = 64
    """Width of the drift network."""
    time_features: PosInt = 64
    """Number of sin/cos time frequencies, k = linspace(0.1, 100)."""
    layers: PosInt = 2
    """Hidden Linear(hidden, hidden) + GELU blocks after the input sum."""
    network: str | None = None
    """Your own drift network instead of rtbcli's MLP (hidden, time_features and layers then unused): 'path/to/net.py:Class'
    (relative to the preset file) or 'package.module:Class', a torch.nn.Module built as Class(**network_kwargs) whose
    forward(x, t) takes x (B, d) and t (B,) in [0, 1] and returns the drift (B, d) (rtbcli.networks)."""
    network_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the network's constructor (a [sampler.network_kwargs] table)."""
    network_sha256: str | None = None
    """The network file's SHA-256; filled in when the network is first loaded (a different file later is a warning)."""

    model: str | None = None
    """A diffusers DDPM model instead of rtbcli's sampler: the folder diffusers' save_pretrained wrote (a UNet2DModel with its
    DDPMScheduler config, or a DDPMPipeline); set by `finetune --prior DIR` (rtbcli.lora)."""
    model_sha256: str | None = None
    """The model folder's SHA-256 (over its files); filled in when it is first loaded (a different folder later is an error)."""
    sampling_steps: PosInt | None = None
    """A diffusers model's sampling steps K (strided with diffusers' "leading" spacing); none: every training step."""
    eta: float | None = Field(default=None, gt=0, le=1)
    """A diffusers model's steps as DDIM's with this eta in (0, 1] (variance eta^2 beta~; 1 is the DDPM step exactly, smaller
    adds less noise per step: rtbcli.ddpm); none: DDPM ancestral steps of the scheduler's variance_type."""
    prior_tail_steps: Annotated[int, Field(ge=0)] = 0
    """A diffusers model's last sampling steps that keep the prior's epsilon (the policy's transitions are the prior's there):
    DDPM's last steps have variances near 1e-5, where changes the policy makes for the earlier steps cost KL for nothing."""
    lora_rank: PosInt | None = None
    """Train LoRA adapters of this rank on a diffusers model (peft) instead of all its weights; none: full fine-tuning."""
    lora_alpha: PosFloat | None = None
    """LoRA's alpha (the adapters' scale is alpha / rank); none: the rank."""
    lora_targets: list[str] | None = None
    """Names (suffixes) of the modules LoRA adapts; none: the convolutions and time-embedding projections (rtbcli.lora.DEFAULT_TARGETS)."""

    unet: dict[str, Any] | None = None
    """Pretrain a diffusers UNet2DModel built with these arguments (a [sampler.unet] table: sample_size, in_channels,
    block_out_channels, ...) with the DDPM epsilon loss instead of rtbcli's sampler: `pretrain` then writes a diffusers
    folder, which `finetune --prior DIR` takes (rtbcli.unet_pretrain)."""
    scheduler: dict[str, Any] = Field(default_factory=dict)
    """The UNet's DDPMScheduler arguments (a [sampler.scheduler] table: num_train_timesteps, beta_schedule, clip_sample, ...;
    the settings rtbcli.ddpm supports)."""

    _model = field_validator("model")(resolve_path)

    @model_validator(mode="after")
    def _one_network(self) -> SamplerSpec:
        if self.network is not None and self.model is not None:
            raise ValueError("give one of network (a drift network) and model (a diffusers DDPM model)")
        if self.network is not None and self.unet is not None:
            raise ValueError("give one of network (a drift network) and unet (a diffusers UNet2DModel to pretrain)")
        if (
            self.model is None
            and self.unet is None
            and (self.lora_rank is not None or self.sampling_steps is not None or self.eta is not None or self.prior_tail_steps)
        ):
            raise ValueError("lora_rank, sampling_steps, eta and prior_tail_steps apply to a diffusers model (finetune --prior DIR)")
        if self.scheduler and self.unet is None:
            raise ValueError("[sampler.scheduler] applies to a [sampler.unet]: add one, or remove the scheduler")
        if self.time_power != 1.0 and (self.model or self.unet):
            raise ValueError("time_power applies to rtbcli's bridge sampler (its own network or yours), not a diffusers model: remove it")
        return self

    @field_validator("network")
    @classmethod
    def _network(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        path, attr = parse_reference(v, "network")
        return f"{resolve_path(path, info)}:{attr}" if path is not None else v


LrSchedule = Literal["constant", "cosine", "wsd"]
"""constant; cosine to lr_final; or wsd: constant, then linear decay to lr_final (`trainer.learning_rate`)."""


class PretrainSpec(Strict):
    """Maximum-likelihood pretraining on bridge trajectories from the data (see `rtbcli.pretrain`)."""

    steps: PosInt = 10_000
    """Optimiser steps."""
    batch_size: PosInt = 500
    """Data points per step (the global batch over all processes; `pairs` draws batch_size * T triples: the same network work)."""
    lr: PosFloat = 5e-3
    """Adam learning rate (the peak of the schedule)."""
    lr_schedule: LrSchedule = "wsd"
    """constant; cosine to lr_final; or wsd: constant, then linear decay to lr_final."""
    decay_fraction: Fraction = 0.2
    """wsd: the last fraction of the run that decays."""
    lr_final: NonNegFloat = 1e-5
    """Last learning rate of the cosine and wsd schedules."""
    estimator: Literal["pairs", "trajectory"] = "pairs"
    """Gradient estimator of the same NLL: pairs (Rao-Blackwellised bridge marginals) or trajectory (the authors')."""
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """> 0: save an exponential moving average of the weights with this decay."""
    box_weight: NonNegFloat = 0.0
    """> 0: add this times the box term, which pulls the drift's implied endpoint x + (1 - t) f back into the data's
    bounding box at states 3x wider than the bridge's, where the data never go (exact drift: no penalty)."""
    matmul_dtype: MatmulDtype = "float32"
    """bfloat16: the estimator's network products over the step's states (the hidden and output layers, forward and
    backward) take bfloat16 inputs (torch.autocast, float32 accumulation); the draws, the time features and state layer,
    the loss and Adam stay float32. Faster where bf16 products are native (AVX512-BF16/AMX CPUs, CUDA), slower where
    emulated (AVX2)."""


class FinetuneSpec(Strict):
    """Fine-tuning toward p_prior * r^beta (docs/maths.md#fine-tuning)."""

    steps: PosInt = 5_000
    """Optimiser steps."""
    batch_size: PosInt = 500
    """Trajectories per step (the global batch over all processes)."""
    lr: PosFloat = 1e-3
    """Adam learning rate of the policy."""
    lr_logz: PosFloat = 0.1
    """Adam learning rate of log Z (trust-pcl: V(s0) uses alpha times it)."""
    lr_schedule: LrSchedule = "constant"
    """constant; cosine to lr_final; or wsd: constant, then linear decay to lr_final (log Z's lr follows in proportion)."""
    decay_fraction: Fraction = 0.2
    """wsd: the last fraction of the run that decays."""
    lr_final: NonNegFloat = 0.0
    """Last policy learning rate of the cosine and wsd schedules."""
    grad_clip: PosFloat | None = None
    """Clip the policy gradient's norm (in RTB's units) to this before each Adam step; none by default."""
    exploration: NonNegFloat = 0.5
    """s_e: the behaviour policy adds s_e^2 to each step's variance (off-policy objectives)."""
    exploration_hold: Fraction = 0.1
    """s_e is held until this fraction of the run ..."""
    exploration_end: Fraction = 0.9
    """... then, after a step down, decays linearly to 0 at this fraction; the last step never explores."""
    snis: Literal["tempered", "exact"] = "tempered"
    """reinforce-kl importance weights: softmax of the log-ratio / T (tempered, the authors') or / 1 (exact)."""
    legacy_lambda: NonNegFloat = 1.0
    """legacy-rl: weight lambda of the squared log-ratio penalty (1.0 is the authors' tuned value)."""
    matmul_dtype: MatmulDtype = "float32"
    """bfloat16: the frozen prior's pass over all T*B transitions and the policy gradient's products take bfloat16 inputs
    (torch.autocast, float32 accumulation); sampling, residuals, rewards, the loss and Adam stay float32. Faster where
    bf16 products are native (AVX512-BF16/AMX CPUs, CUDA), slower where emulated (AVX2)."""
    exploration_end_step: PosInt | None = None
    """The paper's exploration schedule instead of the fractions above: s_e = exploration * max(0, 1 - step / this), 0 from
    this step on (e.g. 5000 with exploration 0.1-0.2); none: the fractional schedule."""
    replay: bool = False
    """Replay buffer: every other step trains on buffer states' backward trajectories (the bridge on the sampler's grid; a
    DDPM's noising process) instead of a forward batch, as the paper's code alternates (rtb, trust-pcl, vargrad; rtbcli.offpolicy)."""
    buffer_size: PosInt = 600_000
    """The replay buffer keeps the last this-many terminal states (FIFO), drawn by rank of log r (energy mode: log pi)."""
    buffer_rank_k: PosFloat = 0.01
    """Rank prioritisation: P(rank i) is proportional to 1 / (k N + i) (smaller k: steeper)."""
    prior_every: Annotated[int, Field(ge=0)] = 0
    """Every this-many steps (those with step % k == k - 1), the batch is drawn from the frozen prior instead of the policy:
    an off-policy behaviour that covers the whole target p_prior r^beta, where on-policy steps narrow onto part of it
    (rtb, trust-pcl, vargrad; one process; not with replay; rtbcli.offpolicy); 0: never."""
    prior_resample: PosInt = 1
    """A prior step draws this many times B prior trajectories and keeps B of them, drawn with replacement in proportion
    to r^beta (importance resampling: an approximate sample of the target itself); 1: the prior's B trajectories as drawn."""
    local_search: bool = False
    """Local search (energy mode, with replay): MALA toward pi on buffer states every ls_every steps; replayed states
    then come from the local-search buffer."""
    ls_every: PosInt = 100
    """Local search runs at the replay steps with step % ls_every < 2 (the paper's ls_cycle)."""
    ls_steps: PosInt = 200
    """MALA iterations per local search ..."""
    ls_burn_in: Annotated[int, Field(ge=0)] = 100
    """... of which the first this-many are burn-in; the later states go into the local-search buffer."""
    ls_step_size: PosFloat = 0.1
    """MALA's initial step size, adapted toward acceptance 0.574."""
    langevin: bool = False
    """Langevin parametrisation: drift = NN1(x, t) + NN2(t) clip(grad log r(x)) (energy mode: grad log pi)."""
    eval_every: Annotated[int, Field(ge=0)] = 0
    """Every this-many steps (and at the last), log the policy's metrics on [evaluate] n on-policy samples, beside the
    training wall time so far (evaluations excluded): the time to reach a number. Energy mode: Table 1's (elbo,
    log_z_rw, with an exact log Z delta_log_z and delta_log_z_rw, with exact samples eubo and w2); data mode: log_r_mean
    and, where the target has exact mode masses (the reference task, mixture data), kl_mode, off_target, mode_coverage
    (and kl_hist in 2-D). 0: never."""

    @model_validator(mode="after")
    def _order(self) -> FinetuneSpec:
        if self.exploration_end < self.exploration_hold:
            raise ValueError("exploration_end must not come before exploration_hold")
        if self.ls_burn_in >= self.ls_steps:
            raise ValueError(f"ls_burn_in ({self.ls_burn_in}) must be below ls_steps ({self.ls_steps})")
        return self


class EvalSpec(Strict):
    """Metric settings (docs/maths.md#metrics)."""

    n: PosInt = 20_000
    """Samples per evaluation."""
    cell_radius: PosFloat | None = None
    """Mode cells: a sample within this radius of its nearest prior mean is in that cell; omitted: the radius that holds
    the mass of a component that radius 1.5 holds in 2-D at variance 0.3 (97.65%), in any dimension."""
    hist_half_width: PosFloat = 13.0
    """Histogram over [-w, w]^2 (2-D tasks only) ..."""
    hist_bin: PosFloat = 0.5
    """... in square bins of this width, plus one outside cell."""
    reference: str | None = None
    """Reference samples of the fine-tuning target p_data r^beta (a data file) for the sliced-W2 and MMD comparisons of
    finetuned checkpoints (a prior is compared with its own data); relative to the preset file."""

    _reference = field_validator("reference")(resolve_path)


class ReproduceSpec(Strict):
    """What `rtbcli reproduce` runs for this task (the full run uses the finetune and evaluate budgets)."""

    methods: list[Literal[tuple(METHODS)]] = Field(default_factory=lambda: list(DEFAULT_METHODS))  # type: ignore[valid-type]
    """The methods compared, each fine-tuned from the same prior and seed."""
    shipped_prior: str | None = None
    """A prior in rtbcli/data, made by `rtbcli pretrain` with this preset: --quick starts from it."""
    quick_steps: PosInt = 1_000
    """--quick: fine-tuning steps per method."""
    quick_batch_size: PosInt = 200
    """--quick: trajectories per step."""
    quick_lr: PosFloat | None = 3e-3
    """--quick: the policy's learning rate (omitted: the finetune section's)."""
    quick_n: PosInt = 10_000
    """--quick: samples per evaluation."""
    lora_rank: PosInt | None = None
    """A diffusers-model preset: each method is fine-tuned twice, every weight and LoRA adapters of this rank (none: full only)."""
    lora_lr: PosFloat | None = None
    """The LoRA rows' learning rate (adapters start at zero and move slowly at full fine-tuning's); none: the full rows'."""


# ----------------------------------------------------------------------------- the preset
class Preset(Strict):
    """A task (prior data, reward, beta) with the sampler and the default budgets for it."""

    name: str
    """A short name for the task."""
    description: str = ""
    """One line on what the task is."""
    beta: PosFloat = 1.0
    """Inverse temperature: the target is p_prior * r^beta."""
    prior_data: DataSpec | None = None
    """The data the prior is pretrained on: a mixture (means, variance, weights), a data file (path) or a shipped dataset."""
    target: TargetSpec | None = None
    """Energy mode, instead of [prior_data]: the log-density to sample, from the Brownian prior with no data."""
    reward: RewardSpec | None = None
    """The reward r(x) > 0, through log r; needed to fine-tune (derived from the target in energy mode)."""
    sampler: SamplerSpec = SamplerSpec()
    pretrain: PretrainSpec = PretrainSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    evaluate: EvalSpec = EvalSpec()
    reproduce: ReproduceSpec = ReproduceSpec()

    @field_validator("prior_data", mode="before")
    @classmethod
    def _one_kind(cls, v: Any) -> Any:
        if isinstance(v, dict):
            keys = [f"'{key}'" for key in DATA_KEYS.values() if key in v]
            if len(keys) > 1:
                raise ValueError(f"it has both {' and '.join(keys)}: give one kind of data (a mixture, a data file or a shipped dataset)")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _data_or_target(cls, data: Any, handler: Any) -> Any:
        """A preset without [target] needs [prior_data]: reported as that missing key, beside any other problem."""
        if not (isinstance(data, dict) and "prior_data" not in data and "target" not in data):
            return handler(data)
        missing = {"type": "missing", "loc": ("prior_data",), "input": data}
        try:
            handler(data)
        except ValidationError as e:
            details = [{k: err[k] for k in ("type", "loc", "input", "ctx") if k in err} for err in e.errors()]
            raise ValidationError.from_exception_data(e.title, [*details, missing]) from None  # type: ignore[list-item]
        raise ValidationError.from_exception_data(cls.__name__, [missing])  # type: ignore[list-item]

    @model_validator(mode="after")
    def _energy(self) -> Preset:
        if self.target is None:
            return self
        if self.prior_data is not None:
            raise ValueError(
                "a preset with [target] samples it from the Brownian prior with no data: remove [prior_data] "
                "(or remove [target] to fine-tune a pretrained prior)"
            )
        if self.reward is not None:
            raise ValueError("a preset with [target] derives its reward (log r = log pi - log N(0, sigma2 I)): remove [reward]")
        if self.beta != 1.0:
            raise ValueError(f"a preset with [target] samples pi itself, at beta = 1 (got beta = {self.beta:g}): remove beta")
        return self

    @property
    def energy(self) -> bool:
        """Energy mode: a [target] sampled from the Brownian prior, no prior data."""
        return self.target is not None

    @model_validator(mode="after")
    def _dims(self) -> Preset:
        if self.prior_data is None:
            return self
        rd, dd = (self.reward.dim if self.reward is not None else None), self.prior_data.dim
        if rd is not None and dd is not None and rd != dd:
            raise ValueError(f"reward.mixture has dimension {rd}, prior_data has {dd}")
        if (
            isinstance(self.reward, MixtureRewardSpec)
            and self.reward.type == "mixture_ratio"
            and not isinstance(self.prior_data, MixtureSpec)
        ):
            raise ValueError(
                "a 'mixture_ratio' reward divides by the data density, which needs mixture prior_data: use type = 'mixture' or 'python'"
            )
        return self

    @property
    def dim(self) -> int:
        if self.target is not None:
            if self.target.dim is None:
                raise InputError(f"preset '{self.name}': the dimension of its target is not known: give dim = D in [target] (or --dim D)")
            return self.target.dim
        assert self.prior_data is not None  # a preset has one of prior_data and target (`_energy`)
        if self.prior_data.dim is None:
            raise InputError(
                f"preset '{self.name}': the dimension of its data file is not known yet (load the preset with rtbcli.presets_loader.load_preset)"
            )
        return self.prior_data.dim

    def updated(self, section: str, **changes: Any) -> Preset:
        """A copy with some fields of one section replaced (None values are ignored), validated."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        data = self.model_dump()
        if section:
            data[section] = {**data[section], **changes}
        else:
            data.update(changes)
        return Preset.model_validate(data)


TAGS = {"mixture", "file", "dataset", "python", "mixture_ratio"}


def describe_validation_error(err: ValidationError, where: str) -> str:
    """One line naming the worst bad key of a pydantic error (and how many more there are).

    An unknown key comes first (it is usually a typo, and explains a "missing" one), then a
    wrong value, then a missing key. Union tags (which kind of data or reward) are left out of
    the key's name.
    """
    rank = {"extra_forbidden": 0, "missing": 2}
    errors = err.errors()
    first = min(errors, key=lambda e: rank.get(e["type"], 1))
    loc = [str(p) for i, p in enumerate(first["loc"]) if not (p in TAGS and i > 0 and first["loc"][i - 1] in ("prior_data", "reward"))]
    key = ".".join(loc) or "(top level)"
    if not loc and first["type"] == "value_error":
        return f"{where}: {first['msg'].replace('Value error, ', '')}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
    if first["type"] == "extra_forbidden":
        what = f"unknown key '{key}'"
    elif first["type"] == "missing":
        what = f"missing key '{key}'" + (" (or give [target], a log-density to sample with no data)" if key == "prior_data" else "")
    else:
        what = f"bad value for '{key}': {first['msg'].replace('Value error, ', '')}"
    more = len(errors) - 1
    return f"{where}: {what}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def option_error(err: ValidationError, names: dict[str, str] | None = None) -> InputError:
    """A command-line option's bad value (pydantic's first error) as one line naming the option: '--lora-alpha ...';
    `names` maps a field to its option where they differ ({"log_density": "--target"})."""
    first = err.errors()[0]
    field = str(first["loc"][-1]) if first["loc"] else ""
    opt = (names or {}).get(field) or ("--" + field.replace("_", "-") if field else "an option")
    msg = first["msg"].replace("Input should", "should").replace("Value error, ", "")
    return InputError(f"{opt} {msg} (got {first.get('input')!r})")


def preset_from_json(data: dict) -> Preset:
    """Rebuild the resolved preset stored in a checkpoint."""
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        raise InputError(
            describe_validation_error(e, "checkpoint config") + ": the checkpoint was written by an incompatible rtbcli"
        ) from None
