"""Every `rtbcli` command in README.md's shell blocks runs as written, on tiny budgets.

The blocks are read from README.md itself, so a command that stops working (or one that never
did, like a `--resume ... --steps` smaller than the run it extends) fails here. Budgets are
scaled down by one rule: every step count is divided by SCALE (and the preset's default step
counts likewise where a command gives none), fresh runs use a batch of 16, and `evaluate` scores
400 samples. Commands that cannot run on a tiny budget or without another tool are listed in
SKIPPED with the test that covers them; any other command must run and exit 0.

The worked examples' blocks (moons, mixture10d: the ones that run a Python script first) are run
by tests/test_examples.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from rtbcli.cli import run

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCALE = 500
SKIPPED = {  # a command's first words -> why it is not run here, and what covers it
    "torchrun": "several processes: tests/test_distributed.py",
    "rtbcli reproduce": "its full and benchmark budgets: tests/test_cli.py and tests/test_reproduce_unet.py run reproduce on tiny presets",
    "rtbcli finetune --resume rtb.partial.safetensors": "needs a stopped run: tests/test_resume.py stops and resumes runs",
}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def shell_blocks(text: str) -> list[list[str]]:
    """The ```bash blocks of a Markdown text, each as its commands (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[" ".join(shlex.split(c, comments=True)) for c in b.replace("\\\n", " ").splitlines() if c.strip()] for b in blocks]


def defaults() -> dict[str, int]:
    preset = tomllib.loads((ROOT / "rtbcli" / "presets" / "reference.toml").read_text())
    return {"pretrain": preset["pretrain"]["steps"], "finetune": preset["finetune"]["steps"]}


def tiny(command: str, default_steps: dict[str, int]) -> list[str]:
    """The command's arguments with the budget rule of the module docstring applied."""
    words = shlex.split(command)[1:]
    sub = words[0]
    if sub in ("pretrain", "finetune"):
        if "--steps" in words:
            i = words.index("--steps") + 1
            words[i] = str(max(1, int(words[i]) // SCALE))
        else:
            words += ["--steps", str(default_steps[sub] // SCALE)]
        if "--resume" not in words:
            words += ["--batch-size", "16"]
        words += ["--quiet"]
    if sub == "evaluate" and "-n" not in words:
        words += ["-n", "400"]
    return words


def skipped(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = [
        b
        for b in shell_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
        if not any(c.split()[0] in ("pip", "python", "cd") for c in b)
    ]
    # the quick tour makes the checkpoints the other blocks continue from: it runs first
    blocks.sort(key=lambda b: not any(c.startswith("rtbcli presets init") for c in b))
    commands = [c for b in blocks for c in b]
    assert len(commands) >= 15, commands  # the tour, resuming and stopping
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # the files README's commands name
    monkeypatch.chdir(tmp_path)
    steps, ran, left_out = defaults(), [], []
    for command in commands:
        assert command.startswith(("rtbcli ", "torchrun ")), command
        if skipped(command):
            left_out.append(command)
            continue
        code = run(tiny(command, steps))
        out, err = capsys.readouterr()
        assert code == 0, f"`{command}` exited {code}: {err.strip()}"
        if "--json" in command:
            json.loads(out)
        ran.append(command)
    assert {skipped(c) for c in left_out} == set(SKIPPED.values()), "a SKIPPED entry matches no README command: remove it"
    assert any("--resume rtb.safetensors" in c for c in ran)  # extending a finished run
    for block in python_blocks((ROOT / "README.md").read_text(encoding="utf-8")):  # "From Python", on the checkpoints made above
        exec(compile(block.replace("n=20_000", "n=400"), "README.md", "exec"), {})


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)
