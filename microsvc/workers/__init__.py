"""Worker classes by name: microsvc's, each recycling by memory and lifetime
(`microsvc.workers.recycling`) on top of gunicorn's worker or microsvc's own.

`WORKER_CLASSES` serve with gunicorn's request path (`--http-engine gunicorn`),
`ENGINE_WORKER_CLASSES` with microsvc's HTTP engine (`--http-engine microsvc`, the
default; see `microsvc.workers.engine`).

Values are dotted paths, so a worker module (and gevent or eventlet with it) is only
imported in the mode that uses it."""

from __future__ import annotations

from microsvc.config.options import HttpEngine, WorkerClass

WORKER_CLASSES: dict[WorkerClass, str] = {
    WorkerClass.SYNC: "microsvc.workers.sync.SyncWorker",
    WorkerClass.GTHREAD: "microsvc.workers.gthread.BalancedThreadWorker",
    WorkerClass.GEVENT: "microsvc.workers.gevent.GeventWorker",
    WorkerClass.EVENTLET: "microsvc.workers.eventlet.EventletWorker",
}

ENGINE_WORKER_CLASSES: dict[WorkerClass, str] = {
    WorkerClass.SYNC: "microsvc.workers.sync.EngineSyncWorker",
    WorkerClass.GTHREAD: "microsvc.workers.gthread.EngineThreadWorker",
    WorkerClass.GEVENT: "microsvc.workers.gevent.EngineGeventWorker",
    WorkerClass.EVENTLET: "microsvc.workers.eventlet.EngineEventletWorker",
}


def worker_class_path(worker_class: WorkerClass, engine: HttpEngine) -> str:
    """The dotted path of the worker class that serves `worker_class` with `engine`."""
    table = ENGINE_WORKER_CLASSES if engine == HttpEngine.MICROSVC else WORKER_CLASSES
    return table[worker_class]
