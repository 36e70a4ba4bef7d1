"""What a gunicorn worker or arbiter serves under microsvc: the `Launcher`'s settings.

gunicorn hands its application to the arbiter and to every worker as `.app`; under
microsvc that is the `Launcher`, whose `settings` are what workers and the arbiter read
(`--max-worker-memory`, `--request-timeout`, ...). `settings_of(app)` is the one typed
way to get them; under another gunicorn application (a microsvc worker class run by
plain gunicorn) it gives None.
"""

from __future__ import annotations

from microsvc.config.options import Settings


def settings_of(app: object) -> Settings | None:
    """microsvc's settings in force for `app` (a worker's or the arbiter's `.app`), or
    None when `app` carries none."""
    settings = getattr(app, "settings", None)
    return settings if isinstance(settings, Settings) else None
