"""gunicorn's sync worker, recycled by memory and lifetime (see `recycling`), and the
same worker on microsvc's HTTP engine (`EngineSyncWorker`, see `engine`).

Either runs one request at a time, in its main thread: an application that is not
thread-safe is safe in it.

gunicorn's sync worker (`--http-engine gunicorn`) serves one request per connection and
closes it (`Connection: close`): a kept-alive connection would hold the whole worker
while its client thinks.

On microsvc's HTTP engine, the sync worker keeps connections alive without letting an
idle one hold it. It runs gthread's loop (`microsvc.workers.gthread.EngineLineWorker`)
with no threads: between requests, the main thread watches, in one poller, its listening
sockets, its idle keep-alive connections (at most `worker_connections - 1`, gunicorn's
1000 by default; beyond that a response says `Connection: close`) and new connections
whose first request has not arrived yet. Whatever turns readable joins one first-in,
first-out line, and the main thread serves the line in turn: a connection until no
further request is buffered (pipelined requests are answered in order), then it is
parked again; a listener accepts one connection and takes its next turn after the next
one in line, so accepting alternates with serving. A new connection whose request is
already there goes into the line by the age of that request (the kernel's time since it
arrived), before the connections that turned readable after it, and while the ones it
accepts came before the last one in line the listener goes again at once: requests are
served about in the order they came, on a kept-alive connection or a new one, so a
request that `--max-queue-time` sheds is shed after about that long. Idle connections
close after `--keep-alive` seconds, new ones that send nothing after the engine's header
timeout (the kernel offers a new TCP connection to the workers only once its first bytes
arrive, or after a second: `microsvc.serving.binding.defer_accept`, so a worker takes
connections it can serve, not every silent one while the other workers idle); with
`--keep-alive 0` every response says `Connection: close`. A connection to close waits
for its client's end (at most 2 s) in `LingeringCloses` while the worker serves on. A
client that sends only part of a request holds the worker until the rest comes or the
engine's timeout for it passes, as with gunicorn's sync worker.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from gunicorn.workers.base import Worker
from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

from microsvc.serving.middleware import kernel_queue_time
from microsvc.workers.deadlines import ThreadDeadlines
from microsvc.workers.gthread import EngineLineWorker, _Connection, _Listener
from microsvc.workers.quicksocket import has_data
from microsvc.workers.recycling import Recycling
from microsvc.workers.reloading import Reloading


class SyncWorker(Reloading, Recycling, ThreadDeadlines, _GunicornSyncWorker):  # type: ignore[misc]
    def wait(self, timeout: float) -> Any:
        # Idle, gunicorn's sync worker sleeps timeout/2 (15 s by default) between checks.
        return super().wait(self.check_interval(timeout))

    def _wake(self) -> None:
        if self.PIPE:
            with contextlib.suppress(OSError):
                os.write(self.PIPE[1], b"1")


class EngineSyncWorker(EngineLineWorker):
    """The sync worker on microsvc's HTTP engine: gthread's loop (`EngineLineWorker`)
    without threads. The main thread serves the first in line itself, one request at a
    time, and parks the connection again once no further request is buffered (see the
    module docstring)."""

    watch_while_served = True

    def get_thread_pool(self) -> None:
        return None  # the main thread serves

    def handle_quit(self, sig: int, frame: Any) -> None:
        Worker.handle_quit(self, sig, frame)  # gthread's would stop its thread pool first

    def enqueue_req(self, conn: _Connection) -> None:
        self.busy += 1
        self.finish_connection(conn, self.handle(conn))

    def _accepted(self, conn: _Connection, listener: _Listener) -> None:
        # The line and the listening socket's backlog are merged by the age of their
        # requests (the kernel says when a new connection's request arrived): a new
        # connection whose request came before some in line goes in before them, so
        # requests are served about in the order they came, whichever way they came. As
        # long as a new connection is older than the last one in line, the listener goes
        # again at once (the backlog may hold more of them): a backlog of requests that
        # waited drains as fast as they are answered, and one that came while the line
        # waited goes behind it, without overtaking requests that waited longer.
        waited = kernel_queue_time(conn.sock) if has_data(conn.sock) else None
        if waited is None:
            super()._accepted(conn, listener)  # parked until its request comes
            return
        since = conn.since = time.monotonic() - waited
        ready = self.ready
        index = len(ready)
        while index:
            before = ready[index - 1]
            if isinstance(before, _Connection) and before.since <= since:
                break
            index -= 1
        listener.in_line = True
        if index == 0:  # nothing in line came before it
            self.enqueue_req(conn)
            ready.appendleft(listener)
        elif index == len(ready):  # the youngest: the backlog holds younger ones only
            ready.append(conn)
            ready.insert(1, listener)
        else:
            ready.insert(index, conn)
            ready.appendleft(listener)

    def retire_done(self, now: float) -> bool:
        # A request past its deadline holds the only thread that serves: the parked
        # connections wait for nothing the worker can still do.
        requests = self._deadlines
        return requests is not None and requests.counts()[1] > 0
