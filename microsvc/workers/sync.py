"""gunicorn's sync worker, recycled by memory and lifetime (see `recycling`), and the
same worker on microsvc's HTTP engine (`EngineSyncWorker`, see `engine`).

A sync worker serves one connection at a time, so either engine serves one request per
connection and closes it (`Connection: close`): a kept-alive connection would hold the
whole worker while its client thinks."""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import time
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn import util
from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

from microsvc.http import serve_connection
from microsvc.workers.deadlines import ThreadDeadlines
from microsvc.workers.engine import EngineWorker, set_nodelay
from microsvc.workers.quicksocket import Acceptor, LingeringCloses, QuickSocket
from microsvc.workers.recycling import Recycling

#: The shortest time between two heartbeats (and recycling checks) of a busy worker.
NOTIFY_INTERVAL = 0.1


class SyncWorker(Recycling, ThreadDeadlines, _GunicornSyncWorker):  # type: ignore[misc]
    def wait(self, timeout: float) -> Any:
        # Idle, gunicorn's sync worker sleeps timeout/2 (15 s by default) between checks.
        return super().wait(self.check_interval(timeout))

    def _wake(self) -> None:
        if self.PIPE:
            with contextlib.suppress(OSError):
                os.write(self.PIPE[1], b"1")


class EngineSyncWorker(EngineWorker, SyncWorker):
    """The sync worker on microsvc's HTTP engine: one request per connection.

    Connections are accepted as `QuickSocket`s (see `quicksocket`): blocking, close on
    exec and with TCP_NODELAY from the start, their timeouts set in the kernel only when
    a read or write has to wait. After its response a connection waits for its client to
    close (at most 2 s) in `LingeringCloses`, while the worker serves the next one."""

    engine_keepalive = False

    wait_fds: list[Any]  # gunicorn's: the listeners and the wake-up pipe
    _lingering: LingeringCloses  # made in the worker process (run)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acceptors: dict[Any, Acceptor] = {}
        self._next_notify = 0.0

    def notify(self) -> None:
        # gunicorn's loop calls this before each accept: a heartbeat (a system call) and
        # the recycling checks, per request. Enough at most every NOTIFY_INTERVAL.
        now = time.monotonic()
        if now >= self._next_notify:
            self._next_notify = now + NOTIFY_INTERVAL
            super().notify()

    def run(self) -> None:
        lingering = self._lingering = LingeringCloses()
        self.wait_fds = [*self.wait_fds, lingering.fileno()]
        try:
            super().run()
        except BaseException:
            lingering.close_all(wait=False)
            raise
        lingering.close_all()

    def wait(self, timeout: float) -> Any:
        lingering = self._lingering
        if lingering:
            lingering.reap()
            deadline = lingering.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        ready = super().wait(timeout)
        if ready:
            fileno = lingering.fileno()
            ready = [fd for fd in ready if fd != fileno]
        return ready

    def accept(self, listener: Any) -> None:
        if self._lingering:
            self._lingering.reap()
        if listener == self._lingering.fileno():
            return
        acceptor = self._acceptors.get(listener)
        if acceptor is None:
            acceptor = self._acceptors[listener] = Acceptor(listener)
        client, addr = acceptor.accept()
        self._serve(client, addr, acceptor.name)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        set_nodelay(client)
        self._serve(client, addr, listener.getsockname())

    def _serve(self, client: Any, addr: Any, server: Any) -> None:
        try:
            if self.cfg.is_ssl:
                client = gunicorn_sock.ssl_wrap_socket(client, self.cfg)
            serve_connection(client, addr, server, self.wsgi, self.http_config, self.http_hooks)
        except ssl.SSLError as exc:
            self.log.debug("TLS with %s failed: %s", addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        finally:
            if type(client) is QuickSocket:
                self._lingering.close(client)
            else:
                util.close_graceful(client)
