"""Failed accepts of a listening socket, for a worker loop that accepts by itself.

An accept can fail for a while (the process is out of file descriptors, the system out
of memory or buffers) and then work again. `AcceptFailures` tells the loop how long to
pause after each failure, and logs one line when a run of failures starts and one when
it ends, however many accepts failed in between:

    Worker (pid: 1234) cannot accept a connection on http://0.0.0.0:8000: [Errno 24]
        Too many open files; retrying
    Worker (pid: 1234) accepts connections on http://0.0.0.0:8000 again, after 8 failed
        accepts

(each one line in the log).
"""

from __future__ import annotations

from typing import Any

#: Pause after the first failed accept of a run; it doubles with each failure, up to
#: ACCEPT_PAUSE_MAX.
ACCEPT_PAUSE_MIN = 0.01
ACCEPT_PAUSE_MAX = 1.0


class AcceptFailures:
    """The failed accepts of one listening socket, in runs: the first failure of a run
    is logged (not every one), each failure gets a longer pause, a success ends the run."""

    def __init__(self, log: Any, pid: int, where: str) -> None:
        self.log = log
        self.pid = pid
        self.where = where
        self.count = 0
        self.pause = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failure; return how long to pause before the next accept."""
        if self.count == 0:
            self.log.error(
                "Worker (pid: %s) cannot accept a connection on %s: %s; retrying",
                self.pid,
                self.where,
                exc,
            )
        self.count += 1
        self.pause = min(self.pause * 2, ACCEPT_PAUSE_MAX) if self.pause else ACCEPT_PAUSE_MIN
        return self.pause

    def succeeded(self) -> None:
        if self.count:
            self.log.info(
                "Worker (pid: %s) accepts connections on %s again, after %d failed accepts",
                self.pid,
                self.where,
                self.count,
            )
            self.count = 0
            self.pause = 0.0
