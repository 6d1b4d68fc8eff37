"""What the repository's scripts (benchmarks/, scripts/) share with the command line: bad input is one line.

    if __name__ == "__main__":
        sys.exit(run_script(main))

An rtbcli error (`InputError`: a checkpoint not found, an unknown device, ...) ends the script with one line
`SCRIPT: error: ...` and its exit code (2 for bad input) instead of a traceback; `at_least(n)` is an argparse type
for counts, so that `--rounds 0` is refused up front rather than failing later, and `ScriptParser` an argparse
parser whose errors are that one line too (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RtbcliError


def run_script(main: Callable[..., Any], *args: Any) -> int:
    """main(*args), its rtbcli errors as one line on stderr and their exit code; its own int result, else 0."""
    try:
        result = main(*args)
    except RtbcliError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return e.exit_code
    return result if isinstance(result, int) else 0


class ScriptParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line `SCRIPT: error: ... (see --help)` and exit 2, as the command line's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse
