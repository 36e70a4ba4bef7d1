"""Monkey-patching for the cooperative worker classes, done in the master before the
app is imported, the checks that their packages are installed, and whether this
process's threads are green (`green_threads`, `eventlet_threads`)."""

from __future__ import annotations

import importlib.util
import sys
import warnings

from microsvc.config.options import WorkerClass
from microsvc.errors import MissingExtraError

#: Packages each worker class imports, and the extra that installs them.
REQUIRED_PACKAGES: dict[WorkerClass, tuple[str, ...]] = {
    WorkerClass.GEVENT: ("gevent", "packaging"),
    WorkerClass.EVENTLET: ("eventlet",),
}

PATCHING_CLASSES = (WorkerClass.GEVENT, WorkerClass.EVENTLET)


def require_extra(worker_class: WorkerClass) -> None:
    """Raise MissingExtraError naming the install command if a package is missing."""
    for package in REQUIRED_PACKAGES.get(worker_class, ()):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError(
                f"the {worker_class} worker class needs the {package!r} package: "
                f"pip install 'microsvc[{worker_class}]'"
            )


def is_patched(worker_class: WorkerClass) -> bool:
    if worker_class == WorkerClass.GEVENT:
        monkey = sys.modules.get("gevent.monkey")
        return bool(monkey and monkey.is_module_patched("socket"))
    if worker_class == WorkerClass.EVENTLET:
        patcher = sys.modules.get("eventlet.patcher")
        return bool(patcher and patcher.is_monkey_patched("socket"))
    return True


def eventlet_threads() -> bool:
    """Whether eventlet has patched `threading` in this process (its locks, queues and
    threads are then eventlet's)."""
    patcher = sys.modules.get("eventlet.patcher")
    return bool(patcher is not None and patcher.is_monkey_patched("thread"))


def green_threads() -> bool:
    """Whether `threading` is gevent's or eventlet's in this process."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return True
    return eventlet_threads()


def patch(worker_class: WorkerClass) -> None:
    """Patch the standard library for `worker_class`; a no-op for sync and gthread."""
    if worker_class not in PATCHING_CLASSES or is_patched(worker_class):
        return
    require_extra(worker_class)
    if worker_class == WorkerClass.GEVENT:
        from gevent import monkey

        monkey.patch_all()
    else:
        with warnings.catch_warnings():
            # microsvc says once, in the log, that eventlet is unmaintained.
            warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
            import eventlet
        # eventlet warns at every fork; forking workers is what gunicorn's master does.
        warnings.filterwarnings(
            "ignore", message=r"Using fork\(\) is a bad idea", category=DeprecationWarning
        )

        eventlet.monkey_patch()
