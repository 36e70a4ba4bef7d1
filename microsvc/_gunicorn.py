"""The one place microsvc imports gunicorn's core.

gunicorn's config module reads WEB_CONCURRENCY with `int()` when it is imported, so a
bad value would be a traceback before microsvc could say which variable is wrong.
microsvc reads WEB_CONCURRENCY itself; it is hidden from gunicorn's import.
"""

from __future__ import annotations

import os

_web_concurrency = os.environ.pop("WEB_CONCURRENCY", None)
try:
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import KNOWN_SETTINGS, Config
    from gunicorn.errors import ConfigError
finally:
    if _web_concurrency is not None:
        os.environ["WEB_CONCURRENCY"] = _web_concurrency

__all__ = ["KNOWN_SETTINGS", "Arbiter", "BaseApplication", "Config", "ConfigError"]
