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

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class TrainingError(WpcrackError):
    """Training cannot go on (a NaN loss, a missing checkpoint)."""
