"""gthread that uses all its workers.

gunicorn's gthread worker accepts connections until it holds `worker_connections`
(1000) of them, so under keep-alive one worker takes most clients while the others
idle. microsvc runs gthread with `worker_connections` equal to `threads`: a worker
accepts a connection only while it has a free thread, so connections spread over all
workers. The price is that a gthread worker does not keep idle connections open.

It also recycles by memory and lifetime (see `recycling`).
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from microsvc.workers.recycling import Recycling


class BalancedThreadWorker(Recycling, ThreadWorker):  # type: ignore[misc]
    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.worker_connections > cfg.threads:
            super().check_config(cfg, log)

    def _wake(self) -> None:
        # A request thread recycled the worker: wake the main loop from its poll.
        if self.poller is not None:
            self.method_queue.defer(lambda: None)
