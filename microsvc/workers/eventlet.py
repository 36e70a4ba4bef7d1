"""An eventlet worker for gunicorn 27, which no longer ships one.

Built on gunicorn's `AsyncWorker`, which parses HTTP and runs the app; this module adds
the eventlet parts: a fresh hub after fork, green listening sockets, a green pool of
`worker_connections` greenthreads, a yield after each response so that busy keep-alive
connections cannot starve the others, and a graceful stop that lets in-flight requests
finish within `graceful_timeout`. It recycles by memory and lifetime like the other
worker classes (see `recycling`). eventlet itself is unmaintained: prefer gevent.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any

import eventlet
import eventlet.greenthread
import eventlet.hubs
from eventlet.greenio import GreenSocket
from eventlet.greenpool import GreenPool
from gunicorn.workers.base_async import AsyncWorker

from microsvc.workers.recycling import Recycling

_ACCEPT_RETRY = (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK, errno.EINTR)


class EventletWorker(Recycling, AsyncWorker):  # type: ignore[misc]
    def init_process(self) -> None:
        eventlet.monkey_patch()
        # The hub's epoll object was created in the master; a forked child must not share it.
        eventlet.hubs.use_hub()
        self.cfg.set("sendfile", False)  # os.sendfile blocks the hub on a green socket
        super().init_process()

    def timeout_ctx(self) -> Any:
        return eventlet.Timeout(self.cfg.keepalive or None, False)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(True)
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

    def _accept_loop(self, listener: GreenSocket, pool: GreenPool) -> None:
        while self.alive:
            try:
                client, addr = listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    continue
                if not self.alive:
                    return
                raise
            # Blocks while the pool is full, so a busy worker stops accepting.
            pool.spawn_n(self.handle, listener, client, addr)

    def run(self) -> None:
        pool = GreenPool(self.worker_connections)
        listeners = [GreenSocket(s.sock if hasattr(s, "sock") else s) for s in self.sockets]
        acceptors = [eventlet.spawn(self._accept_loop, listener, pool) for listener in listeners]

        while self.alive:
            self.notify()
            eventlet.sleep(1.0)

        for acceptor in acceptors:
            acceptor.kill()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while pool.running() and time.monotonic() < deadline:
            self.notify()
            eventlet.sleep(0.1)
        if pool.running():
            self.log.warning(
                "Worker graceful timeout (pid:%s), %d requests cut off", self.pid, pool.running()
            )
            for greenlet in list(pool.coroutines_running):
                eventlet.greenthread.kill(greenlet)
