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
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn import util
from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

from microsvc.workers.engine import EngineWorker
from microsvc.workers.recycling import Recycling


class SyncWorker(Recycling, _GunicornSyncWorker):  # type: ignore[misc]
    def wait(self, timeout: float) -> Any:
        # Idle, gunicorn's sync worker sleeps timeout/2 (15 s by default) between checks.
        return super().wait(self.check_interval(timeout))

    def _wake(self) -> None:
        if self.PIPE:
            with contextlib.suppress(OSError):
                os.write(self.PIPE[1], b"1")


class EngineSyncWorker(EngineWorker, SyncWorker):
    """The sync worker on microsvc's HTTP engine: one request per connection."""

    engine_keepalive = False

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        try:
            if self.cfg.is_ssl:
                client = gunicorn_sock.ssl_wrap_socket(client, self.cfg)
            self.serve_client(client, addr, listener.getsockname())
        except ssl.SSLError as exc:
            self.log.debug("TLS with %s failed: %s", addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        finally:
            util.close_graceful(client)
