"""A Flask app that builds about 200 MB of Python objects at import, as an app with big
in-memory tables or caches does, and runs the garbage collector while it serves.

HEAP is 530,000 small dicts (BIGHEAP_ITEMS changes the count), each holding a list: a
container, so the collector keeps tracking the dict (CPython stops tracking a dict that
holds only strings and numbers, and a collection then never visits it). Each worker runs a
full collection (`gc.collect()`) on its first request and then every COLLECT_EVERY
requests, as the collector would on its own in a long-running worker: a collection
visits every object it tracks, and writing to an object's header copies its page out of
the memory the worker shares with the master after `--preload`.

GET / answers the worker's pid and how many collections it ran.
"""

from __future__ import annotations

import gc
import os

from flask import Flask

ITEMS = int(os.environ.get("BIGHEAP_ITEMS", "530000"))
COLLECT_EVERY = 50

HEAP = [{"id": index, "name": f"item-{index}", "tags": [index % 7]} for index in range(ITEMS)]

app = Flask(__name__)
_served = 0
_collections = 0


@app.get("/")
def index() -> dict[str, int]:
    global _served, _collections
    _served += 1
    if _served % COLLECT_EVERY == 1:
        gc.collect()
        _collections += 1
    return {"pid": os.getpid(), "collections": _collections, "items": len(HEAP)}
