"""Errors that dslab reports to a person, each with the exit code it maps to.

Every error says what happened, the likely cause and the fix. Errors from
redis-py, aiohttp and subprocesses are translated into these at the boundary
where they happen; the CLI catches ``DslabError`` once, prints ``Error: ...``
and exits with ``exit_code``.

    DslabError                      (1)
    ├── CheckFailed                 (1) the run finished; a check or SLO failed
    ├── UsageError                  (2) the command line or an input is wrong
    │   └── UnknownNode             (2)
    ├── EnvironmentProblem          (3) this machine cannot do it
    │   ├── RedisNotFound           (3)
    │   ├── RedisTooOld             (3)
    │   ├── PortInUse               (3)
    │   └── LabError                (3) the lab is not in a state to do it
    │       ├── LabStateCorrupt     (3)
    │       ├── LabNotRunning       (3)
    │       ├── LabAlreadyRunning   (3)
    │       └── NodeStartFailed     (3)
    └── Interrupted               (130) Ctrl-C, after cleaning up
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130


class DslabError(Exception):
    """Base of every error dslab reports; ``fix`` tells the reader what to do."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message}\n  Fix: {self.fix}"
        return self.message


class CheckFailed(DslabError):
    exit_code = EXIT_CHECK_FAILED


class UsageError(DslabError):
    exit_code = EXIT_USAGE


class UnknownNode(UsageError):
    pass


class EnvironmentProblem(DslabError):
    exit_code = EXIT_ENVIRONMENT


class RedisNotFound(EnvironmentProblem):
    pass


class RedisTooOld(EnvironmentProblem):
    pass


class PortInUse(EnvironmentProblem):
    pass


class LabError(EnvironmentProblem):
    pass


class LabStateCorrupt(LabError):
    pass


class LabNotRunning(LabError):
    pass


class LabAlreadyRunning(LabError):
    pass


class NodeStartFailed(LabError):
    pass


class Interrupted(DslabError):
    exit_code = EXIT_INTERRUPTED
