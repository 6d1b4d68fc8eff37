"""Your own drift network: any `torch.nn.Module`, named like a Python reward (docs/networks.md).

A preset's `[sampler] network = "path/to/net.py:Class"` (or "package.module:Class"), with its
constructor's keyword arguments in `[sampler.network_kwargs]`, or `--network` on the command line,
replaces rtbcli's MLP (`DriftNet`) by `Class(**network_kwargs)`. The one contract:

    forward(x, t) -> drift,   x: (B, d) float,  t: (B,) float in [0, 1],  drift: (B, d)

where t = t_i is the time of the state x = x_i on the sampler's time grid (i / T, or 1 - (1 - i / T)^p with
`time_power` p), and the sampler's transitions are the pinned-bridge ones of `rtbcli.sampler`:
x_{i+1} = x_i + dt_i f(x_i, t_i) + sqrt(sigma2 dt_i) eps. A
network that returns zero is the Brownian motion; `NetworkSampler` checks the output's type and
shape on a probe batch before any run, and trains by autograd (DriftNet keeps its fused loop).

Safety: loading a checkpoint never imports code. A checkpoint records the class reference (as
first given, made absolute), its kwargs and the file's SHA-256 in its config; its tensors are the
network's `state_dict` under `policy.net.` (and `prior.net.`). `sample`, `evaluate`, `finetune` and
`--resume` take `--network file.py:Class` to name the class again (`attach_network`); it may be
another path (a moved file). A file whose SHA-256 differs from the recorded one is a warning, not
an error: an edited file that still loads the saved weights strictly is usually intended (a
comment, a faster forward); weights that do not fit the class are an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, RtbcliWarning, RunError
from .rewards import _first_line, import_function, parse_reference
from .sampler import DiffusionSampler

CONTRACT = "forward(x, t) with x (B, d) and t (B,) in [0, 1], returning the drift (B, d)"


@dataclass
class Network:
    """A user's network class, imported from its reference, and the SHA-256 of its file (None: unknown)."""

    reference: str
    cls: type[nn.Module]
    sha256: str | None = None

    def build(self, kwargs: dict[str, Any], dim: int, seed: int | None = None) -> nn.Module:
        """Class(**kwargs), its initial weights drawn from `seed` (torch's global generator left alone),
        checked on a probe batch: an InputError naming the fix when it cannot be built or breaks the contract."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                net = self.cls(**kwargs)
            except Exception as e:
                raise InputError(
                    f"network '{self.reference}' could not be built with network_kwargs {kwargs} "
                    f"({e.__class__.__name__}: {_first_line(e)}): fix [sampler.network_kwargs] or the class"
                ) from None
        if not isinstance(net, nn.Module):
            raise InputError(f"network '{self.reference}' built a {type(net).__name__}, not a torch.nn.Module: name a Module class")
        if next(iter(net.parameters()), None) is None:
            raise InputError(f"network '{self.reference}' has no parameters: nothing to train; give it some (nn.Linear, ...)")
        if not any(p.requires_grad for p in net.parameters()):
            raise InputError(f"network '{self.reference}' has no parameter that requires grad: nothing would train; leave them trainable")
        check_contract(net, dim, self.reference)
        return net


def parse_network(ref: str) -> tuple[str | None, str]:
    """(file path or None, class name) of 'file.py:Class' or 'package.module:Class'; InputError otherwise."""
    return parse_reference(ref, "network")


def load_network(ref: str) -> Network:
    """Import the class a reference names (this imports the user's code: only for a reference the user gave)."""
    obj, sha = import_function(ref, "network")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise InputError(f"network '{ref}' is a {type(obj).__name__}, not a torch.nn.Module class: name a class with {CONTRACT}")
    return Network(ref, obj, sha)


def _anchor(net: nn.Module) -> torch.Tensor:
    for t in net.parameters():
        return t
    raise InputError("the network has no parameters")  # `Network.build` refuses such a network first


@torch.enable_grad()  # the probe's output must carry a gradient to the parameters
def check_contract(net: nn.Module, dim: int, reference: str) -> None:
    """The network takes x (B, d), t (B,) and returns a floating-point tensor of shape (B, d) that depends on its
    parameters (a gradient reaches them): a one-line InputError otherwise (a network built for another dimension
    fails here, before any run; one whose output is detached or cast to integers would "train" without changing)."""
    w = _anchor(net)
    x = torch.linspace(-1.0, 1.0, 3 * dim, dtype=w.dtype, device=w.device).reshape(3, dim)
    t = torch.tensor([0.0, 0.5, 0.99], dtype=w.dtype, device=w.device)
    try:
        out = net(x, t)
    except Exception as e:
        raise InputError(
            f"network '{reference}' failed on x of shape (3, {dim}) and t of shape (3,) ({e.__class__.__name__}: {_first_line(e)}): "
            f"it needs {CONTRACT}, with d = {dim}, the data's dimension"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise InputError(f"network '{reference}' returned a {type(out).__name__}, not a tensor: it needs {CONTRACT}")
    if tuple(out.shape) != (3, dim):
        raise InputError(
            f"network '{reference}' returned shape {tuple(out.shape)} for x of shape (3, {dim}): return the drift, shape (B, d) = (3, {dim})"
        )
    if not out.is_floating_point():
        raise InputError(f"network '{reference}' returned a {out.dtype} tensor: return the drift as floating point")
    if not out.requires_grad:
        raise InputError(
            f"network '{reference}' returned a drift that no gradient leads back from (detached, or computed without its "
            "parameters): training would change nothing; return it from the parameters' computation"
        )


class NetworkSampler(DiffusionSampler):
    """A `DiffusionSampler` whose drift is a user's network (`self.net`, the module docstring's contract):
    the same transitions and scoring API (`sample`, `means`, `step_log_probs`, `log_prob`, `drift`), sampled
    with a plain loop and trained by autograd (`rtbcli.rollout` falls back to both for any such sampler)."""

    def __init__(self, dim: int, steps: int, sigma2: float, net: nn.Module, time_power: float = 1.0):
        nn.Module.__init__(self)
        self.dim, self.steps, self.sigma2, self.time_power = dim, steps, float(sigma2), float(time_power)
        self.net = net.eval()  # type: ignore[assignment]  # any Module with the contract, not a DriftNet
        # eval mode for good (nothing calls train()): the drift must be one function for sampling and scoring, so that
        # log-probabilities are exact; dropout is off and batch norm uses its running statistics

    @property
    def anchor(self) -> torch.Tensor:
        return _anchor(self.net)

    def time_table(self) -> torch.Tensor:
        """The step times t_0, ..., t_{T-1} of the grid, (T,): what the network takes instead of DriftNet's time embeddings."""
        return self.step_times()

    def _f(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RunError(f"the network returned {got} for x of shape {tuple(x.shape)}: it needs {CONTRACT}")
        return out

    def drift(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self._f(x, self.step_times().to(x.dtype)[i])

    def means(self, traj: torch.Tensor) -> torch.Tensor:
        """x_i + dt f(x_i, t_i) of all T*B transitions in one batched pass of the network: (T, B, d)."""
        x = traj[:-1]
        T, B, d = x.shape
        t = self.time_table().to(x.dtype).repeat_interleave(B)
        return x + self.dt * self._f(x.reshape(T * B, d), t).reshape(T, B, d)

    @torch.no_grad()
    def sample(self, n: int, extra_var: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n trajectories (T + 1, n, d): x_{i+1} = x_i + dt_i f(x_i, t_i) + sqrt(sigma2 dt_i + extra_var) eps_i,
        the noise drawn as `DiffusionSampler.run` draws it (the same generator stream)."""
        w = self.anchor
        traj = torch.empty(self.steps + 1, n, self.dim, dtype=w.dtype, device=w.device)
        traj[0].zero_()
        torch.randn(traj[1:].shape, generator=generator, dtype=w.dtype, device=w.device, out=traj[1:])
        traj[1:].mul_(self.noise_std(extra_var))
        times, dts = self.time_table(), self.host_dts()
        for i in range(self.steps):
            x = traj[i]
            traj[i + 1].add_(x).add_(self._f(x, times[i].expand(n)), alpha=dts[i])
        return traj

    def run(self, *args, **kwargs):  # the fused loop assumes DriftNet
        raise NotImplementedError("NetworkSampler has no fused run(); use sample()")


def make_sampler(spec, dim: int, network: Network, seed: int | None = None) -> NetworkSampler:
    """The sampler of a `config.SamplerSpec` naming a network, with the loaded class."""
    return NetworkSampler(dim, spec.steps, spec.sigma2, network.build(spec.network_kwargs, dim, seed), spec.time_power)


def with_network(preset, ref: str | None, kwargs: dict | None = None):
    """The preset with `--network` (and `--network-arg`s) as its [sampler] network, for a new pretraining run;
    the reference is resolved against the working folder, the file's SHA-256 is filled in when it is loaded."""
    if ref is None and not kwargs:
        return preset
    from pydantic import ValidationError

    from .config import Preset, SamplerSpec, describe_validation_error

    if ref is None:
        if preset.sampler.network is None:
            raise InputError("--network-arg sets your network's keyword arguments: give --network file.py:Class too")
        ref = preset.sampler.network
    parse_network(ref)
    spec = SamplerSpec.model_validate({"network": ref}, context={"base_dir": Path.cwd()})
    same = preset.sampler.network == spec.network
    merged = {**(preset.sampler.network_kwargs if same else {}), **(kwargs or {})}
    data = preset.model_dump()
    data["sampler"] = {**data["sampler"], "network": spec.network, "network_kwargs": merged, "network_sha256": None}
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        raise InputError(describe_validation_error(e, f"--network {ref}")) from None


def network_of(preset) -> Network | None:
    """The network a preset names, imported (the preset, or the command line, names it: a checkpoint's never
    comes here, see `attach_network`); its recorded SHA-256 compared with the file's (a warning)."""
    spec = preset.sampler
    if spec.network is None:
        return None
    net = load_network(spec.network)
    _compare_sha(net, spec.network_sha256, spec.network)
    return net


def recorded(preset, network: Network | None):
    """The preset with the network file's SHA-256 filled in (where it has none yet)."""
    if network is None or preset.sampler.network_sha256 is not None or network.sha256 is None:
        return preset
    return preset.updated("sampler", network_sha256=network.sha256)


def _compare_sha(net: Network, sha: str | None, recorded_ref: str) -> None:
    if sha is not None and net.sha256 is not None and sha != net.sha256:
        warnings.warn(
            f"network '{net.reference}' is not the file the checkpoint was made with ('{recorded_ref}', SHA-256 {sha[:12]}...): "
            f"its class is used if the saved weights fit it",
            RtbcliWarning,
            stacklevel=3,
        )


def attach_network(ck, ref: str | None) -> None:
    """Give a loaded checkpoint its network class, named again with `--network` (a checkpoint never imports code).

    A checkpoint of rtbcli's own network with --network, or one of a user's class without it: a one-line InputError."""
    recorded_ref = ck.preset.sampler.network
    if recorded_ref is None:
        if ref is not None:
            raise InputError(f"checkpoint '{ck.path}' holds rtbcli's own drift network, not a class of yours: leave out --network")
        return
    if ref is None:
        raise InputError(
            f"checkpoint '{ck.path}' holds your network '{recorded_ref}', and loading a checkpoint never imports code: "
            f"name it again with --network {recorded_ref}"
        )
    path, _ = parse_network(ref)
    if path is not None:
        ref = f"{Path(path).expanduser().resolve()}:{ref.rsplit(':', 1)[1]}"
    net = load_network(ref)
    _compare_sha(net, ck.preset.sampler.network_sha256, recorded_ref)
    ck.network = net
