"""Failed accepts: one log line when a run of failures starts and one when it ends, and
a pause that doubles from ACCEPT_PAUSE_MIN up to ACCEPT_PAUSE_MAX, however long the run."""

from __future__ import annotations

import errno
import os
from typing import Any

from microsvc.workers.accepting import ACCEPT_PAUSE_MAX, ACCEPT_PAUSE_MIN, AcceptFailures


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def error(self, message: str, *args: Any) -> None:
        self.lines.append(("error", message % args))

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(("info", message % args))


EMFILE = OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_a_run_of_failures_logs_once_when_it_starts_and_once_when_it_ends() -> None:
    log = RecordingLog()
    failures = AcceptFailures(log, 1234, "http://127.0.0.1:8000")
    for _ in range(50):
        failures.failed(EMFILE)
    failures.succeeded()
    failures.succeeded()
    assert log.lines == [
        (
            "error",
            "Worker (pid: 1234) cannot accept a connection on http://127.0.0.1:8000: "
            "[Errno 24] Too many open files; retrying",
        ),
        (
            "info",
            "Worker (pid: 1234) accepts connections on http://127.0.0.1:8000 again, "
            "after 50 failed accepts",
        ),
    ]


def test_the_pause_doubles_up_to_the_maximum_and_starts_again_after_a_success() -> None:
    failures = AcceptFailures(RecordingLog(), 1, "x")
    pauses = [failures.failed(EMFILE) for _ in range(10)]
    assert pauses[0] == ACCEPT_PAUSE_MIN
    assert pauses[1] == 2 * ACCEPT_PAUSE_MIN
    assert pauses == sorted(pauses)
    assert pauses[-1] == ACCEPT_PAUSE_MAX
    failures.succeeded()
    assert failures.failed(EMFILE) == ACCEPT_PAUSE_MIN


def test_a_long_run_keeps_the_maximum_pause() -> None:
    failures = AcceptFailures(RecordingLog(), 1, "x")
    for _ in range(5000):
        pause = failures.failed(EMFILE)
    assert pause == ACCEPT_PAUSE_MAX


def test_nothing_is_logged_without_failures() -> None:
    log = RecordingLog()
    AcceptFailures(log, 1, "x").succeeded()
    assert log.lines == []
