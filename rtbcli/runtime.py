"""Run plumbing shared by the commands: devices, seeds, atomic files, logs and progress."""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an input error."""
    name = name.lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"unknown device '{name}': use auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available: use --device cpu or auto")
    return torch.device(name)


_ALLOCATOR_TUNED: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (idempotent).

    Training allocates and frees many ~13 MB activations per step. By default glibc serves such
    blocks with fresh mappings, or trims the heap that held them, so every page is faulted in
    again on the next step: on a virtual machine that costs ~35 ms of a 100 ms fine-tuning step
    (`benchmarks/bench_steps.py`). Blocks under 32 MB then come from the heap, which is not
    trimmed. Linux with glibc only; elsewhere nothing changes. Returns whether it applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is None:
        _ALLOCATOR_TUNED = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3
                _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
            except (OSError, AttributeError):
                pass
    return _ALLOCATOR_TUNED


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on `device`; every random draw of a run goes through it."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def check_writable(path: Path, what: str = "output") -> Path:
    """Fail early (input error) when `path` cannot be created: missing folder, a directory, read-only."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} '{path}' is a directory: give a file name")
    if path.exists() and not path.is_file():  # a FIFO, a device: the rename would replace it with a plain file
        raise InputError(f"{what} '{path}' exists and is not a regular file: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{what} folder '{parent}' does not exist: create it first or choose another path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} folder '{parent}' is not writable: choose another path")
    return path


def check_not_input(path: Path, inputs: dict[str, Path | None], what: str = "output") -> None:
    """Fail early (input error) when the output `path` is one of the command's input files (the same file, by any name)."""
    path = Path(path)
    if not path.exists():
        return
    for name, src in inputs.items():
        if src is not None and Path(src).exists() and os.path.samefile(path, src):
            raise InputError(f"{what} '{path}' is the {name} itself: choose another file name (an input is never changed)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A temporary name in the same folder, so that the final rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


_group: list[tuple[Path, Path]] | None = None  # (temporary, final) renames deferred to the end of an `atomic_group`


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically, else it is removed.

    Inside an `atomic_group` the rename waits for the group's end.
    """
    path = Path(path)
    tmp = temp_path(path)
    done = False
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it (some writers use 0600)
        if _group is not None:
            _group.append((tmp, path))
            done = True
        else:
            os.replace(tmp, path)
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


_STOP_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n)}


@contextmanager
def atomic_group() -> Iterator[None]:
    """The files written inside (by `atomic_path`) replace their targets together: all of them once the
    block has succeeded, or none. SIGINT/SIGTERM are held back during the renames alone (microseconds;
    delivered right after), so that a signal never leaves a checkpoint beside another step's state."""
    global _group
    outer, _group = _group, []
    mine = _group
    try:
        yield
        block = hasattr(signal, "pthread_sigmask")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if block else None
        try:
            while mine:
                tmp, path = mine[0]
                os.replace(tmp, path)
                mine.pop(0)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        for tmp, _ in mine:
            tmp.unlink(missing_ok=True)
        _group = outer


def write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Write a folder whole: `fill(tmp)` writes into a temporary folder beside `out`, which then takes its place (an
    older `out` is replaced only once the new one is complete; a failure leaves it as it was). The folder and its
    files get the permissions a plain mkdir/open would give them (mkdtemp's are private)."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    try:
        fill(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class JsonlLog:
    """Metrics, one JSON object per line, written as the run goes to `<name>.part`.

    `commit()` renames it to its final name once the run has succeeded, so a failed run never
    replaces the log of an earlier one (its partial log stays beside it for inspection).
    `preamble` lines (the records of the part of a run before it was resumed) come first;
    `snapshot(path)` writes everything so far to `path` atomically (beside a partial checkpoint).
    """

    def __init__(self, path: Path | None, preamble: list[str] | None = None):
        self.path = Path(path) if path is not None else None
        self.part = self.path.with_name(self.path.name + ".part") if self.path else None
        self.lines: list[str] = list(preamble or [])
        self._fh = open(self.part, "w", encoding="utf-8") if self.part else None
        if self._fh and self.lines:
            self._fh.write("".join(line + "\n" for line in self.lines))
            self._fh.flush()

    def write(self, **record) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self._fh:
            self._fh.write(line + "\n")
            self._fh.flush()

    def snapshot(self, path: Path | None) -> None:
        if path is not None:
            atomic_write_text(Path(path), "".join(line + "\n" for line in self.lines))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None

    def discard(self) -> None:
        """Close and remove the log in progress (a stopped run whose records `snapshot` kept)."""
        self.close()
        if self.part:
            self.part.unlink(missing_ok=True)

    def commit(self) -> None:
        self.close()
        if self.part:
            assert self.path is not None  # a log with a part file has a destination
            os.replace(self.part, self.path)


def stderr_console() -> Console:
    return Console(stderr=True)


def make_progress(console: Console | None = None, enabled: bool = True):
    """Progress of a run on stderr: a rich bar on a terminal, plain log lines otherwise.

    Both take `add_task(description, total=, rate=, status=)`, `advance(task)` and
    `update(task, rate=, status=)`, and are context managers.
    """
    console = console or stderr_console()
    if enabled and not console.is_terminal:
        return LineProgress(console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


class LineProgress:
    """Progress for logs (CI, batch jobs, pipes): a line at once, then one at least every
    `every` seconds and at each 10% of the run, and one at the end."""

    def __init__(self, console: Console, every: float = 5.0):
        self.console = console
        self.every = every
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        k = len(self.tasks)
        self.tasks[k] = {"description": description, "total": total, "done": completed, "next": 0.1, "last": -math.inf, **fields}
        self._print(k)
        return k

    def advance(self, task: int, n: int = 1) -> None:
        t = self.tasks[task]
        t["done"] += n
        if time.monotonic() - t["last"] >= self.every:
            self._print(task)

    def update(self, task: int, **fields) -> None:
        t = self.tasks[task]
        t.update(fields)
        frac = t["done"] / max(t["total"], 1)
        if frac + 1e-12 >= t["next"] or t["done"] >= t["total"]:
            t["next"] = (int(frac * 10 + 1e-9) + 1) / 10
            self._print(task)

    def _print(self, task: int) -> None:
        t = self.tasks[task]
        t["last"] = time.monotonic()
        self.console.print(
            f"{t['description']} {t['done']}/{t['total']}  {t.get('rate', '')}  {t.get('status', '')}".rstrip(),
            markup=False,
            highlight=False,
        )


class Timer:
    """Wall time of this session (`elapsed`, for the step rate) and of the whole run (`total`: `before`, the time of
    the sessions a resumed run continues, plus this one's)."""

    def __init__(self, before: float = 0.0):
        self.start, self.before = time.perf_counter(), before

    @property
    def total(self) -> float:
        return self.before + self.elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
