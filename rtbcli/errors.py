"""The kinds of failure the CLI distinguishes, and the exit code of each.

| code | meaning |
|---|---|
| 0 | success |
| 1 | a run failed after it started (a diverged loss, a reward that raised or returned NaN, a failed process) |
| 2 | bad input: a wrong option, a missing or foreign file, an invalid preset; nothing was written |
| 3 | `rtbcli evaluate --require`: the evaluation ran, and a required check failed |
| 130 | interrupted by SIGINT (Ctrl-C); a training run saved its last completed step first |
| 143 | terminated by SIGTERM; a training run saved its last completed step first |

`InputError` is bad input: the CLI prints its one-line message and exits with code 2. `RunError`
is a failure while running: exit code 1. Library users catch them like any exception.

Under torchrun every process runs the same command; an error that every process raises alike
(`every_rank`: bad input, a diverged loss, a stop on a signal, a lost peer) is reported by rank 0
alone, so that a job prints it once.
"""

from __future__ import annotations

EXIT_OK, EXIT_RUN, EXIT_INPUT, EXIT_REQUIRE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 130, 143


class RtbcliError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_RUN
    every_rank = False  # raised alike by every process of a job (see the module docstring)

    def __init__(self, message: str = "", *, every_rank: bool | None = None):
        super().__init__(message)
        if every_rank is not None:
            self.every_rank = every_rank


class InputError(RtbcliError, ValueError):
    """Bad input: the message names the problem and what to do about it."""

    exit_code = EXIT_INPUT
    every_rank = True  # every process reads the same command line and files


class RunError(RtbcliError, RuntimeError):
    """A run failed after it started (for example a non-finite loss)."""

    exit_code = EXIT_RUN


class PeerFailed(RunError):
    """Another process of a torchrun job failed or was killed, so a collective operation failed here."""

    every_rank = True


class Interrupted(RtbcliError):
    """A run stopped by a signal after saving its state; the exit code is 128 + the signal number."""

    every_rank = True  # the processes of a job agree on the stop before saving

    def __init__(self, message: str, exit_code: int = EXIT_SIGINT):
        super().__init__(message)
        self.exit_code = exit_code


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: raised from the signal handler wherever the run is, after which it
    saves nothing more. A KeyboardInterrupt, like Python's own Ctrl-C, so that no `except
    Exception` on the way (a reward's error handling, a file reader's) swallows it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RtbcliWarning(UserWarning):
    """Something a user should know that does not stop the command (printed as `rtbcli: warning: ...`)."""
