"""Worker classes by name: microsvc's, each recycling by memory and lifetime
(`microsvc.workers.recycling`) on top of gunicorn's worker or microsvc's own.

Values are dotted paths, so a worker module (and gevent or eventlet with it) is only
imported in the mode that uses it."""

from __future__ import annotations

from microsvc.options import WorkerClass

WORKER_CLASSES: dict[WorkerClass, str] = {
    WorkerClass.SYNC: "microsvc.workers.sync.SyncWorker",
    WorkerClass.GTHREAD: "microsvc.workers.gthread.BalancedThreadWorker",
    WorkerClass.GEVENT: "microsvc.workers.gevent.GeventWorker",
    WorkerClass.EVENTLET: "microsvc.workers.eventlet.EventletWorker",
}
