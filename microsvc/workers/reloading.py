"""`--reload` without a blind spot after boot.

gunicorn's polling reloader notes each file's modification time on its first turn, in
its own thread, some time after the worker has loaded the app and started answering. A
file saved in between (an editor's save right after the server came up, a test that
edits the app once it answers) is noted with its new time and never reloaded.

`PrimedReloader` takes that first look in the worker itself, right after the app is
loaded and before the first request, so every save after the worker answered is seen.
`Reloading`, a mixin placed before a gunicorn worker class, puts it in place of
gunicorn's polling reloader; the inotify one is left alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.reloader import Reloader


class PrimedReloader(Reloader):  # type: ignore[misc]
    """gunicorn's polling reloader with its first look taken by `prime()`, in the
    calling thread. Calls `callback(filename)` when a file's time moves forward."""

    def __init__(
        self,
        extra_files: Iterable[str] = (),
        interval: float = 1,
        callback: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(extra_files=list(extra_files), interval=interval, callback=callback)
        self._mtimes: dict[str, float] = {}

    def prime(self) -> None:
        """Notes the time of every file the reloader watches now."""
        self.scan()

    def scan(self) -> None:
        """One turn: files seen for the first time are noted, changed ones reported."""
        mtimes = self._mtimes
        for filename in self.get_files():
            try:
                mtime = os.stat(filename).st_mtime
            except OSError:
                continue
            seen = mtimes.setdefault(filename, mtime)
            if mtime > seen and self._callback is not None:
                self._callback(filename)

    def run(self) -> None:
        while True:
            time.sleep(self._interval)
            self.scan()


class Reloading:
    """Mixin for a gunicorn worker class: with `--reload` and the polling engine, the
    reloader's first look is taken before the worker serves. Put it first."""

    # Provided by gunicorn's Worker.
    reloader: Any
    cfg: Any

    def load_wsgi(self) -> None:
        current: Any = getattr(self, "reloader", None)
        primed: PrimedReloader | None = None
        if type(current) is Reloader:
            # gunicorn made it just before and has not started it
            primed = PrimedReloader(
                extra_files=self.cfg.reload_extra_files or (),
                callback=current._callback,
            )
            self.reloader = primed
        super().load_wsgi()  # type: ignore[misc]
        if primed is not None:
            # after the load: a file with a syntax error was added as an extra file
            primed.prime()
