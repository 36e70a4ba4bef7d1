"""The master's queue of signals, safe where eventlet has patched the standard library.

gunicorn's arbiter puts each signal into `SIG_QUEUE` from its signal handler and its
main loop waits on that queue. It is a `queue.SimpleQueue`, whose C implementation may
be used by a handler that interrupts another handler's put. eventlet's monkey-patching
swaps in the pure-Python SimpleQueue, built on a lock: a signal that arrives while a
handler holds that lock runs a second handler that waits for it, and the master hangs,
or dies with "Cannot switch to MAINLOOP from MAINLOOP" when the handler runs in
eventlet's hub. Workers that end together (a shutdown, a reload, recycling) send
SIGCHLDs that close together.

`SignalQueue` keeps the items in the C SimpleQueue, whose put never waits and never
switches, and wakes a waiting `get` through a pipe written with the unpatched
`write`. The wait itself is eventlet's green `select`, so the master's green threads
(gunicorn's control socket) run while it waits.
"""

from __future__ import annotations

import contextlib
import os
import posix
import select
import time
from _queue import Empty
from _queue import SimpleQueue as _CSimpleQueue
from collections.abc import Callable
from typing import Any

from microsvc.serving.patching import eventlet_threads

__all__ = ["Empty", "SignalQueue", "needed"]

#: Whether gunicorn's arbiter needs a `SignalQueue` in this process: where eventlet has
#: patched `threading`, and with it the SimpleQueue the arbiter builds.
needed = eventlet_threads


def _cooperative_select() -> Callable[..., Any]:
    """eventlet's green `select` where eventlet is loaded (also when it left `select`
    unpatched: a real one would stop every green thread of the master while it waits),
    else `select.select`."""
    if needed():
        from eventlet.green import select as green_select

        return green_select.select  # type: ignore[no-any-return]
    return select.select


class SignalQueue:
    """What gunicorn's arbiter uses of `queue.SimpleQueue` (`put_nowait`, `get`,
    `get_nowait`); `put_nowait` may be called from a signal handler that interrupted
    any other call."""

    def __init__(self) -> None:
        self._items: _CSimpleQueue[Any] = _CSimpleQueue()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._select = _cooperative_select()

    def put_nowait(self, item: Any) -> None:
        self._items.put_nowait(item)
        # A full pipe already wakes the reader. posix.write is the C function, never
        # eventlet's green os.write, which would switch to the hub when the pipe is full.
        with contextlib.suppress(BlockingIOError):
            posix.write(self._wake_write, b"\0")

    def get_nowait(self) -> Any:
        return self._items.get_nowait()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item; Empty when none comes (at once unless `block`, else within
        `timeout` seconds, or ever with None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with contextlib.suppress(Empty):
                return self._items.get_nowait()
            left = None if deadline is None else deadline - time.monotonic()
            if not block or (left is not None and left <= 0):
                raise Empty
            with contextlib.suppress(InterruptedError):
                self._select([self._wake_read], [], [], left)
            self._drain()

    def close(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while posix.read(self._wake_read, 512):
                pass
