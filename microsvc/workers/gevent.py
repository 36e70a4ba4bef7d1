"""gunicorn's gevent worker, recycled by memory and lifetime (see `recycling`).

Importing this module imports gevent: only gevent mode loads it.
"""

from __future__ import annotations

from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

from microsvc.workers.recycling import Recycling


class GeventWorker(Recycling, _GunicornGeventWorker):  # type: ignore[misc]
    """Its run loop calls notify() every second, idle or not."""
