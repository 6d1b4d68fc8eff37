"""Several processes, one run: torchrun with 2 CPU (gloo) processes takes the steps of one process,
rank 0 alone writes, and any failure (a killed process, an exception or a non-finite loss on one
rank, bad input) ends the whole job within seconds with one-line messages.

Each torchrun job costs seconds of start-up (three Python processes import torch), so the jobs
that fail are started together with the module and run beside the other tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import rtbcli.distributed
from rtbcli.checkpoint import load_checkpoint
from rtbcli.cli import run
from rtbcli.errors import InputError
from rtbcli.state import load_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun jobs: seconds of start-up each (the module's fixture starts four)
HELPER = Path(__file__).with_name("torchrun_commands.py")
ALGOS = ["rtb", "trust-pcl", "reinforce-kl"]
FAILING_REWARD = '''
import os
import time

calls = 0


def failing_now() -> bool:
    """True in the process of rank 1 from its 4th call on (the 1st is a check before the run); the
    first time, the wall-clock time is written to failed-at, from which the test times the job's end."""
    global calls
    calls += 1
    if int(os.environ.get("RANK", 0)) != 1 or calls <= 3:
        return False
    if not os.path.exists("failed-at"):
        with open("failed-at", "w") as f:
            f.write(repr(time.time()))
    return True


def log_reward(x):
    """Raises in the process of rank 1 from its 4th call on."""
    if failing_now():
        raise ValueError("no reward on rank 1")
    return -(x - 3.0).pow(2).sum(-1) / 20


def nan_reward(x):
    """NaN in the process of rank 1 from its 4th call on."""
    out = -(x - 3.0).pow(2).sum(-1) / 20
    return out * float("nan") if failing_now() else out
'''


def torchrun(*args, cwd: Path) -> subprocess.Popen:
    """Start `python -m torch.distributed.run --nproc-per-node 2 ARGS` on a free port, one CPU thread per process."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NO_COLOR": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        *map(str, args),
    ]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Exit code of the whole job, and its stderr."""
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


class Watched:
    """A job whose end is recorded (wall clock) by a thread as it happens, so a test that looks at it
    later still knows when it ended."""

    def __init__(self, p: subprocess.Popen):
        self.code, self.err, self.ended = -1, "", float("nan")
        self.thread = threading.Thread(target=self._wait, args=(p,))
        self.thread.start()

    def _wait(self, p: subprocess.Popen) -> None:
        self.code, self.err = finish(p)
        self.ended = time.time()

    def result(self) -> tuple[int, str, float]:
        self.thread.join(timeout=150)
        return self.code, self.err, self.ended


def rtbcli_lines(err: str) -> list[str]:
    """What rtbcli itself printed on stderr (torchrun adds its own report, with a traceback of its own)."""
    return [line for line in err.splitlines() if line.startswith("rtbcli: ")]


def assert_no_rtbcli_traceback(err: str) -> None:
    assert f"{os.sep}rtbcli{os.sep}" not in err, err  # no frame of rtbcli's code in any traceback


def processes_of(pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes that torchrun (pid) started, from /proc."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:  # gone meanwhile
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(entry.name)
    return ranks


def kill_rank_1(job: subprocess.Popen, folder: Path, result: dict) -> None:
    """Once the run is under way (its first partial checkpoint is written), SIGKILL rank 1; then wait for the job."""
    deadline = time.monotonic() + 90
    while not (folder / "ft.partial.safetensors").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    result["ranks"] = ranks = processes_of(job.pid)
    if 1 in ranks:
        os.kill(ranks[1], signal.SIGKILL)
    else:  # something else went wrong: stop the job (torchrun passes SIGTERM on to its processes); the test fails
        job.terminate()
    result["killed"] = time.monotonic()
    result["code"], result["err"] = finish(job, timeout=120)
    result["ended"] = time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def failing_jobs(tmp_path_factory, tiny_prior):
    """The jobs that fail, started at once: a reward that raises on rank 1, one that returns NaN on
    rank 1, a batch size that 2 processes cannot share, and a long run whose rank 1 is killed (by a
    thread that watches it). Each test below waits for its own."""
    jobs = {}
    if Path("/proc/self/stat").exists():
        d = tmp_path_factory.mktemp("killed")
        p = torchrun(
            "-m",
            "rtbcli",
            "finetune",
            "--prior",
            tiny_prior,
            "--steps",
            "100000",
            "--save-every",
            "1",
            "--out",
            "ft.safetensors",
            "--quiet",
            "--device",
            "cpu",
            cwd=d,
        )
        result: dict = {}
        watcher = threading.Thread(target=kill_rank_1, args=(p, d, result))
        watcher.start()
        jobs["killed"] = (watcher, d, result)
    for name, args in (
        ("raises", ["--reward", "reward.py:log_reward", "--steps", "200"]),
        ("nan", ["--reward", "reward.py:nan_reward", "--steps", "200"]),
        ("batch", ["--batch-size", "7", "--steps", "5"]),
    ):
        d = tmp_path_factory.mktemp(f"fails-{name}")
        (d / "reward.py").write_text(FAILING_REWARD)
        (d / "ft.safetensors").write_bytes(Path(tiny_prior).read_bytes())  # an earlier result (a run replaces only a checkpoint)
        p = torchrun(
            "-m", "rtbcli", "finetune", "--prior", tiny_prior, *args, "--out", "ft.safetensors", "--quiet", "--device", "cpu", cwd=d
        )
        jobs[name] = (Watched(p), d, time.monotonic())
    yield jobs
    for job, _, _ in jobs.values():  # each ends by itself within seconds (the tests below check how)
        if isinstance(job, threading.Thread):
            job.join(timeout=150)
        else:
            job.result()


def test_two_processes_take_the_same_steps_as_one(tmp_path, tiny_preset_file, tiny_prior):
    """5 steps of pretrain and of each objective, global batch 16, same seed: the same parameters to
    1e-6 (float32), and rank 0 alone wrote the files, each once."""

    def commands(folder: Path) -> list[list[str]]:
        common = ["--steps", "5", "--batch-size", "16", "--seed", "3", "--quiet", "--json", "--device", "cpu"]
        cmds = [["pretrain", "--preset", str(tiny_preset_file), "--out", str(folder / "prior.safetensors"), *common]]
        return cmds + [
            ["finetune", "--prior", str(tiny_prior), "--algo", a, "--out", str(folder / f"{a}.safetensors"), *common] for a in ALGOS
        ]

    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    job = torchrun(HELPER, tmp_path / "writes", json.dumps(commands(tmp_path / "two")), cwd=tmp_path)
    assert [run(cmd) for cmd in commands(tmp_path / "one")] == [0, 0, 0, 0]  # meanwhile, in this process
    code, err = finish(job)
    assert code == 0, err

    names = ["prior"] + ALGOS
    expected = sorted(f"{n}{suffix}" for n in names for suffix in (".safetensors", ".state.safetensors", ".jsonl"))
    assert sorted(os.listdir(tmp_path / "two")) == expected  # no other file: no temporary, no partial, no log in progress
    writes = {r: json.loads((tmp_path / f"writes-rank{r}.json").read_text()) for r in (0, 1)}
    assert writes[1] == {"codes": [0, 0, 0, 0], "replaced": []}  # rank 1 wrote nothing
    assert sorted(Path(p).name for p in writes[0]["replaced"]) == expected  # rank 0 wrote each file once
    for n in names:
        one, two = load_file(tmp_path / "one" / f"{n}.safetensors"), load_file(tmp_path / "two" / f"{n}.safetensors")
        assert one.keys() == two.keys()
        worst = max((one[k].double() - two[k].double()).abs().max().item() for k in one)
        print(f"{n}: largest weight difference, 1 vs 2 processes: {worst:.1e}")  # README quotes these (pytest -s)
        assert worst <= 1e-6, (n, worst)
        if n in ALGOS:  # it trained
            assert not torch.equal(one["policy.net.body.5.weight"], load_file(tiny_prior)["policy.net.body.5.weight"])
        run_meta = json.loads(safe_open(str(tmp_path / "two" / f"{n}.safetensors"), "pt").metadata()["run"])
        assert run_meta["processes"] == 2
        # the logged metrics are the global batch's, not rank 0's share
        logs = [[json.loads(line) for line in (tmp_path / w / f"{n}.jsonl").read_text().splitlines()] for w in ("one", "two")]
        for a, b in zip(*logs, strict=True):
            for key in ("loss", "mean_log_r", "elbo"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (n, key)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_killed_process_ends_the_job_and_leaves_no_half_written_file(failing_jobs):
    """SIGKILL to rank 1 of a long run that saves every step: the job exits 1 within 30 s, and
    every file left is whole (the last partial checkpoint and its state, resumable)."""
    watcher, folder, result = failing_jobs["killed"]
    watcher.join(timeout=150)
    code, err = result["code"], result["err"]
    assert sorted(result["ranks"]) == [0, 1], err
    assert code == 1 and result["ended"] - result["killed"] < 30, err
    assert_no_rtbcli_traceback(err)
    lines = rtbcli_lines(err)
    assert len(lines) == 1 and "process 0 of 2 stopped: another process of the job failed or was killed" in lines[0], err
    left = sorted(os.listdir(folder))  # no temporary file; the last partial checkpoint and its state, whole and together
    assert left == ["ft.jsonl.part", "ft.partial.jsonl", "ft.partial.safetensors", "ft.partial.state.safetensors"], left
    ck = load_checkpoint(folder / "ft.partial.safetensors", expect_kind="finetuned")
    state = load_state(folder / "ft.partial.safetensors", "finetune")
    assert state.step == ck.step > 0 and state.meta["run_id"] == ck.meta["run_id"]


@pytest.mark.parametrize("name, cause", [("raises", "the reward '"), ("nan", "the reward returned NaN or inf by step 50")])
def test_a_failure_on_one_rank_ends_every_rank_with_one_line(name, cause, failing_jobs, tiny_prior):
    """The reward raises (or returns NaN) on rank 1 only: every process ends within seconds of the
    failure (timed from it, not from the job's start, whose imports take long under load), exit code 1."""
    job, d, _ = failing_jobs[name]
    code, err, ended = job.result()
    assert code == 1 and ended - float((d / "failed-at").read_text()) < 30, err
    assert_no_rtbcli_traceback(err)
    lines = rtbcli_lines(err)
    assert [line for line in lines if line.startswith("rtbcli: error: " + cause)], err
    if name == "raises":  # rank 1 names the cause; rank 0 says why it stopped too
        assert len(lines) == 2 and "raised ValueError: no reward on rank 1 by step 2 in process 1 of 2" in "".join(lines), err
        assert any("process 0 of 2 stopped: another process of the job failed or was killed" in line for line in lines), err
    else:  # the loss is global: every rank sees it, rank 0 reports it and keeps the last good state
        assert len(lines) == 1 and "the last good state (step 0) is in ft.last-good.safetensors" in lines[0], err
        assert load_checkpoint(d / "ft.last-good.safetensors").kind == "finetuned"
    assert (d / "ft.safetensors").read_bytes() == Path(tiny_prior).read_bytes()


def test_a_batch_that_the_processes_cannot_share_is_a_one_line_error(failing_jobs, tiny_prior):
    """--batch-size 7 with 2 processes: rank 0 prints one line and exits 2 (torchrun, as for any
    failed worker, exits 1 and names that exit code); nothing is written."""
    job, d, _ = failing_jobs["batch"]
    code, err, _ = job.result()
    assert code == 1, err
    assert rtbcli_lines(err) == [
        "rtbcli: error: --batch-size 7 is not divisible by the number of processes (2): use a multiple of 2, e.g. 8"
    ]
    assert "exitcode  : 2" in err  # torchrun's report: rank 0's own exit code
    assert sorted(os.listdir(d)) == ["ft.safetensors", "reward.py"] and (d / "ft.safetensors").read_bytes() == Path(tiny_prior).read_bytes()


def test_cuda_with_fewer_gpus_than_local_processes_is_bad_input(monkeypatch, tiny_prior, tmp_path, capsys):
    """Two processes on this machine asking for CUDA with one GPU (simulated: no GPU is needed)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="--device cuda with 2 processes on this machine but 1 GPU"):
        rtbcli.distributed.init(torch.device("cuda"))
    code = run(["finetune", "--prior", str(tiny_prior), "--device", "cuda", "--out", str(tmp_path / "ft.safetensors"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rtbcli: error: --device cuda with 2 processes"), err
    assert not torch.distributed.is_initialized() and os.listdir(tmp_path) == []


def test_the_batch_is_checked_before_the_processes_connect(monkeypatch, tiny_prior, tmp_path, capsys):
    """Every rank finds a batch it cannot share from torchrun's environment alone, before joining a
    process group (simulated: a group is never formed), so no rank leaves a group that another is
    still connecting to."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)

    def never(*args, **kwargs):
        raise AssertionError("the process group was formed before the batch was checked")

    monkeypatch.setattr(torch.distributed, "init_process_group", never)
    for cmd in (["finetune", "--prior", str(tiny_prior)], ["pretrain"]):
        code = run([*cmd, "--batch-size", "7", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.safetensors"), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [
            "rtbcli: error: --batch-size 7 is not divisible by the number of processes (2): use a multiple of 2, e.g. 8"
        ]
    assert os.listdir(tmp_path) == []
