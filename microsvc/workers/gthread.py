"""gthread that uses all its workers.

gunicorn's gthread worker accepts connections until it holds `worker_connections`
(1000) of them, so under keep-alive one worker takes most clients while the others
idle. With gunicorn's engine (`BalancedThreadWorker`), microsvc runs gthread with
`worker_connections` equal to `threads`: a worker accepts a connection only while it
has a free thread, so connections spread over all workers. The price is that such a
worker does not keep idle connections open.

On microsvc's HTTP engine (`EngineThreadWorker`) a worker accepts only while one of its
threads is free, and an idle keep-alive connection does not hold a thread: once a
response is sent and no further request is buffered, the connection is parked in the
worker's poller (at most `worker_connections - threads` of them; beyond that a response
says `Connection: close`) until its next request arrives or the keep-alive timeout
closes it. A new connection whose first request has not arrived within
`FIRST_DATA_WAIT` is parked the same way, for up to the engine's header timeout.

Both recycle by memory and lifetime (see `recycling`).
"""

from __future__ import annotations

import contextlib
import errno
import select
import selectors
import ssl
import time
from collections import deque
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from microsvc.http import HTTPConnection
from microsvc.workers.engine import EngineWorker, set_nodelay
from microsvc.workers.recycling import Recycling

#: How long a thread waits for a new connection's first bytes before parking it.
FIRST_DATA_WAIT = 0.5
#: How long a stopping worker keeps its parked connections open (at most), for a request
#: a client may already be sending; such a request is answered with Connection: close.
STOP_LINGER = 2.0

_PARK = "park"


class BalancedThreadWorker(Recycling, ThreadWorker):  # type: ignore[misc]
    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.worker_connections > cfg.threads:
            super().check_config(cfg, log)

    def _wake(self) -> None:
        # A request thread recycled the worker: wake the main loop from its poll.
        if self.poller is not None:
            self.method_queue.defer(lambda: None)


class _Connection:
    """One client connection of an EngineThreadWorker: busy in a thread, or parked."""

    __slots__ = ("client", "http", "server", "sock", "timeout")

    def __init__(self, sock: Any, client: Any, server: Any) -> None:
        self.sock = sock
        self.client = client
        self.server = server
        self.timeout = 0.0
        self.http: HTTPConnection | None = None

    def close(self, graceful: bool = False) -> None:
        if graceful:
            util.close_graceful(self.sock)
        else:
            util.close(self.sock)


class EngineThreadWorker(EngineWorker, BalancedThreadWorker):
    """gthread on microsvc's HTTP engine (see the module docstring)."""

    engine_multithread = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy = 0  # connections handed to a thread and not yet back (main thread only)
        self.parked: deque[_Connection] = deque()  # idle, waiting for their next request
        self.waiting: deque[_Connection] = deque()  # new, waiting for their first request

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.keepalive and cfg.worker_connections <= cfg.threads:
            log.warning(
                "gthread keeps no idle connection open: worker_connections (%s) leaves no "
                "room beyond the %s threads",
                cfg.worker_connections,
                cfg.threads,
            )

    def keep_serving(self) -> bool:
        return super().keep_serving() and len(self.parked) < self.max_keepalived

    # main thread

    def accept(self, listener: Any) -> None:
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        client.setblocking(True)
        self.nr_conns += 1
        self.enqueue_req(_Connection(client, addr, listener.getsockname()))

    def enqueue_req(self, conn: Any) -> None:
        self.busy += 1
        super().enqueue_req(conn)

    def _park(self, conn: _Connection, queue: deque[_Connection], timeout: float) -> None:
        conn.timeout = time.monotonic() + timeout
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_LINGER)
        queue.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, (self._readable, conn, queue))

    def _readable(self, conn: _Connection, queue: deque[_Connection]) -> None:
        self.poller.unregister(conn.sock)
        queue.remove(conn)
        self.enqueue_req(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        try:
            events = self.poller.select(timeout)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            return
        for key, _ in events:
            data = key.data
            if type(data) is tuple:
                data[0](data[1], data[2])
            else:
                data(key.fileobj)

    def finish_request(self, conn: _Connection, fs: Any) -> None:
        self.busy -= 1
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:
            result = False
        try:
            if result is _PARK and self.alive:
                self._park(conn, self.waiting, self.http_config.header_timeout)
            elif result is True:
                self._park(conn, self.parked, self.http_config.keepalive_timeout)
            else:
                self.nr_conns -= 1
                conn.close()
        except Exception:
            self.nr_conns -= 1
            conn.close()

    def _expire(self, queue: deque[_Connection], everything: bool = False) -> None:
        now = time.monotonic()
        while queue and (everything or queue[0].timeout <= now):
            conn = queue.popleft()
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.sock)
            self.nr_conns -= 1
            conn.close()

    def run(self) -> None:
        self.setup_engine()
        self.poller.register(
            self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks
        )
        threads = self.cfg.threads
        while self.alive:
            self.notify()
            can_accept = self.busy < threads and self.nr_conns < self.worker_connections
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            self.wait_for_and_dispatch_events(timeout=self.check_interval(1.0))
            if not self.is_parent_alive():
                break
            self._expire(self.parked)
            self._expire(self.waiting)

        # Stopping: accept no more; serve what is in flight, and requests that arrive on
        # parked connections within STOP_LINGER (answered with Connection: close).
        self.set_accept_enabled(False)
        linger = time.monotonic() + STOP_LINGER
        for queue in (self.parked, self.waiting):
            for conn in queue:
                conn.timeout = min(conn.timeout, linger)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < deadline:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=0.1 if self.parked else 1.0)
            self._expire(self.parked)
            self._expire(self.waiting)
        self._expire(self.parked, everything=True)
        self._expire(self.waiting, everything=True)
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    # request threads

    def handle(self, conn: _Connection) -> Any:
        try:
            if conn.http is None:
                if not _readable_within(conn.sock, FIRST_DATA_WAIT):
                    return _PARK
                sock = conn.sock
                if self.cfg.is_ssl:
                    sock = conn.sock = gunicorn_sock.ssl_wrap_socket(sock, self.cfg)
                set_nodelay(sock)
                conn.http = HTTPConnection(
                    sock, conn.client, conn.server, self.wsgi, self.http_config, self.http_hooks
                )
            if conn.http.serve(hand_back=True):
                return True
        except ssl.SSLError as exc:
            self.log.debug("TLS with %s failed: %s", conn.client, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception:
            self.log.exception("Error serving a connection")
        conn.close(graceful=True)
        return False


def _readable_within(sock: Any, timeout: float) -> bool:
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(timeout * 1000))
