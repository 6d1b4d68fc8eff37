"""The two kinds of failure the CLI distinguishes.

`InputError` is bad input (a wrong option, a missing or foreign file, an invalid preset): the
CLI prints its one-line message and exits with code 2. `RunError` is a failure while running
(a diverged loss): exit code 1. Library users catch them like any exception.
"""

from __future__ import annotations


class RtbcliError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(RtbcliError, ValueError):
    """Bad input: the message names the problem and what to do about it."""

    exit_code = 2


class RunError(RtbcliError, RuntimeError):
    """A run failed after it started (for example a non-finite loss)."""

    exit_code = 1
