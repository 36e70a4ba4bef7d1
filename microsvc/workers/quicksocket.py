"""Accepted connections whose timeouts cost no system call until a call has to wait.

A Python socket with a timeout keeps its descriptor non-blocking and polls (poll(2))
before each recv and send, and each `settimeout` is an ioctl: three system calls more
per request than the reads and writes themselves. A `QuickSocket` keeps its descriptor
blocking and first tries each recv and send without waiting (`MSG_DONTWAIT`). Only when
that would block does it hand the timeout to the kernel (SO_RCVTIMEO, SO_SNDTIMEO, set
again only when the value changes) and wait. A request that has arrived when it is read
and a response that fits in the socket's buffer cost one system call each.

Timeouts behave as a Python socket's: `settimeout(seconds)` bounds each wait (and a
whole `sendall`), a wait that runs out raises TimeoutError (`socket.timeout`),
`settimeout(None)` waits forever and `settimeout(0)` never waits (BlockingIOError).

`Acceptor` accepts connections of one listening socket as QuickSockets. It sets
TCP_NODELAY on a connection only where the listening socket's setting is not inherited
(Linux hands it down to each accepted connection).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import sys
import time
from collections import deque
from typing import Any

_NOWAIT = int(socket.MSG_DONTWAIT)  # a plain int: `flags | MsgFlag` costs about 1 us
_TIMEVAL = struct.Struct("@ll")


def _timeval(seconds: float | None) -> bytes:
    if seconds is None:
        return _TIMEVAL.pack(0, 0)  # the kernel's 0: no timeout
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole == 0 and micro == 0:
        micro = 1  # not 0, which would mean "wait forever"
    return _TIMEVAL.pack(whole, micro)


def _size(data: Any) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes


class QuickSocket(socket.socket):
    """A connected socket whose timeouts cost a system call only when a call waits."""

    __slots__ = ("_kernel", "_wait")

    def __init__(self, family: int, type: int, proto: int, fileno: int) -> None:
        super().__init__(family, type, proto, fileno)
        self._wait: float | None = None  # what settimeout() said
        # What SO_RCVTIMEO and SO_SNDTIMEO hold; -1.0: not set since the socket opened.
        self._kernel = [-1.0, -1.0]

    # timeouts

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._wait = value

    def gettimeout(self) -> float | None:
        return self._wait

    def setblocking(self, flag: bool) -> None:
        self._wait = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._wait != 0.0

    def _limit(self, index: int, seconds: float | None) -> None:
        value = -2.0 if seconds is None else seconds
        if self._kernel[index] != value:
            option = socket.SO_RCVTIMEO if index == 0 else socket.SO_SNDTIMEO
            self.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))
            self._kernel[index] = value

    # reading

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            return super().recv(bufsize, flags | _NOWAIT)
        except BlockingIOError:
            if self._wait == 0.0:
                raise
        self._limit(0, self._wait)
        try:
            return super().recv(bufsize, flags)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags | _NOWAIT)
        except BlockingIOError:
            if self._wait == 0.0:
                raise
        self._limit(0, self._wait)
        try:
            return super().recv_into(buffer, nbytes, flags)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    # writing

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags | _NOWAIT)
        except BlockingIOError:
            if self._wait == 0.0:
                raise
        self._limit(1, self._wait)
        try:
            return super().send(data, flags)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            sent = super().send(data, flags | _NOWAIT)
        except BlockingIOError:
            if self._wait == 0.0:
                raise
            sent = 0
        if sent != _size(data):
            self._send_rest(memoryview(data).cast("B")[sent:], flags)

    def _send_rest(self, view: memoryview, flags: int) -> None:
        if self._wait == 0.0:
            raise BlockingIOError("the socket's buffer is full")
        deadline = None if self._wait is None else time.monotonic() + self._wait
        while view:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                self._limit(1, left)
            else:
                self._limit(1, None)
            try:
                sent = super().send(view, flags)
            except BlockingIOError:
                raise TimeoutError("timed out") from None
            view = view[sent:]

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        # socket.sendfile polls before each chunk when a timeout is set; the kernel's
        # send timeout bounds each sendfile(2) that follows the poll.
        self._limit(1, self._wait)
        return super().sendfile(file, offset, count)


class Acceptor:
    """Accepts the connections of one listening socket (non-blocking) as QuickSockets."""

    __slots__ = ("_accept", "_family", "_nodelay", "_proto", "_type", "listener", "name")

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        #: The listener's address: the server address of the connections it accepts.
        self.name = listener.getsockname()
        self._accept = listener._accept  # accept4(2) with SOCK_CLOEXEC: (fd, address)
        self._family = int(listener.family)
        self._type = int(listener.type)
        self._proto = int(listener.proto)
        self._nodelay = self._family in (socket.AF_INET, socket.AF_INET6) and not (
            sys.platform.startswith("linux") and _has_nodelay(listener)
        )

    def accept(self) -> tuple[QuickSocket, Any]:
        """A new connection and its peer's address; raises BlockingIOError when none
        waits (and OSError when the accept fails)."""
        fd, addr = self._accept()
        try:
            sock = QuickSocket(self._family, self._type, self._proto, fd)
        except BaseException:
            socket.close(fd)
            raise
        if self._nodelay:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


def _has_nodelay(listener: Any) -> bool:
    try:
        return bool(listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False


def has_data(sock: socket.socket) -> bool:
    """Whether a connection has bytes (or its end) to read now, without reading them."""
    try:
        socket.socket.recv(sock, 1, socket.MSG_PEEK | _NOWAIT)  # never QuickSocket's wait
    except BlockingIOError:
        return False
    except OSError:
        return True  # reading it reports the error
    return True


class LingeringCloses:
    """Connections whose response is sent, each waiting for its client to close before it
    is closed (RFC 9112 section 9.6, gunicorn's `close_graceful`), without holding the
    worker: closing at once could make the kernel answer the client's late bytes with a
    reset that destroys the response before the client reads it.

    `close(sock)` shuts the write side, reads what the client sent, and closes the socket
    when the client has closed; otherwise the socket waits in a poller (whose `fileno()`
    turns readable with it), at most LINGER seconds and until LINGER_DRAIN bytes were
    read, for `reap()` to close it."""

    #: How long a connection waits for its client's end, at most.
    LINGER = 2.0
    #: How many bytes a waiting connection reads from its client, at most.
    LINGER_DRAIN = 65536
    #: How many connections wait at once; beyond, `close` waits for the client itself.
    MAX_WAITING = 256

    def __init__(self) -> None:
        self._poller = selectors.DefaultSelector()
        self._order: deque[tuple[float, socket.socket]] = deque()  # by deadline
        self._drained: dict[socket.socket, int] = {}

    def __len__(self) -> int:
        return len(self._drained)

    def fileno(self) -> int:
        return self._poller.fileno()

    def close(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        drained = self._read(sock, 0)
        if drained < 0:
            return
        if len(self._drained) >= self.MAX_WAITING:
            self._wait_for(sock, drained)
            return
        self._drained[sock] = drained
        self._order.append((time.monotonic() + self.LINGER, sock))
        self._poller.register(sock, selectors.EVENT_READ)

    def next_deadline(self) -> float | None:
        """When the first waiting connection gives up (time.monotonic()), or None."""
        return self._order[0][0] if self._order else None

    def reap(self, timeout: float = 0.0) -> None:
        """Closes the connections whose clients closed (waiting up to `timeout` for one)
        and those that waited long enough."""
        if not self._drained:
            return
        for key, _ in self._poller.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock in self._drained:
                drained = self._read_waiting(sock)
                if drained >= 0:
                    self._drained[sock] = drained
        self.expire()

    def expire(self) -> None:
        """Closes the connections that waited long enough (without a system call when
        none did)."""
        order = self._order
        if not order or (order[0][0] > time.monotonic() and order[0][1] in self._drained):
            return
        now = time.monotonic()
        while order and (order[0][0] <= now or order[0][1] not in self._drained):
            _, sock = order.popleft()
            if sock in self._drained:
                self._forget(sock)
                sock.close()

    def close_all(self, wait: bool = True) -> None:
        """Closes every waiting connection; with `wait`, after its client's end or its
        deadline."""
        while self._drained and wait:
            deadline = self.next_deadline()
            self.reap(max(0.0, (deadline or 0.0) - time.monotonic()))
        for sock in list(self._drained):
            self._forget(sock)
            sock.close()
        self._poller.close()

    def _forget(self, sock: socket.socket) -> None:
        del self._drained[sock]
        self._poller.unregister(sock)

    def _read_waiting(self, sock: socket.socket) -> int:
        drained = self._read(sock, self._drained[sock], closing=False)
        if drained < 0:
            self._forget(sock)
            sock.close()
        return drained

    @classmethod
    def _read(cls, sock: socket.socket, drained: int, closing: bool = True) -> int:
        """Reads what the client sent without waiting; -1 once the socket is to close (the
        client closed, sent too much, or failed), having closed it if `closing`."""
        while True:
            try:
                data = socket.socket.recv(sock, 65536, _NOWAIT)
            except BlockingIOError:
                return drained
            except OSError:
                data = b""
            drained += len(data)
            if not data or drained >= cls.LINGER_DRAIN:
                if closing:
                    sock.close()
                return -1

    def _wait_for(self, sock: socket.socket, drained: int) -> None:
        deadline = time.monotonic() + self.LINGER
        with selectors.DefaultSelector() as one:
            one.register(sock, selectors.EVENT_READ)
            while drained >= 0:
                left = deadline - time.monotonic()
                if left <= 0 or not one.select(left):
                    break
                drained = self._read(sock, drained, closing=False)
        sock.close()
