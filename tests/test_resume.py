"""Never lose a run: stop (a signal at a fixed step, or at a random moment) and --resume ends
bit-identical to the run left alone; a second signal stops at once; bad resumes are one-line errors.

Bit-identity holds on one CPU thread (`one_thread`; the subprocesses get OMP_NUM_THREADS=1).
Runs go through the command line's entry point (`rtbcli.cli.run`) in this process, except the
random-moment ones, which are real processes sent a real SIGINT.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rtbcli.pretrain
import rtbcli.state
from conftest import to_toml
from rtbcli.cli import run

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"pretrain": 150}  # planned steps of each run here (logs every 100 steps), and of fine-tuning (every 50)
N = 80
K = {"pretrain": 103, "finetune": 53}  # the fixed stops: after the first record of the log
TIMING = {"steps_per_s", "seconds"}  # the only log fields that may differ between the two runs

REWARD = '''
import os, signal, time

calls = 0


def log_reward(x):
    """A smooth reward that, at its call number STOP_AT (0: never), sends this process STOP_SIGNALS,
    and takes at least REWARD_SLEEP_S seconds (which changes no number)."""
    global calls
    calls += 1
    time.sleep(float(os.environ.get("REWARD_SLEEP_S", "0")))
    if calls == int(os.environ.get("STOP_AT", "0")):
        for name in os.environ.get("STOP_SIGNALS", "SIGINT").split(","):
            os.kill(os.getpid(), getattr(signal, name))
    return -(x - 3.0).pow(2).sum(-1) / 20
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def no_stop(monkeypatch):
    monkeypatch.setenv("STOP_AT", "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_preset, tiny_prior):
    d = tmp_path_factory.mktemp("resume")
    (d / "reward.py").write_text(REWARD)
    (d / "tiny.toml").write_text(to_toml(tiny_preset.updated("pretrain", batch_size=8).model_dump()))
    return {"dir": d, "reward": f"{d / 'reward.py'}:log_reward", "preset": d / "tiny.toml", "prior": tiny_prior}


def command(files, what: str, out) -> list[str]:
    """The rtbcli command of a run of STEPS steps: `what` is pretrain or an objective."""
    if what == "pretrain":
        return [
            "pretrain",
            "--preset",
            str(files["preset"]),
            "--steps",
            str(STEPS[what]),
            "--seed",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ]
    return [
        "finetune",
        "--prior",
        str(files["prior"]),
        "--reward",
        files["reward"],
        "--algo",
        what,
        "--steps",
        str(N),
        "--batch-size",
        "8",
        "--seed",
        "5",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def left_alone(files):
    """The runs left alone, one per objective (and pretrain), made when first asked for."""
    made = {}

    def get(what: str) -> Path:
        if what not in made:
            out = files["dir"] / "ref" / f"{what}.safetensors"
            out.parent.mkdir(exist_ok=True)
            assert run(command(files, what, out)) == 0
            made[what] = out
        return made[what]

    return get


def assert_same_run(out: Path, ref: Path) -> None:
    """Every tensor of the checkpoint and of its resumable state is bit-identical; so is the log but for timings."""
    for suffix in (".safetensors", ".state.safetensors"):
        a = load_file(out.with_name(out.name.removesuffix(".safetensors") + suffix))
        b = load_file(ref.with_name(ref.name.removesuffix(".safetensors") + suffix))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, different
    logs = [[json.loads(line) for line in p.with_suffix(".jsonl").read_text().splitlines()] for p in (out, ref)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    for a, b in zip(*logs):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def stopped_message(err: str, sig: str, step: int, of: int = N) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rtbcli: error: {sig} at step {step} of {of}: saved to "), err
    return lines[0]


def resume_from_message(line: str) -> int:
    """Run the resume command that the stop message names (without the leading `rtbcli`)."""
    words = shlex.split(line.split("`")[1])
    assert words[:3] in (["rtbcli", "finetune", "--resume"], ["rtbcli", "pretrain", "--resume"])
    return run(words[1:] + ["--quiet"])


@pytest.mark.parametrize("algo, sig", [("rtb", "SIGINT"), ("trust-pcl", "SIGTERM"), ("reinforce-kl", "SIGINT"), ("legacy-rl", "SIGINT")])
def test_finetune_stopped_at_a_fixed_step_and_resumed_is_the_same_run(algo, sig, files, left_alone, tmp_path, monkeypatch, capsys):
    """The reward signals the process during step K; the run saves step K and exits 128 + signal;
    the command its message names continues it, from another working folder, to the same end."""
    ref = left_alone(algo)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    monkeypatch.setenv("STOP_AT", str(K["finetune"] + 1))  # the reward is called once on prior samples before step 1
    monkeypatch.setenv("STOP_SIGNALS", sig)
    capsys.readouterr()
    assert run(command(files, algo, "x.safetensors")) == 128 + getattr(signal, sig)
    line = stopped_message(capsys.readouterr().err, sig, K["finetune"])
    assert f"--reward {files['reward']}" in line  # a checkpoint never imports its reward: the command names it
    assert sorted(os.listdir(".")) == ["x.partial.jsonl", "x.partial.safetensors", "x.partial.state.safetensors"]
    assert [json.loads(r)["step"] for r in Path("x.partial.jsonl").read_text().splitlines()] == [50]

    monkeypatch.setenv("STOP_AT", "0")
    monkeypatch.chdir(tmp_path)
    assert resume_from_message(line.replace("x.partial", "run/x.partial")) == 0
    assert sorted(os.listdir("run")) == ["x.jsonl", "x.safetensors", "x.state.safetensors"]  # the partial files are gone
    assert_same_run(tmp_path / "run" / "x.safetensors", ref)


def test_pretrain_stopped_at_a_fixed_step_and_resumed_is_the_same_run(files, left_alone, tmp_path, monkeypatch, capsys):
    ref = left_alone("pretrain")
    real = rtbcli.pretrain.train_step

    def signalling(run, dist):  # the step the loop calls
        if run.step == K["pretrain"] - 1:  # steps done: this is step K
            os.kill(os.getpid(), signal.SIGINT)
        return real(run, dist)

    monkeypatch.setattr(rtbcli.pretrain, "train_step", signalling)
    out = tmp_path / "p.safetensors"
    capsys.readouterr()
    assert run(command(files, "pretrain", out)) == 130
    line = stopped_message(capsys.readouterr().err, "SIGINT", K["pretrain"], STEPS["pretrain"])
    monkeypatch.setattr(rtbcli.pretrain, "train_step", real)
    assert resume_from_message(line) == 0
    assert_same_run(out, ref)


def test_a_resumed_run_extends_a_finished_one_and_a_warm_started_run_resumes(files, tmp_path, capsys):
    """--resume CKPT --steps NEW --out continues a finished run; a warm-started run's checkpoints
    count their steps on from its start, and its state still matches them."""
    first, warm, more = (tmp_path / f"{n}.safetensors" for n in ("first", "warm", "more"))
    cmd = command(files, "rtb", first)
    cmd[cmd.index("--steps") + 1] = "4"
    assert run(cmd) == 0
    assert (
        run(
            [
                "finetune",
                "--warm-start",
                str(first),
                "--reward",
                files["reward"],
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--out",
                str(warm),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        run(
            [
                "finetune",
                "--resume",
                str(warm),
                "--reward",
                files["reward"],
                "--steps",
                "5",
                "--out",
                str(more),
                "--quiet",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["resumed_at"] == 3
    meta = safe_open(str(more), "pt").metadata()
    assert meta["step"] == "9" and json.loads(meta["run"])["warm_started_from"] == str(first)
    # --steps is the new total of the run's own steps; the refusal says how its checkpoints count
    assert (
        run(["finetune", "--resume", str(warm), "--reward", files["reward"], "--steps", "3", "--out", str(tmp_path / "x.safetensors")]) == 2
    )
    assert "the run is at step 3 of its own (its checkpoints count on from the warm start's step 4: step 7)" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["rtb", "pretrain"])
def test_a_resumed_run_s_clock_counts_on(what, files, tmp_path, capsys):
    """The log's `seconds` (training time so far, what time-to-quality reads) continue across a resume: the state
    keeps the time to its step (it restarted at 0)."""
    first, more = tmp_path / "first.safetensors", tmp_path / "more.safetensors"
    cmd = command(files, what, first)
    cmd[cmd.index("--steps") + 1] = "12"
    assert run(cmd) == 0
    with safe_open(str(first.with_name("first.state.safetensors")), "pt") as f:
        saved = float(f.metadata()["seconds"])
    # one more step: a clock that restarted would read one step's time, under the twelve steps' before it
    resume = [what if what == "pretrain" else "finetune", "--resume", str(first), "--steps", "13", "--out", str(more), "--quiet"]
    assert run(resume + ([] if what == "pretrain" else ["--reward", files["reward"]])) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in more.with_suffix(".jsonl").read_text().splitlines()]
    before = [r["seconds"] for r in records if "loss" in r and r["step"] <= 12]
    after = [r["seconds"] for r in records if "loss" in r and r["step"] > 12]
    assert before and after and before[-1] <= saved < after[0], (before, saved, after)


def test_the_final_save_runs_under_the_stop_handlers(files, tmp_path, monkeypatch):
    """A SIGTERM while the finished run is being written used to meet the default handler: the process died without
    a word, leaving a temporary file. Now the loop's handlers are in place: a first signal there lets the run finish."""
    from rtbcli import checkpointer

    real, handlers = checkpointer.save_checkpoint, []

    def signalled(path, *a, **k):
        handler = signal.getsignal(signal.SIGTERM)
        handlers.append(handler)
        if Path(path).name == "done.safetensors":  # the finished run's save: a SIGTERM arrives now
            assert callable(handler), handler
            handler(signal.SIGTERM, None)
        return real(path, *a, **k)

    monkeypatch.setattr(checkpointer, "save_checkpoint", signalled)
    out = tmp_path / "done.safetensors"
    cmd = command(files, "rtb", out)
    cmd[cmd.index("--steps") + 1] = "3"
    assert run(cmd) == 0
    assert handlers and out.exists() and no_temp_files(tmp_path)


# --------------------------------------------------------------------------- a random moment, a real process
def stop_at_random(cmd: list[str], cwd: Path, rng: random.Random) -> dict:
    """Run `rtbcli CMD` in a process of its own; once its loop has started, wait a random moment (from `rng`) and send it SIGINT."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "STOP_AT": "0",
        "REWARD_SLEEP_S": "0.003",  # fine-tuning takes over 0.24 s
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    cmd = [c for c in cmd if c != "--quiet"]  # its progress says when the loop has started
    p = subprocess.Popen([sys.executable, "-m", "rtbcli", *cmd], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    first = p.stderr.readline()
    while first and " 0/" not in first:  # the progress line "<loop> 0/N" is printed once the signal handlers are in place
        first = p.stderr.readline()
    delay = rng.uniform(0.0, 0.12)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    return {"code": p.wait(), "delay": delay, "err": [line for line in rest.splitlines() if line.startswith("rtbcli: error: ")]}


RANDOM = ["pretrain", "rtb", "trust-pcl", "reinforce-kl", "legacy-rl"]  # pretrain and every objective, as for the fixed stops above


@pytest.fixture(scope="module")
def random_stops(files):
    """The interrupted runs, started together when the first test below asks (each watched by a
    thread of its own); each test waits for its own. The moments are random but seeded (a failure
    reruns with the same delays)."""
    jobs = {}
    for k, what in enumerate(RANDOM):
        folder = files["dir"] / f"random-{what}"
        folder.mkdir()
        result, rng = {}, random.Random(1000 + k)
        thread = threading.Thread(
            target=lambda r=result, w=what, f=folder, g=rng: r.update(stop_at_random(command(files, w, "x.safetensors"), f, g))
        )
        thread.start()
        jobs[what] = (thread, result, folder)
    yield jobs
    for thread, _, _ in jobs.values():
        thread.join(timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("what", RANDOM)
def test_sigint_at_a_random_moment_then_resume_is_the_same_run(what, random_stops, left_alone, monkeypatch):
    thread, result, folder = random_stops[what]
    thread.join(timeout=120)
    assert result["code"] == 130, result
    assert len(result["err"]) == 1 and " saved to x.partial.safetensors; continue with `rtbcli " in result["err"][0], result
    stopped = int(result["err"][0].split(" at step ")[1].split()[0])
    assert 0 < stopped < STEPS.get(what, N)
    state = load_file(folder / "x.partial.state.safetensors")  # loads: complete
    assert state and no_temp_files(folder)
    monkeypatch.chdir(folder)
    assert resume_from_message(result["err"][0].removeprefix("rtbcli: error: ")) == 0
    assert_same_run(folder / "x.safetensors", left_alone(what))


# --------------------------------------------------------------------------- a second signal
def test_a_second_signal_stops_at_once_even_inside_the_reward(files, tmp_path, monkeypatch, capsys):
    """Two SIGINTs during the reward call: the second stops the run there (not caught as the reward's own error)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STOP_AT", "5")
    monkeypatch.setenv("STOP_SIGNALS", "SIGINT,SIGINT")
    capsys.readouterr()
    assert run(command(files, "rtb", "x.safetensors")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rtbcli: error: stopped at once by a second SIGINT: nothing more was saved"]
    assert not [p for p in os.listdir(".") if p.endswith(".safetensors")] and no_temp_files(tmp_path)


def test_a_second_signal_while_saving_keeps_the_last_whole_save(files, tmp_path, monkeypatch, capsys, left_alone):
    """--save-every 2 saves step 2; the first SIGTERM stops the run at step 4, and a second one arrives while
    that step's state file is being written (after its checkpoint): nothing of step 4 is put in place, no
    temporary file is left, and step 2's checkpoint, state and log, still together, resume to the same run."""
    real, calls = rtbcli.state.save_file, {"n": 0}

    def save_then_signal(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        calls["n"] += 1
        if calls["n"] == 2:  # step 4's state, complete under its temporary name
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rtbcli.state, "save_file", save_then_signal)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STOP_AT", "5")  # the reward's 5th call (the 1st checks it before the run) is in step 4
    monkeypatch.setenv("STOP_SIGNALS", "SIGTERM")
    capsys.readouterr()
    assert run([*command(files, "rtb", "x.safetensors"), "--save-every", "2"]) == 143
    assert capsys.readouterr().err.strip() == "rtbcli: error: stopped at once by a second SIGTERM: nothing more was saved"
    assert calls["n"] == 2 and no_temp_files(tmp_path)
    assert sorted(os.listdir(".")) == ["x.jsonl.part", "x.partial.jsonl", "x.partial.safetensors", "x.partial.state.safetensors"]
    assert load_file("x.partial.safetensors") and rtbcli.state.load_state(Path("x.partial.safetensors"), "finetune").step == 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STOP_AT", "0")
    assert run(["finetune", "--resume", "x.partial.safetensors", "--reward", files["reward"], "--quiet"]) == 0
    assert_same_run(tmp_path / "x.safetensors", left_alone("rtb"))


# --------------------------------------------------------------------------- bad resumes
@pytest.fixture(scope="module")
def finished(files):
    """A finished 4-step rtb run, and its state file's tensors and metadata."""
    out = files["dir"] / "finished" / "done.safetensors"
    out.parent.mkdir()
    cmd = command(files, "rtb", out)
    cmd[cmd.index("--steps") + 1] = "4"
    assert run(cmd) == 0
    with safe_open(str(out.with_name("done.state.safetensors")), "pt") as f:
        return out, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def damaged_copy(finished, folder: Path, **meta) -> Path:
    """A copy of the finished run whose state's metadata is changed (a key set to None: removed; no changes: no state)."""
    out, tensors, metadata = finished
    copy = folder / "copy.safetensors"
    copy.write_bytes(out.read_bytes())
    if meta:
        new = {k: v for k, v in {**metadata, **meta}.items() if v is not None}
        save_file(tensors, str(folder / "copy.state.safetensors"), metadata=new)
    return copy


@pytest.mark.parametrize(
    "case, match",
    [
        ("no state", "has no resumable state beside it (copy.state.safetensors is missing)"),
        ("format version", "has format version 0, this rtbcli reads versions 1 and 2"),
        ("another objective", "is a rtb run: resume it with --algo rtb"),
        ("another preset", "--resume continues a run under its own preset, but the preset given differs ("),
        ("fewer steps", "the run is at step 4; --steps 3 would end it before that"),
        ("damaged config", "is damaged (ValidationError in its metadata): start a new run with --warm-start"),
        ("negative save-every", "--save-every must be 0 (off) or a positive number of steps (got -1)"),
    ],
)
def test_bad_resume_is_a_one_line_error_and_overwrites_nothing(case, match, files, finished, tmp_path, capsys):
    copy = damaged_copy(
        finished,
        tmp_path,
        **(
            {}
            if case == "no state"
            else {"format_version": "0"}
            if case == "format version"
            else {"config": "{}"}
            if case == "damaged config"
            else {"format_version": "1"}
        ),
    )
    out = tmp_path / "out.safetensors"
    earlier = finished[0].read_bytes()  # an earlier run's checkpoint, which a failed run leaves as it was
    out.write_bytes(earlier)
    args = ["finetune", "--resume", str(copy), "--reward", files["reward"], "--steps", "6", "--out", str(out), "--quiet"]
    args += {
        "another objective": ["--algo", "trust-pcl"],
        "another preset": ["--preset", str(files["preset"]), "--lr", "0.5"],
        "fewer steps": ["--steps", "3"],
        "negative save-every": ["--save-every", "-1"],
    }.get(case, [])
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtbcli: error: ") and match in err[0], err
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["copy.safetensors", "out.safetensors"] + ([] if case == "no state" else ["copy.state.safetensors"])
    )


def test_pretrain_resume_refuses_other_settings_and_finetuned_checkpoints(files, finished, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    cmd = command(files, "pretrain", out)
    cmd[cmd.index("--steps") + 1] = "3"
    assert run(cmd) == 0
    for args, match in (
        (["--batch-size", "16"], "only --steps (a new total) may be given"),
        (["--sigma2", "1"], "only --steps (a new total) may be given"),
        (["--preset", str(files["preset"])], "give one of --preset, --data and --resume"),
    ):
        capsys.readouterr()
        assert run(["pretrain", "--resume", str(out), "--steps", "5", "--out", str(tmp_path / "q.safetensors"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert run(["pretrain", "--resume", str(finished[0]), "--steps", "5", "--out", str(tmp_path / "q.safetensors")]) == 2
    assert "is a finetuned checkpoint, a prior one is needed here" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.safetensors", "p.state.safetensors"]


# --------------------------------------------------------------------------- extending a finished run
@pytest.mark.parametrize("algo", ["rtb", "reinforce-kl"])
def test_extending_a_finished_run_continues_the_schedules_at_their_final_values(files, tmp_path, algo):
    """A 6-step run with a cosine lr and exploration, finished, then extended to 10 (`--resume X
    --steps 10`): steps 1-6 of the log are the finished run's, steps 7-10 run at lr_final without
    exploration (the schedules keep the run's original length, 6), and the state still says 6."""
    from rtbcli.checkpoint import load_checkpoint
    from rtbcli.finetune import finetune
    from rtbcli.state import load_state

    lr, final = 1e-2, 1e-3
    preset = load_checkpoint(files["prior"]).preset.updated(
        "finetune", steps=6, batch_size=8, lr=lr, lr_schedule="cosine", lr_final=final, exploration=0.5
    )
    first, more = tmp_path / "first.safetensors", tmp_path / "more.safetensors"
    finetune(
        load_checkpoint(files["prior"]),
        preset,
        "tiny",
        algo,
        first,
        seed=1,
        progress=False,
        log_path=first.with_suffix(".jsonl"),
        log_every=1,
    )
    finetune(
        load_checkpoint(first),
        preset.updated("finetune", steps=10),
        "tiny",
        algo,
        more,
        progress=False,
        resume=True,
        log_path=more.with_suffix(".jsonl"),
        log_every=1,
    )
    logs = [[json.loads(line) for line in p.with_suffix(".jsonl").read_text().splitlines()] for p in (first, more)]
    assert [r["step"] for r in logs[1]] == list(range(1, 11)) and logs[1][:6] == logs[0]
    assert logs[0][1]["exploration"] > 0 and logs[0][1]["lr"] > 5 * final  # the schedules were on
    for r in logs[1][6:]:
        assert r["exploration"] == 0.0 and r["lr"] == pytest.approx(final, rel=1e-12), r
    state = load_state(more, "finetune")
    assert state.step == 10 and state.meta["schedule_steps"] == "6" and state.meta["planned_steps"] == "10"


# --------------------------------------------------------------------------- a reward that draws random numbers
RANDOM_REWARD = REWARD.replace("import os, signal, time", "import os, signal, time\nimport torch").replace(
    "    return -(x - 3.0).pow(2).sum(-1) / 20", "    return -(x - 3.0).pow(2).sum(-1) / 20 + 1e-3 * torch.rand(x.shape[:-1])"
)


def test_a_reward_drawing_from_torch_s_global_generator_resumes_exactly(files, tmp_path, monkeypatch, capsys):
    """log r = -|x - 3|^2 / 20 + 1e-3 torch.rand(B): stopped at a fixed step and resumed, the run ends
    bit-identical to the run left alone (the reward's generator is seeded per run and step)."""
    (tmp_path / "rand.py").write_text(RANDOM_REWARD)
    cmd = command({**files, "reward": f"{tmp_path / 'rand.py'}:log_reward"}, "rtb", "x.safetensors")
    cmd[cmd.index("--steps") + 1] = "12"
    for folder in ("alone", "stopped"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "alone")
    torch.rand(7)  # the caller's generator moves between the runs: no number may depend on it
    before = torch.get_rng_state()
    assert run(cmd) == 0
    assert torch.equal(torch.get_rng_state(), before)  # and the run leaves it where it was
    monkeypatch.chdir(tmp_path / "stopped")
    monkeypatch.setenv("STOP_AT", "6")  # the reward's 6th call is step 5's
    capsys.readouterr()
    assert run(cmd) == 130
    line = stopped_message(capsys.readouterr().err, "SIGINT", 5, 12)
    monkeypatch.setenv("STOP_AT", "0")
    torch.rand(3)
    assert resume_from_message(line) == 0
    assert_same_run(tmp_path / "stopped" / "x.safetensors", tmp_path / "alone" / "x.safetensors")
