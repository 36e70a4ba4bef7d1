"""gunicorn's gevent worker, recycled by memory and lifetime (see `recycling`), fair
between keep-alive connections, and quick to accept a burst of new ones.

- Fair. gevent switches greenlets only when one waits. A greenlet serving a keep-alive
  connection whose next request has already arrived reads it without waiting, so under
  load a few busy connections can hold the worker while the others wait for seconds
  (gunicorn's gevent worker, 2 workers, 64 connections: p99 above 1 s with a median under
  1 ms). This worker yields to the other greenlets after each response.
- Quick to accept. With more than one worker, gunicorn accepts one connection per turn of
  the event loop, so that one worker does not take a whole burst; while the worker is
  busy, a turn is long, and when 1000 clients connect at once the last ones wait seconds
  for their first answer, or time out. This worker accepts up to `ACCEPT_BATCH`
  connections per turn: still a share of a burst, not all of it.
- Serves what it accepted. When the worker stops (TERM, a reload, a recycle, a
  scale-down), gunicorn's loop closes the listening sockets, then waits up to
  `graceful_timeout` until every connection greenlet in the pool has ended. A connection
  accepted just before the close may be served after it (its greenlet is in the pool but
  has not run yet), and the connection handler (gunicorn's, and the engine's) asks the
  listening socket for its address first: a closed socket answers EBADF, and the
  connection would be closed unanswered ("Socket error processing request"). The
  worker's listening sockets keep their address (`ListeningSocket`), so such a
  connection is served like any other.

Importing this module imports gevent: only gevent mode loads it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket
import gunicorn.workers.ggevent as gunicorn_gevent
from gevent.server import StreamServer

from microsvc.http.green import Channel, GreenIO
from microsvc.workers.deadlines import GeventDeadlines
from microsvc.workers.engine import EngineWorker
from microsvc.workers.recycling import Recycling
from microsvc.workers.reloading import Reloading

#: Connections a worker accepts per turn of its event loop, at most.
ACCEPT_BATCH = 16


class BatchAcceptServer(StreamServer):  # type: ignore[misc]
    """gevent's StreamServer that accepts at least ACCEPT_BATCH connections per turn
    (gunicorn sets `max_accept = 1` when it runs several workers)."""

    _max_accept = StreamServer.max_accept

    @property
    def max_accept(self) -> int:
        return int(self._max_accept)

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        self._max_accept = max(int(value), ACCEPT_BATCH)


class ListeningSocket(gevent.socket.socket):  # type: ignore[misc]
    """A listening gevent socket that tells its address after it is closed too: the
    address is read once, while the socket is open (it never changes once bound)."""

    __slots__ = ("_address",)

    def __init__(self, family: int, type: int, proto: int = 0, fileno: int | None = None) -> None:
        super().__init__(family, type, proto, fileno)
        self._address: Any = super().getsockname()

    @classmethod
    def take(cls, sock: Any) -> ListeningSocket:
        """The listening socket `sock` (a socket object), as a ListeningSocket; `sock`
        gives up its file descriptor."""
        return cls(sock.family, sock.type, sock.proto, sock.detach())

    def getsockname(self) -> Any:
        return self._address


class GeventWorker(Reloading, Recycling, GeventDeadlines, gunicorn_gevent.GeventWorker):  # type: ignore[misc]
    """Its run loop calls notify() every second, idle or not."""

    sockets: list[Any]  # gunicorn's listeners; ListeningSockets once `patch()` has run

    def patch(self) -> None:
        """Monkey-patch, and make the listening sockets gevent sockets (gunicorn), which
        keep their address (see the module docstring)."""
        super().patch()
        self.sockets = [ListeningSocket.take(sock) for sock in self.sockets]

    def run(self) -> None:
        # gunicorn's run() builds its servers from this module global; this worker
        # process is the only one that reads it.
        gunicorn_gevent.StreamServer = BatchAcceptServer
        super().run()

    def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().handle_request(*args, **kwargs)
        finally:
            gevent.sleep(0)  # let the other connections' greenlets run


class GeventIO(GreenIO):
    """gevent's waits for the HTTP engine's channels (see `microsvc.http.green`): a
    channel parks on its gevent socket's own read and write watchers."""

    def __init__(self) -> None:
        super().__init__(gevent.getcurrent)
        self._hub = gevent.get_hub()

    def raw_socket(self, sock: Any) -> socket.socket | None:
        if type(sock) is not gevent.socket.socket:
            return None  # TLS (gevent's SSLSocket), or a socket this class does not know
        raw: socket.socket | None = getattr(sock, "_sock", None)  # non-blocking
        if getattr(sock, "_read_event", None) is None:
            return None
        return raw

    def park(self, channel: Channel, write: bool) -> None:
        sock = channel.sock
        self._hub.wait(sock._write_event if write else sock._read_event)

    def call_in_hub(self, function: Callable[..., None], *args: Any) -> None:
        self._hub.loop.run_callback(function, *args)

    def spawn(self, function: Callable[[], None]) -> None:
        gevent.spawn(function)

    def sleep(self, seconds: float) -> None:
        gevent.sleep(seconds)


class EngineGeventWorker(EngineWorker, GeventWorker):
    """The gevent worker on microsvc's HTTP engine (see `engine`): one greenlet per
    connection, batch accept, TLS from gevent's server, a yield after each response (the
    engine's, see `microsvc.http.green`), and the stop as above."""

    engine_multithread = True

    def setup_engine(self) -> None:
        super().setup_engine()
        self.http_green = GeventIO()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        try:
            self.serve_client(client, addr, listener.getsockname())
        except OSError as exc:  # a failed TLS handshake, a reset
            self.log.debug("Connection from %s ended: %s", addr, exc)
        except (gevent.GreenletExit, SystemExit):
            pass  # killed after graceful_timeout
        finally:
            with contextlib.suppress(OSError):
                client.close()
