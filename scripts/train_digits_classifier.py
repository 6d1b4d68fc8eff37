"""Train the digits benchmark's classifier p(c | x) and write `rtbcli/data/digits-classifier.safetensors`.

    python scripts/train_digits_classifier.py                 # seed 0, the shipped file
    python scripts/train_digits_classifier.py --out /tmp/c.safetensors --seed 1

An MLP 64 -> 128 -> 128 -> 10 (GELU) on images in the sampler's scaled space
(x = pixels * SCALE + SHIFT), trained on the TRAIN split only (`rtbcli.datasets.digits.split_indices`),
never on the held-out images that serve as reference samples of the fine-tuning target.

- Gaussian-noise augmentation: each training image gets noise of a standard deviation drawn
  uniformly from [0, NOISE_MAX] (labels kept), so that p(c | x) is smooth and meaningful on
  slightly noisy images, not only on the clean ones; AdamW with weight decay, cosine schedule.
- Calibration: a stratified CALIBRATION_FRACTION of the train split is held back from the fit;
  one temperature minimising the NLL of its clean images is fitted (NLL is convex in 1/T, so a
  golden-section search finds it) and folded into the last layer (logits / T).
- Deterministic: seeded generators for every draw, one thread, deterministic algorithms; the
  tensors' SHA-256 is in the metadata, so a rerun can be checked bit for bit.

The file's string metadata records provenance (script, seed, date, versions), the architecture,
the scaled space and split, accuracies, held-out NLL and ECE before and after calibration, and the
temperature. Needs scikit-learn (the images).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this repository's rtbcli, whatever is installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from rtbcli.datasets.digits import (  # noqa: E402
    HELDOUT_FRACTION,
    N_CLASSES,
    N_PIXELS,
    SCALE,
    SHIFT,
    SPLIT_SEED,
    load_digits_pixels,
    split_indices,
    to_scaled,
)
from rtbcli.rewards.digits import FORMAT  # noqa: E402
from rtbcli.runtime import atomic_path  # noqa: E402
from rtbcli.script_support import run_script  # noqa: E402

DEFAULT_OUT = ROOT / "rtbcli" / "data" / "digits-classifier.safetensors"
HIDDEN = (128, 128)
EPOCHS = 200
BATCH = 64
LR = 2e-3
WEIGHT_DECAY = 0.1
NOISE_MAX = 0.5  # noise std drawn uniformly from [0, NOISE_MAX], in the scaled space
CALIBRATION_FRACTION = 0.2  # of each class of the train split, held back to fit the temperature
ECE_BINS = 15
NOISE_CHECKS = (0.25, 0.5)  # held-out accuracy is also reported at these noise levels


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = (N_PIXELS, *HIDDEN, N_CLASSES)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def stratified_holdback(idx: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `idx` into (kept, held back): round(fraction * n_c) of each class held back."""
    g = torch.Generator().manual_seed(seed)
    kept, back = [], []
    for c in range(N_CLASSES):
        members = idx[labels[idx] == c]
        members = members[torch.randperm(len(members), generator=g)]
        k = round(len(members) * fraction)
        back.append(members[:k])
        kept.append(members[k:])
    return torch.cat(kept).sort().values, torch.cat(back).sort().values


def nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), y).item()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).double().mean().item()


def ece(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: equal-width confidence bins, |accuracy - confidence| weighted by bin size."""
    p = torch.softmax(logits.double(), -1)
    conf, pred = p.max(-1)
    correct = (pred == y).double()
    b = torch.clamp((conf * bins).ceil().long() - 1, 0, bins - 1)
    total = 0.0
    for i in range(bins):
        m = b == i
        if m.any():
            total += m.double().mean().item() * abs(correct[m].mean().item() - conf[m].mean().item())
    return total


def fit_inverse_temperature(logits: torch.Tensor, y: torch.Tensor, lo: float = 0.02, hi: float = 20.0) -> float:
    """argmin over beta = 1/T of NLL(beta * logits): convex in beta, found by golden-section search."""
    logits = logits.double()
    f = lambda beta: F.cross_entropy(beta * logits, y).item()  # noqa: E731
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(200):
        if b - a < 1e-10:
            break
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches, noise and calibration holdback")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import sklearn

    pixels, labels = load_digits_pixels()
    x_all = to_scaled(pixels).float()
    train_idx, held_idx = split_indices()
    fit_idx, cal_idx = stratified_holdback(train_idx, labels, CALIBRATION_FRACTION, args.seed + 1)
    x_fit, y_fit = x_all[fit_idx], labels[fit_idx]

    model = make_model(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(fit_idx) / BATCH)
    total = EPOCHS * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(fit_idx), generator=g)
        for i in range(steps_per_epoch):
            b = perm[i * BATCH : (i + 1) * BATCH]
            std = torch.rand(len(b), 1, generator=g) * NOISE_MAX
            x = x_fit[b] + std * torch.randn(len(b), N_PIXELS, generator=g)
            loss = F.cross_entropy(model(x), y_fit[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 50 == 0:
            print(f"epoch {epoch + 1}/{EPOCHS}  loss {loss.item():.4f}", flush=True)
    model.eval()

    with torch.no_grad():
        logits = {name: model(x_all[idx]) for name, idx in (("fit", fit_idx), ("cal", cal_idx), ("held", held_idx))}
        gn = torch.Generator().manual_seed(args.seed + 2)
        noisy_acc = {
            s: accuracy(model(x_all[held_idx] + s * torch.randn(len(held_idx), N_PIXELS, generator=gn)), labels[held_idx])
            for s in NOISE_CHECKS
        }
    y = {"fit": labels[fit_idx], "cal": labels[cal_idx], "held": labels[held_idx]}
    beta = fit_inverse_temperature(logits["cal"], y["cal"])
    temperature = 1.0 / beta

    tensors: dict[str, torch.Tensor] = {}
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears, start=1):
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        if i == len(linears):  # fold the temperature: logits / T
            w, b = w * beta, b * beta
        tensors[f"fc{i}.weight"], tensors[f"fc{i}.bias"] = w.contiguous(), b.contiguous()
    seconds = time.perf_counter() - start

    r6 = lambda v: round(float(v), 6)  # noqa: E731
    results = {
        "train_accuracy": r6(accuracy(logits["fit"], y["fit"])),
        "calibration_accuracy": r6(accuracy(logits["cal"], y["cal"])),
        "heldout_accuracy": r6(accuracy(logits["held"], y["held"])),
        "heldout_nll_uncalibrated": r6(nll(logits["held"], y["held"])),
        "heldout_nll": r6(nll(beta * logits["held"], y["held"])),
        "heldout_ece_uncalibrated": r6(ece(logits["held"], y["held"])),
        "heldout_ece": r6(ece(beta * logits["held"], y["held"])),
        "calibration_nll_uncalibrated": r6(nll(logits["cal"], y["cal"])),
        "calibration_nll": r6(nll(beta * logits["cal"], y["cal"])),
        "temperature": r6(temperature),
        **{f"heldout_accuracy_noise_{s}": r6(a) for s, a in noisy_acc.items()},
    }
    meta = {
        "format": FORMAT,
        "format_version": "1",
        "script": "scripts/train_digits_classifier.py",
        "command": " ".join(["python", "scripts/train_digits_classifier.py", *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "sklearn_version": sklearn.__version__,
        "python_version": platform.python_version(),
        "architecture": {
            "type": "mlp",
            "sizes": [N_PIXELS, *HIDDEN, N_CLASSES],
            "activation": "gelu",
            "layers": [f"fc{i}" for i in range(1, len(linears) + 1)],
        },
        "input": "x = pixels * scale + shift (pixels 0..16), shape (B, 64), rows of the 8x8 image",
        "scale": SCALE,
        "shift": SHIFT,
        "split_seed": SPLIT_SEED,
        "heldout_fraction": HELDOUT_FRACTION,
        "heldout_indices_sha256": hashlib.sha256(held_idx.numpy().tobytes()).hexdigest(),
        "n_fit": len(fit_idx),
        "n_calibration": len(cal_idx),
        "n_heldout": len(held_idx),
        "training": {
            "epochs": EPOCHS,
            "batch": BATCH,
            "steps": total,
            "optimizer": "AdamW",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "schedule": "cosine",
            "noise_std": f"uniform(0, {NOISE_MAX})",
            "calibration_fraction": CALIBRATION_FRACTION,
            "threads": 1,
        },
        "calibration": "temperature scaling fitted on the clean calibration images (NLL); folded into fc"
        f"{len(linears)} (weights and bias divided by the temperature)",
        **results,
        "train_seconds": round(seconds, 2),
        "tensors_sha256": tensors_sha256(tensors),
    }
    meta_str = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        save_file(tensors, str(tmp), metadata=meta_str)

    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size:,} bytes) in {seconds:.1f} s")
    for k, v in results.items():
        print(f"  {k:32s} {v}")
    print(f"  tensors_sha256                   {meta['tensors_sha256']}")
    return {**results, "bytes": size, "seconds": seconds}


if __name__ == "__main__":
    sys.exit(run_script(main))
