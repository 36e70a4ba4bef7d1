"""Worker classes by name: gunicorn's own where they serve, microsvc's where they do not."""

from __future__ import annotations

from microsvc.options import WorkerClass

WORKER_CLASSES: dict[WorkerClass, str] = {
    WorkerClass.SYNC: "gunicorn.workers.sync.SyncWorker",
    WorkerClass.GTHREAD: "microsvc.workers.gthread.BalancedThreadWorker",
    WorkerClass.GEVENT: "gunicorn.workers.ggevent.GeventWorker",
    WorkerClass.EVENTLET: "microsvc.workers.eventlet.EventletWorker",
}
