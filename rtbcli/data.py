"""Prior data: where pretraining draws x from, and what evaluation knows about it.

Three kinds, one interface (`dim`, `sample(n, generator, dtype, device)`, `to(device)`, and
`log_prob(x)` where the density is known, else None):

- `GaussianMixture`: an isotropic mixture given in the preset, known exactly;
- `EmpiricalData`: the rows of a data file (.npy, .csv, .safetensors) or of a shipped dataset;
  minibatches are drawn with replacement from the run's generator, so a seed fixes them;
- shipped datasets (`rtbcli.datasets`): the 8x8 digits (rows) and ManyWell-32 (exact).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from .config import DATA_SUFFIXES, DataFileSpec, DatasetSpec, MixtureSpec, Preset, describe_validation_error
from .datasets.digits import SCALE, SHIFT, load_digits_pixels, split_indices
from .datasets.manywell import ManyWell
from .errors import InputError, RtbcliWarning
from .gaussian import gaussian_log_prob
from .hashing import sha256_file


# ----------------------------------------------------------------------------- Gaussian mixtures
@dataclass(frozen=True)
class GaussianMixture:
    """sum_k w_k N(mu_k, variance * I) in R^d, with normalised weights."""

    means: torch.Tensor  # (K, d), float64
    weights: torch.Tensor  # (K,), sums to 1
    variance: float

    @classmethod
    def from_spec(cls, spec: MixtureSpec) -> GaussianMixture:
        means = torch.tensor(spec.means, dtype=torch.float64)
        w = torch.ones(len(spec.means), dtype=torch.float64) if spec.weights is None else torch.tensor(spec.weights, dtype=torch.float64)
        return cls(means, w / w.sum(), float(spec.variance))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def to(self, device) -> GaussianMixture:
        """The same mixture with its parameters on `device` (float64), so that evaluating it there
        copies nothing from the host."""
        return dataclasses.replace(self, means=self.means.to(device), weights=self.weights.to(device))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density at x (..., d), computed in x's dtype on x's device."""
        comp = gaussian_log_prob(x[..., None, :], self.means.to(x), self.variance)  # (..., K)
        return torch.logsumexp(comp + self.weights.to(x).log(), dim=-1)

    def grid_density(self, centres: torch.Tensor) -> torch.Tensor:
        """Density on the 2-D grid centres x centres, (n, n), by separability: A diag(w) B^T.

        Each isotropic component factorises over the two coordinates, so the whole grid costs
        one (n, K) x (K, n) matrix product instead of n^2 K exponentials.
        """
        if self.dim != 2:
            raise ValueError("grid_density is for 2-D mixtures")
        c = centres.to(torch.float64)[:, None]
        a = gaussian_log_prob(c[..., None], self.means[:, 0, None], self.variance).exp()  # (n, K)
        b = gaussian_log_prob(c[..., None], self.means[:, 1, None], self.variance).exp()
        return (a * self.weights) @ b.T

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """n exact samples, (n, d)."""
        g_device = generator.device if generator is not None else torch.device("cpu")
        k = torch.multinomial(self.weights.to(g_device), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=g_device)
        x = self.means.to(g_device)[k] + self.std * eps
        return x.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- rows of a data set
@dataclass(frozen=True)
class EmpiricalData:
    """The empirical distribution of N rows (N, d); no density."""

    rows: torch.Tensor  # (N, d), float64
    description: str
    log_prob = None  # the density of data rows is not known

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def to(self, device) -> EmpiricalData:
        return dataclasses.replace(self, rows=self.rows.to(device))

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """n rows drawn uniformly with replacement, (n, d)."""
        g_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, self.rows.shape[0], (n,), generator=generator, device=g_device)
        return self.rows.to(g_device)[idx].to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- data files
def _read(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" starts with a byte-order mark
            first = fh.readline()
        try:
            values = [float(v) for v in first.split(",") if v.strip()]
            skip = 0
        except ValueError:
            skip = 1  # a header line
        if skip == 0 and len(values) > 1 and values == list(range(len(values))):
            warnings.warn(
                f"data file '{path}': its first line {first.strip()} reads like pandas' column header (to_csv writes one); "
                "it is taken as a data row: write the file with header=False, or give the columns names",
                RtbcliWarning,
                stacklevel=2,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; the checks below name it
            return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64, encoding="utf-8-sig")
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"it holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}), not one")
    return next(iter(tensors.values()))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> tuple[torch.Tensor, str]:
    p = Path(path)
    try:
        arr = _read(p)
    except PermissionError:
        raise InputError(f"data file '{p}' cannot be read: permission denied") from None
    except (ValueError, OSError, UnicodeDecodeError, Exception) as e:  # numpy and safetensors raise many types
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise InputError(f"data file '{p}' cannot be read as {p.suffix} ({msg[:160]}): give a numeric (N, d) array") from None
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"data file '{p}' holds {arr.dtype} values: give real numbers")
    if arr.ndim != 2:
        hint = " (for 1-D data save x[:, None])" if arr.ndim == 1 else ""
        raise InputError(f"data file '{p}' holds an array of shape {tuple(arr.shape)}: give a 2-D (N, d) array, one row per point{hint}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise InputError(f"data file '{p}' has {arr.shape[0]} row(s) of dimension {arr.shape[1]}: give at least 2 rows")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise InputError(
            f"data file '{p}' has NaN or inf in {int(bad.sum())} of {arr.shape[0]} rows (first: row {int(np.argmax(bad))}): "
            f"remove or fix those rows"
        )
    big = (np.abs(arr) > np.finfo(np.float32).max).any(axis=1)
    if big.any():  # finite here, but inf in the float32 a run computes in
        raise InputError(
            f"data file '{p}' has values beyond float32's range (3.4e38) in {int(big.sum())} of {arr.shape[0]} rows "
            f"(first: row {int(np.argmax(big))}): rescale the data"
        )
    rows = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    return rows, sha256_file(p)


def load_array(path: str | Path) -> tuple[torch.Tensor, str]:
    """An (N, d) data file as float64 rows, and its SHA-256; every problem is an InputError."""
    p = Path(path)
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise InputError(f"data file '{p}' must end in {', '.join(DATA_SUFFIXES)}")
    if not p.exists():
        raise InputError(f"data file '{p}' not found: check the path (a preset's paths are relative to the preset file)")
    if p.is_dir():
        raise InputError(f"data file '{p}' is a directory: give a file")
    st = p.stat()
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def resolve_data(preset: Preset, label: str = "") -> Preset:
    """Read a preset's data file once: its dimension and SHA-256 become part of the preset.

    A dimension other than the one the preset declares is an input error; mixtures and shipped
    datasets are returned unchanged.
    """
    spec = preset.prior_data
    if not isinstance(spec, DataFileSpec):
        return preset
    rows, sha = load_array(spec.path)
    if spec.dim is not None and spec.dim != rows.shape[1]:
        raise InputError(
            f"data file '{spec.path}' has dimension {rows.shape[1]} but preset {label or preset.name} declares "
            f"prior_data.dim = {spec.dim}: fix the file or the preset"
        )
    if spec.sha256 is not None and spec.sha256 != sha:
        warnings.warn(
            f"data file '{spec.path}' has changed since it was recorded (SHA-256 {sha[:12]}... vs {spec.sha256[:12]}...)",
            RtbcliWarning,
            stacklevel=2,
        )
    try:
        return preset.updated("prior_data", dim=rows.shape[1], sha256=sha)
    except ValidationError as e:  # the reward's dimension disagrees with the file's
        raise InputError(describe_validation_error(e, f"preset {label or preset.name}") + f" (data file '{spec.path}')") from None


def data_preset(path: str | Path) -> Preset:
    """A preset for `rtbcli pretrain --data FILE`: the file's rows, default sampler settings, no reward."""
    p = Path(path)
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise InputError(f"--data '{p}' must end in {', '.join(DATA_SUFFIXES)}")
    preset = Preset(name=p.stem, description=f"data from {p.name}", prior_data=DataFileSpec(path=str(p.expanduser().resolve())))
    return resolve_data(preset, f"for --data {p}")


# ----------------------------------------------------------------------------- building a source
def data_source(spec) -> GaussianMixture | EmpiricalData:
    """The data distribution a preset's `prior_data` describes."""
    if isinstance(spec, MixtureSpec):
        return GaussianMixture.from_spec(spec)
    if isinstance(spec, DataFileSpec):
        rows, _ = load_array(spec.path)
        return EmpiricalData(rows, f"{rows.shape[0]:,} rows of {Path(spec.path).name}")
    if isinstance(spec, DatasetSpec):
        return dataset_source(spec)
    raise TypeError(f"unknown prior_data {spec!r}")


def dataset_source(spec: DatasetSpec):
    """A shipped dataset, scaled as the preset says."""
    scale, shift = spec.scaling
    if spec.dataset == "digits":
        if (scale, shift) != (SCALE, SHIFT):
            warnings.warn(
                f"digits scaled by {scale:g}, shifted by {shift:g}: the shipped classifier reward and the held-out reference "
                f"images use {SCALE:g} and {SHIFT:g}",
                RtbcliWarning,
                stacklevel=2,
            )
        pixels, _ = load_digits_pixels()
        train, held = split_indices()
        idx = {"train": train, "heldout": held, "all": torch.arange(pixels.shape[0])}[spec.split]
        rows = pixels[idx].double() * scale + shift
        return EmpiricalData(rows, f"{rows.shape[0]:,} digits images ({spec.split})")
    if spec.dataset == "manywell32":
        if (scale, shift) != (1.0, 0.0):
            raise InputError("manywell32 is used in its own units: leave prior_data.scale and shift out (or 1 and 0)")
        return ManyWell()
    raise InputError(f"unknown dataset '{spec.dataset}'")


def scale_advice(rows: torch.Tensor, sigma2: float) -> str | None:
    """A warning when the data are far from the sampler's scale, naming a fitting sigma2.

    A drift-free sampler ends at N(0, sigma2 I). The reference task (data of mean square 50 per
    coordinate about the start x_0 = 0, sigma2 = 5) trains well at ratio 10; ratios beyond 1000
    or below 0.1 leave the network to undo or supply almost all of the spread.
    """
    ms = float(rows.double().pow(2).mean())
    ratio = ms / sigma2
    if 0.1 <= ratio <= 1000:
        return None
    fit = ms / 10
    return (
        f"the data's mean square per coordinate is {ms:.3g}, {ratio:.3g} times sampler.sigma2 = {sigma2:g}: the sampler fits data "
        f"best near sigma2 = {fit:.3g} (set sampler.sigma2 in a preset); the data are used in their own units"
    )


def samples_for_check(source, n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """n data points (float64, CPU) for statistics and checks, from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(source, EmpiricalData) and source.rows.shape[0] <= n:
        return source.rows.cpu()
    return source.sample(n, g, dtype=torch.float64)
