"""Small helpers shared by tests: run the real `dslab` command, wait for things."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

DSLAB = [sys.executable, "-m", "dslab"]


def run_dslab(
    *args: str, env: dict[str, str], timeout_s: float = 90.0, check: bool = False,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `dslab ARGS...` as a real process and capture its output."""
    done = subprocess.run(
        [*DSLAB, *args], env=env, capture_output=True, text=True,
        timeout=timeout_s, check=False, cwd=cwd,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"dslab {' '.join(args)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def eventually(
    condition: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.05
) -> float:
    """Wait until ``condition()`` holds; return the seconds it took, or fail."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(poll_s)
    return time.monotonic() - began
