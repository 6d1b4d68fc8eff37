"""Run several rtbcli commands in one torchrun job, for tests/test_distributed.py (not a test itself).

    python -m torch.distributed.run --nproc-per-node 2 tests/torchrun_commands.py WRITES COMMANDS_JSON

Each command goes through the command line's entry point (`rtbcli.cli.run`) in the same
processes; they share one process group, joined by the first command and left after the last
(the command line joins and leaves once per command, and starting torchrun once per command
would cost seconds each). Every file that a process puts in place (`os.replace`, the last step of
each atomic write and of a log's commit) is recorded in WRITES-rank<RANK>.json.
"""

import json
import os
import sys

import rtbcli.distributed
from rtbcli.cli import run


def main(writes: str, commands: str) -> int:
    replaced: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):
        replaced.append(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = recording_replace
    leave = rtbcli.distributed.shutdown
    rtbcli.distributed.shutdown = lambda dist: None  # one process group for all the commands
    codes = [run(cmd) for cmd in json.loads(commands)]
    leave(rtbcli.distributed.Dist(world=int(os.environ["WORLD_SIZE"])))
    os.replace = real_replace
    with open(f"{writes}-rank{os.environ['RANK']}.json", "w") as f:
        json.dump({"codes": codes, "replaced": replaced}, f)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
