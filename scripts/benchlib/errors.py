"""Errors that end the benchmark with one `Error: ...` line (a failed run is recorded
instead: `harness.HarnessError`)."""

from __future__ import annotations


class BenchError(Exception):
    """Ends the benchmark: printed as one `Error: ...` line, exit status `exit_code`."""

    exit_code = 1


class UsageError(BenchError):
    """A bad command line: exit status 2."""

    exit_code = 2
