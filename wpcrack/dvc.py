"""``dvc`` as a subprocess for the library and the flows: a failed command raises, never passes silently.

``run_dvc`` streams DVC's output and raises ``DvcFailed`` (with the output's tail) on a non-zero
exit: ``check=True`` semantics. Stage commands (``wpcrack ...``) resolve to this Python's
environment even when it is not activated.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_TAIL_LINES = 60


class DvcFailed(subprocess.CalledProcessError):
    """``dvc`` exited non-zero; ``str()`` shows the command and the end of its output."""

    def __str__(self) -> str:
        return f"`{' '.join(self.cmd)}` exited with {self.returncode}:\n{self.output}"


def dvc_executable() -> str:
    """``dvc`` from PATH, else the one beside this Python (a venv that is not activated)."""
    found = shutil.which("dvc")
    if found:
        return found
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess of this project's tools (``dvc``, ``wpcrack``, ``git``): this
    Python's environment first on PATH, DVC's analytics off, plus ``extra``."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def run_dvc(args: Sequence[str], cwd: str | Path = ".") -> str:
    """Run ``dvc <args>`` in ``cwd``, streaming its output; raise DvcFailed on a non-zero exit
    (``check=True`` semantics, keeping the output's tail for the error). Stage commands
    (``wpcrack ...``) resolve to this Python's environment even when it is not activated."""
    cmd = [dvc_executable(), *args]
    env = tool_env()
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    output = "".join(tail)
    if proc.returncode != 0:
        raise DvcFailed(proc.returncode, ["dvc", *args], output=output)
    return output
