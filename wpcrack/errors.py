"""User-facing errors: one line that names the file or value and the problem.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class WpcrackError(Exception):
    """A problem with the user's input, data or configuration (not a bug)."""


class ConfigError(WpcrackError):
    """params.yaml or a command-line override is wrong."""


class DataError(WpcrackError):
    """A dataset file is missing, unreadable or inconsistent."""

    def __init__(self, path: str | Path, problem: str | None = None):
        if problem is None:
            path, problem = _from_worker(str(path))
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _from_worker(message: str) -> tuple[str, str]:
    """(path, problem) of a DataError re-raised by a DataLoader worker.

    torch re-raises a worker's exception as ``type(message)`` where the message ends with the
    original traceback's last line (``wpcrack.errors.DataError: <path>: <problem>``); without this
    the CLI would get a ``RuntimeError`` and print a traceback instead of the one-line error.
    """
    last = next((line for line in reversed(message.splitlines()) if line.strip()), message)
    last = last.split("DataError: ", 1)[-1]
    path, sep, problem = last.partition(": ")
    return (path, problem) if sep else ("<data>", last)


class TrainingError(WpcrackError):
    """Training cannot go on (a NaN loss, a missing checkpoint)."""
