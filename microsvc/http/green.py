"""Connections served in green threads (gevent, eventlet) without a timer per wait.

A socket under gevent or eventlet emulates blocking calls: each call goes through a few
layers of Python, a receive that finds nothing raises and catches an exception before
it waits, and each wait with a timeout arms and cancels a timer. A `Channel` (one per
plain connection, from the worker's `GreenIO`) calls the non-blocking socket underneath
directly: a receive or a send that need not wait is one system call, and a wait parks
the green thread on the socket's readiness with no timer. One sweeper green thread per
worker process ends, every `SWEEP_INTERVAL` seconds, the waits that are past their
deadline, with `socket.timeout` (TimeoutError), as the socket's own timeout would: a
timeout is honoured to within that interval.

After each response the connection waits for its next request before reading it (the
next read would find nothing: the client is reading the response); that wait is the
green thread's yield to the other connections. Where a wait costs more than a yield
(eventlet registers the socket with its hub's epoll for each one), the library yields
and reads instead, and waits only when nothing came (`GreenIO.wait_idle`). A request
that is already read (sent pipelined) is served after an explicit yield, so that a busy
keep-alive connection cannot hold the worker. A TLS connection keeps its socket
(`GreenIO.channel` answers None) and gets the explicit yield after each response.

The library's part is small (`park`, `call_in_hub`, `spawn`, `sleep`): the workers of
`microsvc.workers.gevent` and `microsvc.workers.eventlet` give it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

#: How often the sweeper looks for waits past their deadline, in seconds.
SWEEP_INTERVAL: Final = 0.1

_monotonic: Final = time.monotonic
log = logging.getLogger("microsvc.http")


class _Wait:
    """A green thread parked on a channel until `deadline` (monotonic seconds)."""

    __slots__ = ("deadline", "green")

    def __init__(self, deadline: float, green: Any) -> None:
        self.deadline = deadline
        self.green = green


@mypyc_attr(allow_interpreted_subclasses=True)
class GreenIO:
    """A green-thread library's waits, for one worker process. Subclasses give `park`
    (wait until a socket is ready), `call_in_hub` (run a function in the event loop's
    own green thread), `spawn`, `sleep` and `raw_socket`."""

    def __init__(self, getcurrent: Callable[[], Any]) -> None:
        self._getcurrent = getcurrent  # the running green thread
        self._waiting: dict[Channel, _Wait] = {}
        self._sweeping = False

    # --- the library's part -------------------------------------------------------------

    def raw_socket(self, sock: Any) -> socket.socket | None:
        """The non-blocking socket under the green socket `sock`, or None when the
        channel cannot be used (TLS, a socket type this class does not know)."""
        raise NotImplementedError

    def park(self, channel: Channel, write: bool) -> None:
        """Parks the current green thread until the channel's socket is readable (or
        writable), with no timeout."""
        raise NotImplementedError

    def call_in_hub(self, function: Callable[..., None], *args: Any) -> None:
        """Runs `function(*args)` soon in the event loop's green thread."""
        raise NotImplementedError

    def spawn(self, function: Callable[[], None]) -> None:
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    # --- for the connection ---------------------------------------------------------------

    def channel(self, sock: Any) -> Channel | None:
        """A channel for the connected socket `sock`, or None to use the socket as it is."""
        raw = self.raw_socket(sock)
        if raw is None:
            return None
        if not self._sweeping:
            self._sweeping = True
            self.spawn(self._sweep)
        return Channel(self, sock, raw)

    def yield_(self) -> None:
        """Lets the other green threads run before this one goes on."""
        self.sleep(0)

    def wait_idle(self, channel: Channel) -> None:
        """After a response, before the channel reads its next request: waits until the
        socket is readable. A library whose waits cost more than a yield may only yield
        here (the read that follows waits if nothing came meanwhile)."""
        self.wait(channel, False)

    def wait(self, channel: Channel, write: bool) -> None:
        """Waits until the channel's socket is ready, at most `channel.timeout` seconds
        (socket.timeout after that)."""
        timeout = channel.timeout
        if timeout is None:
            self.park(channel, write)
            return
        waiting = self._waiting
        waiting[channel] = _Wait(_monotonic() + timeout, self._getcurrent())
        try:
            self.park(channel, write)
        finally:
            del waiting[channel]

    # --- the sweeper ----------------------------------------------------------------------

    def _sweep(self) -> None:
        waiting = self._waiting
        while True:
            self.sleep(SWEEP_INTERVAL)
            if not waiting:
                continue
            now = _monotonic()
            try:
                for channel, parked in list(waiting.items()):
                    if parked.deadline <= now:
                        self.call_in_hub(self._expire, channel, parked)
            except Exception:  # the sweeper must go on: every timeout depends on it
                log.exception("Error in the timeout sweeper")

    def _expire(self, channel: Channel, parked: _Wait) -> None:
        # In the event loop's green thread: the parked one is still parked in this very
        # wait (not woken since the sweep), so the error lands in the wait.
        if self._waiting.get(channel) is parked:
            parked.green.throw(TimeoutError("timed out"))


class Channel:
    """A connection's socket as the HTTP engine uses it (`recv`, `sendall`, `sendfile`,
    `settimeout`), on the non-blocking socket underneath a green socket. `timeout`
    bounds each wait, as a socket's timeout does. With `idle` set (after a response),
    the next `recv` waits for the socket to turn readable before it reads."""

    __slots__ = ("_io", "_raw", "idle", "raw", "sock", "timeout")

    def __init__(self, io: GreenIO, sock: Any, raw: socket.socket) -> None:
        self._io = io
        self._raw = raw
        self.raw = raw
        self.sock = sock
        self.timeout: float | None = None
        self.idle = False

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def recv(self, size: int) -> bytes:
        if self.idle:
            self.idle = False
            self._io.wait_idle(self)
        raw = self._raw
        while True:
            try:
                return raw.recv(size)
            except BlockingIOError:
                pass
            self._io.wait(self, False)

    def sendall(self, data: bytes) -> None:
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._send_rest(memoryview(data)[sent:])

    def _send_rest(self, view: memoryview) -> None:
        raw = self._raw
        while view:
            self._io.wait(self, True)
            try:
                sent = raw.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """The green socket's own sendfile, bounded by this channel's timeout."""
        sock = self.sock
        sock.settimeout(self.timeout)
        try:
            sent: int = sock.sendfile(file, offset, count)
        finally:
            sock.settimeout(None)
        return sent
