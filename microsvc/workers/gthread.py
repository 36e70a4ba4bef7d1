"""gthread that uses all its workers.

gunicorn's gthread worker accepts connections until it holds `worker_connections`
(1000) of them, so under keep-alive one worker takes most clients while the others
idle. With gunicorn's engine (`BalancedThreadWorker`), microsvc runs gthread with
`worker_connections` equal to `threads`: a worker accepts a connection only while it
has a free thread, so connections spread over all workers. The price is that such a
worker does not keep idle connections open.

On microsvc's HTTP engine (`EngineThreadWorker`) no connection holds a thread while it
waits for a request. The main thread watches, in the worker's poller, the listening
sockets, the idle keep-alive connections (parked once a response is sent and no further
request is buffered: at most `worker_connections - threads` of them; beyond that a
response says `Connection: close`) and new connections whose first request has not
arrived yet. Whatever turns readable joins one first-in, first-out line: a connection
with a request to serve, or a listener with a connection to accept. Each time a thread
is free, the first in line gets it: a connection is served (until it turns idle or is to
close), a listener accepts one connection and, as more may wait, takes its next turn
right after the next one in line, so that accepting alternates with serving. So a worker
accepts only while one of its threads is free, and a new client waits behind the
requests that were ready before it, never behind every request that the busy
connections keep sending. Idle connections close after the keep-alive timeout, new ones
that send nothing after the engine's header timeout. The main loop makes one pass over
the line as it stands, then polls again (its heartbeat at most every NOTIFY_INTERVAL).

That loop is `EngineLineWorker`; `EngineThreadWorker` gives the first in line to a free
thread (`ServingThreads`: a lighter pool than gunicorn's executor, with no future per
request and one wake-up of the main loop for what was served meanwhile), and the sync
worker on the engine (`microsvc.workers.sync.EngineSyncWorker`) serves it in the main
thread itself, one at a time, with no threads.

The connections are `QuickSocket`s (see `quicksocket`): a request that is already there
and a response that fits in the socket's buffer cost one system call each. A connection
to close waits for its client's end (at most 2 s) in the main thread's
`LingeringCloses`, not in a thread.

Both recycle by memory and lifetime (see `recycling`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import selectors
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from microsvc.http import HTTPConnection
from microsvc.workers.accepting import AcceptFailures
from microsvc.workers.deadlines import ThreadDeadlines
from microsvc.workers.engine import EngineWorker
from microsvc.workers.quicksocket import Acceptor, LingeringCloses, QuickSocket, has_data
from microsvc.workers.recycling import Recycling
from microsvc.workers.reloading import Reloading

#: How long a stopping worker keeps its parked connections open (at most), for a request
#: a client may already be sending; such a request is answered with Connection: close.
STOP_LINGER = 2.0
#: The longest wait of the main loop between its checks (heartbeat, expired connections).
LOOP_WAIT = 1.0
#: The shortest time between two heartbeats (and recycling checks) of a busy worker.
NOTIFY_INTERVAL = 0.1
#: A pass over the line ends once it has taken this long (sync, which serves in the
#: main thread): the loop polls again, and what turned readable meanwhile joins the line.
PASS_TIME = 0.01

_GONE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED)


class BalancedThreadWorker(Reloading, Recycling, ThreadDeadlines, ThreadWorker):  # type: ignore[misc]
    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.worker_connections > cfg.threads:
            super().check_config(cfg, log)

    def _wake(self) -> None:
        # A request thread recycled the worker: wake the main loop from its poll.
        if self.poller is not None:
            self.method_queue.defer(lambda: None)


class _Connection:
    """One client connection of an EngineLineWorker: served, in line, or parked (in
    `queue`). Watched in the poller by its descriptor `fd` (TLS replaces `sock`)."""

    __slots__ = (
        "client",
        "fd",
        "http",
        "queue",
        "server",
        "since",
        "sock",
        "timeout",
        "watched",
    )

    def __init__(self, sock: Any, client: Any, server: Any) -> None:
        self.sock = sock
        self.fd: int = sock.fileno()
        self.client = client
        self.server = server
        self.timeout = 0.0
        self.http: HTTPConnection | None = None
        self.queue: deque[_Connection] | None = None  # parked or waiting: that queue
        self.watched = False
        self.since = 0.0  # when its request was seen to arrive (in line)

    def close(self, graceful: bool = False) -> None:
        if graceful:
            util.close_graceful(self.sock)
        else:
            util.close(self.sock)


class _Listener:
    """A listening socket of an EngineThreadWorker: watched in the poller, in line
    (a connection waits to be accepted), or neither (the worker takes no more now)."""

    __slots__ = ("acceptor", "failures", "in_line", "resume", "sock", "watched")

    def __init__(self, sock: Any, failures: AcceptFailures) -> None:
        self.sock = sock
        self.acceptor = Acceptor(sock)
        self.failures = failures
        self.watched = False
        self.in_line = False
        self.resume = 0.0  # after a failed accept: not watched again before this time


class EngineLineWorker(EngineWorker, BalancedThreadWorker):
    """The loop of a worker on microsvc's HTTP engine that parks idle connections and
    serves its FIFO line (see the module docstring), `slots` connections at a time. A
    subclass says how a connection in turn is served (`enqueue_req`) and reports it back
    (`finish_connection`): gthread in its threads (`EngineThreadWorker`), sync in the
    main thread (`microsvc.workers.sync.EngineSyncWorker`)."""

    #: Whether a connection stays in the poller while it is in line and served, so that
    #: parking it again costs no system call. Only for a worker that serves in the main
    #: thread: the poller then reports a connection in line again and again (ignored),
    #: and never one that another thread reads.
    watch_while_served = False

    _lingering: LingeringCloses  # made in the worker process (run)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = self.serving_slots(self.cfg)
        self.max_keepalived = self.worker_connections - self.slots
        self.busy = 0  # connections being served and not yet back (main thread only)
        self.parked: deque[_Connection] = deque()  # idle, waiting for their next request
        self.waiting: deque[_Connection] = deque()  # new, waiting for their first request
        self.ready: deque[_Connection | _Listener] = deque()  # in line for a free slot
        self.listeners: list[_Listener] = []
        self._next_notify = 0.0

    @classmethod
    def serving_slots(cls, cfg: Any) -> int:
        """How many connections the worker serves at once."""
        return 1

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        slots = cls.serving_slots(cfg)
        if cfg.keepalive and cfg.worker_connections <= slots:
            log.warning(
                "the worker keeps no idle connection open: worker_connections (%s) leaves "
                "no room beyond the %s connection(s) it serves at once",
                cfg.worker_connections,
                slots,
            )

    def keep_serving(self) -> bool:
        return super().keep_serving() and len(self.parked) < self.max_keepalived

    def notify(self) -> None:
        # The main loop turns about once per request: a heartbeat (a system call), the
        # recycling checks and the parent check at most every NOTIFY_INTERVAL are enough.
        now = time.monotonic()
        if now >= self._next_notify:
            self._next_notify = now + NOTIFY_INTERVAL
            super().notify()

    # main thread

    def _watch_listeners(self) -> float:
        """Watch each listener that is not in line while the worker may take more
        connections; returns how long until a paused listener may be watched again."""
        taking = self.alive and self.nr_conns < self.worker_connections
        now = 0.0
        pause = LOOP_WAIT
        for listener in self.listeners:
            if listener.in_line:
                continue
            want = taking
            if want and listener.resume:
                now = now or time.monotonic()
                if listener.resume > now:
                    want = False
                    pause = min(pause, listener.resume - now)
                else:
                    listener.resume = 0.0
            if want != listener.watched:
                if want:
                    self.poller.register(
                        listener.sock, selectors.EVENT_READ, (self._in_line, listener, None)
                    )
                else:
                    self.poller.unregister(listener.sock)
                listener.watched = want
        return pause

    def _in_line(self, listener: _Listener, _: None) -> None:
        self.poller.unregister(listener.sock)
        listener.watched = False
        listener.in_line = True
        self.ready.append(listener)

    def _accept(self, listener: _Listener) -> None:
        """Accepts one connection (a slot is free): serves it at once if its request
        is there, parks it until it is; puts the listener back in line."""
        if not self.alive or self.nr_conns >= self.worker_connections:
            return
        try:
            sock, addr = listener.acceptor.accept()
        except OSError as exc:
            if exc.errno not in _GONE:
                # Out of file descriptors or memory: pause this listener, log the run once.
                listener.resume = time.monotonic() + listener.failures.failed(exc)
            return
        listener.failures.succeeded()
        self.nr_conns += 1
        self._accepted(_Connection(sock, addr, listener.acceptor.name), listener)

    def _accepted(self, conn: _Connection, listener: _Listener) -> None:
        """A new connection, in the turn of a free slot: served at once if its request is
        there, parked until it is. More connections may wait: accepting them alternates
        with serving the line (the listener's next turn is after the first one in line)."""
        if has_data(conn.sock):
            self.enqueue_req(conn)
        else:
            self._park(conn, self.waiting, self.http_config.header_timeout)
        listener.in_line = True
        self.ready.insert(min(1, len(self.ready)), listener)

    def _dispatch(self) -> None:
        """Gives each free slot the first in line, in one pass over the line as it stands,
        at most PASS_TIME long (then the loop polls again: its heartbeat, and the
        connections that turned readable meanwhile join the line, behind the ones
        before them)."""
        ready = self.ready
        slots = self.slots
        turns = len(ready)
        clock = time.monotonic
        until = clock() + PASS_TIME
        while turns and ready and self.busy < slots:
            turns -= 1
            first = ready.popleft()
            if isinstance(first, _Connection):
                self.enqueue_req(first)
            else:
                first.in_line = False
                self._accept(first)
            if clock() >= until:
                break

    def _poll_wait(self, timeout: float) -> float:
        """How long the loop may wait for events: not at all while a slot is free for
        the first in line."""
        return 0.0 if self.ready and self.busy < self.slots else timeout

    def _park(self, conn: _Connection, queue: deque[_Connection], timeout: float) -> None:
        conn.timeout = time.monotonic() + timeout
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_LINGER)
        if not conn.watched:
            self.poller.register(conn.fd, selectors.EVENT_READ, (self._readable, conn, None))
            conn.watched = True
        queue.append(conn)
        conn.queue = queue

    def _readable(self, conn: _Connection, _: None) -> None:
        queue = conn.queue
        if queue is None:
            return  # in line or served already (watch_while_served)
        if not self.watch_while_served:
            self._unwatch(conn)
        queue.remove(conn)
        conn.queue = None
        conn.since = time.monotonic()
        self.ready.append(conn)

    def _unwatch(self, conn: _Connection) -> None:
        if conn.watched:
            conn.watched = False
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.fd)

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

    def finish_connection(self, conn: _Connection, idle: bool) -> None:
        """A connection served in its turn is back: parked when it turned `idle`
        (`handle` returned True), else closed."""
        self.busy -= 1
        if idle:
            try:
                self._park(conn, self.parked, self.http_config.keepalive_timeout)
                return
            except Exception:
                pass  # it cannot be watched (its socket failed meanwhile): closed now
        self.nr_conns -= 1
        self._unwatch(conn)  # before the close: the descriptor may be reused at once
        try:
            self._close(conn)
        except Exception:
            conn.close()

    def _close(self, conn: _Connection) -> None:
        """Closes a connection whose last response is sent: after its client's end (in
        `LingeringCloses`, without holding a thread)."""
        if type(conn.sock) is QuickSocket:
            self._lingering.close(conn.sock)
        else:
            conn.close()

    def _expire(self, queue: deque[_Connection], everything: bool = False) -> None:
        now = time.monotonic()
        while queue and (everything or queue[0].timeout <= now):
            conn = queue.popleft()
            conn.queue = None
            self._unwatch(conn)
            self.nr_conns -= 1
            conn.close()

    def run(self) -> None:
        self.setup_engine()
        self.poller.register(
            self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks
        )
        lingering = self._lingering = LingeringCloses()
        self.poller.register(lingering.fileno(), selectors.EVENT_READ, lambda _: lingering.reap())
        for sock in self.sockets:
            sock.setblocking(False)
            self.listeners.append(_Listener(sock, AcceptFailures(self.log, self.pid, str(sock))))
        while self.alive:
            if time.monotonic() >= self._next_notify:
                self.notify()
                if not self.is_parent_alive():
                    break
            pause = self._watch_listeners()
            self.wait_for_and_dispatch_events(self._poll_wait(self.check_interval(pause)))
            self._dispatch()
            self._expire(self.parked)
            self._expire(self.waiting)
            lingering.expire()

        # Stopping: accept no more; serve what is in flight or in line, and requests that
        # arrive on parked connections within STOP_LINGER (answered with Connection: close).
        self.alive = False
        self._watch_listeners()
        self.ready = deque(conn for conn in self.ready if isinstance(conn, _Connection))
        linger = time.monotonic() + STOP_LINGER
        for waiting in (self.parked, self.waiting):
            for conn in waiting:
                conn.timeout = min(conn.timeout, linger)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < deadline:
            self.notify()
            self.wait_for_and_dispatch_events(
                self._poll_wait(0.1 if self.parked or self.waiting else LOOP_WAIT)
            )
            self._dispatch()
            self._expire(self.parked)
            self._expire(self.waiting)
            lingering.expire()
        self._expire(self.parked, everything=True)
        self._expire(self.waiting, everything=True)
        for left in self.ready:  # not served within the graceful timeout
            if isinstance(left, _Connection):
                self.nr_conns -= 1
                self._unwatch(left)
                left.close()
        self.poller.unregister(lingering.fileno())
        lingering.close_all()
        if self.tpool is not None:
            self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    # serving a connection in its turn (gthread: in a request thread)

    def handle(self, conn: _Connection) -> bool:
        try:
            if conn.http is None:
                sock = conn.sock
                if self.cfg.is_ssl:
                    sock = conn.sock = gunicorn_sock.ssl_wrap_socket(sock, self.cfg)
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
        if type(conn.sock) is not QuickSocket:
            conn.close(graceful=True)  # TLS: the close_notify and the wait, in this thread
        return False  # the main thread closes it


class ServingThreads:
    """The request threads of a gthread worker on the engine: each takes the next
    connection handed to it (`submit`), serves it (`serve(conn)`: True when it turned
    idle) and hands it back to the main thread, which takes the served ones with
    `drain` once `fileno()` turns readable.

    Lighter than a ThreadPoolExecutor: no future, condition or callback per request, and
    one wake-up of the main thread for all that was served while it was busy (a thread
    writes a byte only when none is pending). The threads start with the first
    connection, as an executor's do. They are daemon threads: a worker that exits (after
    its graceful timeout, or on QUIT and INT) does not wait for requests still running."""

    def __init__(self, count: int, serve: Callable[[_Connection], bool]) -> None:
        self._serve = serve
        self._todo: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._done: deque[tuple[_Connection, bool]] = deque()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        self._threads = [
            threading.Thread(target=self._run, name=f"request-{index}", daemon=True)
            for index in range(count)
        ]
        self._started = False

    def fileno(self) -> int:
        return self._read_fd

    def submit(self, conn: _Connection) -> None:
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()
        self._todo.put(conn)

    def drain(self) -> list[tuple[_Connection, bool]]:
        """In the main thread: the connections served since the last call, each with
        whether it turned idle."""
        with contextlib.suppress(OSError):
            os.read(self._read_fd, 4096)
        self._woken = False  # before taking them: one served after this writes again
        done = self._done
        served = []
        while done:
            served.append(done.popleft())
        return served

    def _run(self) -> None:
        todo, done, serve = self._todo, self._done, self._serve
        while True:
            conn = todo.get()
            if conn is None:
                return
            try:
                idle = serve(conn) is True
            except BaseException:
                idle = False
            done.append((conn, idle))
            if not self._woken:
                self._woken = True
                with contextlib.suppress(OSError):  # full: the main thread has bytes to read
                    os.write(self._write_fd, b"\0")

    def shutdown(self, wait: bool = False) -> None:
        """Lets each thread end once it has served its connection (`wait`: joins them)."""
        if not self._started:
            return
        for _ in self._threads:
            self._todo.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class EngineThreadWorker(EngineLineWorker):
    """gthread on microsvc's HTTP engine (see the module docstring): the line's first
    connection goes to a free thread (`ServingThreads`)."""

    engine_multithread = True
    tpool: ServingThreads | None

    @classmethod
    def serving_slots(cls, cfg: Any) -> int:
        return int(cfg.threads)

    def get_thread_pool(self) -> ServingThreads:
        return ServingThreads(int(self.cfg.threads), self.handle)

    def run(self) -> None:
        threads = self.tpool
        assert threads is not None
        # Its descriptors stay open until the process exits: a thread still serving a
        # connection may write to them after the loop ends.
        self.poller.register(threads.fileno(), selectors.EVENT_READ, self._served)
        super().run()

    def _served(self, _: Any) -> None:
        assert self.tpool is not None
        for conn, idle in self.tpool.drain():
            self.finish_connection(conn, idle)

    def enqueue_req(self, conn: _Connection) -> None:
        assert self.tpool is not None
        self.busy += 1
        self.tpool.submit(conn)
