"""An eventlet worker for gunicorn 27, which no longer ships one.

Built on gunicorn's `AsyncWorker`, which parses HTTP and runs the app; this module adds
the eventlet parts: a fresh hub after fork, green listening sockets, at most
`worker_connections` connections served at once, a yield after each response so that
busy keep-alive connections cannot starve the others, and a graceful stop that lets
in-flight requests finish within `graceful_timeout`. It recycles by memory and lifetime
like the other worker classes (see `recycling`). eventlet itself is unmaintained:
prefer gevent.

- Accept errors. A connection the client broke before it was accepted is skipped. Any
  other failed accept (out of file descriptors, out of memory, ...) is logged once per
  run of failures and retried after a pause that grows (see `accepting`), so the worker
  serves again as soon as the cause is gone. Only a listening socket that is no longer
  usable stops the worker (the arbiter replaces it).
- TLS. With `certfile`/`keyfile`, each connection is wrapped with gunicorn's
  `ssl_context` (built once per worker) in the greenthread that serves it.
- Connections taken over by the app. `eventlet.websocket` answers the upgrade on the
  socket itself and marks the request as handled in `eventlet.wsgi.WSGI_LOCAL`; the
  worker then closes the connection without writing anything more, and notes it in the
  environ (`microsvc.http.TAKEN_OVER_KEY`) for the request metrics.
- Stopping. As soon as the worker stops (TERM, recycle), it stops accepting and closes
  its listening sockets, so new connections go to the other workers or are refused at
  once; the connections it already accepted are served to the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import eventlet
import eventlet.greenthread
import eventlet.hubs
import eventlet.wsgi
from eventlet.greenio import GreenSocket
from eventlet.greenpool import GreenPool
from eventlet.semaphore import Semaphore
from gunicorn.sock import ssl_context
from gunicorn.workers.base_async import AsyncWorker

from microsvc.http import TAKEN_OVER_KEY
from microsvc.http.green import Channel, GreenIO
from microsvc.workers.accepting import AcceptFailures
from microsvc.workers.deadlines import EventletDeadlines
from microsvc.workers.engine import EngineWorker
from microsvc.workers.recycling import Recycling
from microsvc.workers.reloading import Reloading
from microsvc.wsgi import Environ, StartResponse, WSGIApp

#: Accept errors that are part of normal operation, or concern one connection (reset or
#: broken by the client before it was accepted): retried at once, never logged.
_ACCEPT_RETRY = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNABORTED, errno.EPROTO}
)
#: Accept errors of a listening socket that can never accept again: the worker stops.
_LISTENER_GONE = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EOPNOTSUPP})
#: How often the stopping worker checks that its connections are done.
_STOP_POLL = 0.1
#: The run loop checks `alive` this often, and notifies the arbiter every NOTIFY_INTERVAL.
_ALIVE_POLL = 0.1
NOTIFY_INTERVAL = 1.0


class _ListenerName:
    """The listener handed to `handle()`: it only asks for the address, which stays
    known after the listening socket is closed while the worker stops."""

    def __init__(self, name: Any) -> None:
        self._name = name

    def getsockname(self) -> Any:
        return self._name


class EventletWorker(Reloading, Recycling, EventletDeadlines, AsyncWorker):  # type: ignore[misc]
    wsgi: WSGIApp
    _ssl_context: ssl.SSLContext | None = None

    def init_process(self) -> None:
        eventlet.monkey_patch()
        # The hub's epoll object was created in the master; a forked child must not share it.
        eventlet.hubs.use_hub()
        self.cfg.set("sendfile", False)  # os.sendfile blocks the hub on a green socket
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _noting_takeovers(self.wsgi)

    def timeout_ctx(self) -> Any:
        return eventlet.Timeout(self.cfg.keepalive or None, False)

    def is_already_handled(self, respiter: Any) -> bool:
        if getattr(eventlet.wsgi.WSGI_LOCAL, "already_handled", False):
            # The app answered on the socket itself (eventlet.websocket): write
            # nothing more, close the connection (handle() does on StopIteration).
            close = getattr(respiter, "close", None)
            if close is not None:
                close()
            raise StopIteration
        return bool(super().is_already_handled(respiter))

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(True)
        if self._ssl_context is not None:
            try:
                client = self._ssl_context.wrap_socket(
                    client,
                    server_side=True,
                    suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
                    do_handshake_on_connect=self.cfg.do_handshake_on_connect,
                )
            except OSError as exc:  # ssl.SSLError included
                # Not TLS (plain HTTP on a TLS port) or a failed handshake: nothing to answer.
                self.log.debug("TLS handshake with %s failed: %s", addr, exc)
                client.close()
                return
        self.serve_accepted(listener, client, addr)

    def serve_accepted(self, listener: Any, client: Any, addr: Any) -> None:
        """Serves an accepted (and, for TLS, wrapped) connection, and closes it."""
        super().handle(listener, client, addr)

    def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().handle_request(*args, **kwargs)
        finally:
            eventlet.sleep(0)  # fair between keep-alive connections (see workers.gevent)

    def handle_quit(self, sig: int, frame: Any) -> None:
        eventlet.spawn(super().handle_quit, sig, frame)

    def handle_usr1(self, sig: int, frame: Any) -> None:
        eventlet.spawn(super().handle_usr1, sig, frame)

    def notify(self) -> None:
        super().notify()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            sys.exit(0)

    def _serve(self, slots: Semaphore, listener: Any, client: Any, addr: Any) -> None:
        try:
            self.handle(listener, client, addr)
        finally:
            slots.release()

    def _acceptor(
        self, listener: GreenSocket, where: str, pool: GreenPool, slots: Semaphore
    ) -> None:
        try:
            self._accept_loop(listener, where, pool, slots)
        except Exception:
            # A worker that no longer accepts must not go on heartbeating: stop it, and
            # the arbiter starts another.
            if self.alive:
                self.log.exception(
                    "Worker (pid: %s) stopped accepting on %s; stopping", self.pid, where
                )
                self.alive = False

    def _accept_loop(
        self, listener: GreenSocket, where: str, pool: GreenPool, slots: Semaphore
    ) -> None:
        name = _ListenerName(listener.getsockname())
        failures = AcceptFailures(self.log, self.pid, where)
        while self.alive:
            # Wait for a free connection slot before accepting, so this greenthread never
            # holds an accepted connection it cannot serve (and a stop never drops one).
            slots.acquire()
            try:
                client, addr = listener.accept()
            except OSError as exc:
                slots.release()
                if not self.alive:
                    return
                if exc.errno in _ACCEPT_RETRY:
                    continue
                if exc.errno in _LISTENER_GONE:
                    self.log.error(
                        "Worker (pid: %s) cannot accept on %s any more (%s); stopping",
                        self.pid,
                        where,
                        exc,
                    )
                    self.alive = False
                    return
                eventlet.sleep(failures.failed(exc))
                continue
            except BaseException:
                slots.release()
                raise
            failures.succeeded()
            # Never waits: a slot is held, and the pool is as large as the slots.
            pool.spawn_n(self._serve, slots, name, client, addr)

    def run(self) -> None:
        if self.cfg.is_ssl:
            self._ssl_context = ssl_context(self.cfg)
        pool = GreenPool(self.worker_connections)
        slots = Semaphore(self.worker_connections)
        listeners = [GreenSocket(s.sock if hasattr(s, "sock") else s) for s in self.sockets]
        acceptors = [
            eventlet.spawn(self._acceptor, listener, str(sock), pool, slots)
            for listener, sock in zip(listeners, self.sockets, strict=True)
        ]

        next_notify = 0.0
        while self.alive:
            if time.monotonic() >= next_notify:
                self.notify()
                next_notify = time.monotonic() + NOTIFY_INTERVAL
            eventlet.sleep(_ALIVE_POLL)

        # Stop accepting and close the listening sockets at once, so that new connections
        # go to other workers or are refused; then serve the accepted ones to the end.
        for acceptor in acceptors:
            acceptor.kill()
        self._close_listeners(listeners)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while pool.running() and time.monotonic() < deadline:
            if time.monotonic() >= next_notify:
                self.notify()
                next_notify = time.monotonic() + NOTIFY_INTERVAL
            eventlet.sleep(_STOP_POLL)
        if pool.running():
            self.log.warning(
                "Worker graceful timeout (pid:%s), %d requests cut off", self.pid, pool.running()
            )
            for greenlet in list(pool.coroutines_running):
                eventlet.greenthread.kill(greenlet)

    def _close_listeners(self, listeners: list[GreenSocket]) -> None:
        for listener in listeners:
            try:
                listener.close()
            except OSError as exc:
                self.log.debug("Closing a listening socket: %s", exc)
        for sock in self.sockets:
            try:
                sock.close()  # gunicorn's listener: closes its socket, never unlinks
            except OSError as exc:
                self.log.debug("Closing a listening socket: %s", exc)


class EventletIO(GreenIO):
    """eventlet's waits for the HTTP engine's channels (see `microsvc.http.green`): a
    channel parks with eventlet's trampoline on the socket under the GreenSocket."""

    def __init__(self) -> None:
        super().__init__(eventlet.greenthread.getcurrent)

    def raw_socket(self, sock: Any) -> socket.socket | None:
        if type(sock) is not GreenSocket:
            return None  # TLS, or a socket this class does not know
        raw: socket.socket | None = getattr(sock, "fd", None)  # non-blocking
        return raw

    def park(self, channel: Channel, write: bool) -> None:
        eventlet.hubs.trampoline(channel.raw, read=not write, write=write)

    def wait_idle(self, channel: Channel) -> None:
        # A wait on a socket registers it with the hub's epoll and unregisters it after
        # (two system calls, and the hub's bookkeeping); a busy worker finds the next
        # request there after a yield, and waits only when it is not.
        eventlet.sleep(0)

    def call_in_hub(self, function: Callable[..., None], *args: Any) -> None:
        eventlet.hubs.get_hub().schedule_call_global(0, function, *args)

    def spawn(self, function: Callable[[], None]) -> None:
        eventlet.spawn_n(function)

    def sleep(self, seconds: float) -> None:
        eventlet.sleep(seconds)


class EngineEventletWorker(EngineWorker, EventletWorker):
    """The eventlet worker on microsvc's HTTP engine (see `engine`): one greenthread per
    connection, a yield after each response (the engine's, see `microsvc.http.green`),
    TLS, websockets that take the connection over (the engine writes nothing more and
    closes it), accept-error handling and the stop as above."""

    engine_multithread = True

    def setup_engine(self) -> None:
        super().setup_engine()
        self.http_green = EventletIO()

    def serve_accepted(self, listener: Any, client: Any, addr: Any) -> None:
        try:
            self.serve_client(client, addr, listener.getsockname())
        except OSError as exc:  # a failed TLS handshake, a reset
            self.log.debug("Connection from %s ended: %s", addr, exc)
        finally:
            with contextlib.suppress(OSError):
                client.close()


def _noting_takeovers(app: WSGIApp) -> WSGIApp:
    """`app`, which marks in the environ each request whose connection the app took over
    (eventlet.websocket sets `eventlet.wsgi.WSGI_LOCAL.already_handled`). Only a request
    with an Upgrade header can be taken over: the others skip the green-thread-local
    flag, which costs microseconds to read and to write."""

    def call(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if "HTTP_UPGRADE" not in environ:
            return app(environ, start_response)
        eventlet.wsgi.WSGI_LOCAL.already_handled = False
        body = app(environ, start_response)
        if getattr(eventlet.wsgi.WSGI_LOCAL, "already_handled", False):
            environ[TAKEN_OVER_KEY] = True
        return body

    return call
