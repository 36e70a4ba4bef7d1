"""microsvc: run Flask and any WSGI microservice in production on Gunicorn.

from microsvc import Launcher
Launcher("myapp:app", workers="auto", worker_class="gevent").run()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microsvc._version import __version__
from microsvc.config.keywords import LauncherOptions
from microsvc.config.options import HttpEngine, Settings, WorkerClass
from microsvc.errors import (
    AppImportError,
    AppLoadError,
    BindError,
    MicrosvcError,
    MissingExtraError,
    ServerError,
    UsageError,
)
from microsvc.planning.plan import SystemFacts, WorkerPlan, plan_workers

if TYPE_CHECKING:
    from microsvc.serving.launcher import Launcher, UnpatchedAppWarning


def __getattr__(name: str) -> Any:
    # Launcher imports gunicorn; loading it on first use lets the CLI monkey-patch first.
    if name in ("Launcher", "UnpatchedAppWarning"):
        from microsvc.serving import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module 'microsvc' has no attribute {name!r}")


__all__ = [
    "AppImportError",
    "AppLoadError",
    "BindError",
    "HttpEngine",
    "Launcher",
    "LauncherOptions",
    "MicrosvcError",
    "MissingExtraError",
    "ServerError",
    "Settings",
    "SystemFacts",
    "UnpatchedAppWarning",
    "UsageError",
    "WorkerClass",
    "WorkerPlan",
    "__version__",
    "plan_workers",
]
