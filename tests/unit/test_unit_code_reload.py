"""--reload: the polling reloader's first look is taken before the worker serves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gunicorn.reloader import Reloader

from microsvc.workers.reloading import PrimedReloader, Reloading


def _saved_later(path: Path) -> None:
    """A save after the first look (a clearly later modification time)."""
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))


def test_a_save_after_priming_is_reported_on_the_first_turn(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("x = 1\n")
    changed: list[str] = []
    reloader = PrimedReloader(extra_files=[str(app)], callback=changed.append)
    reloader.prime()
    _saved_later(app)
    reloader.scan()
    assert changed == [str(app)]


def test_unchanged_files_are_not_reported(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("x = 1\n")
    changed: list[str] = []
    reloader = PrimedReloader(extra_files=[str(app)], callback=changed.append)
    reloader.prime()
    reloader.scan()
    reloader.scan()
    assert changed == []


class _GunicornWorker:
    """The part of gunicorn's Worker that Reloading uses."""

    def __init__(self, extra_files: list[str], loaded: list[str]) -> None:
        self.cfg = type("Cfg", (), {"reload_extra_files": extra_files})()
        self.loaded = loaded
        self.reloader: Any = Reloader(extra_files=extra_files, callback=self.changed)
        self.changes: list[str] = []

    def changed(self, filename: str) -> None:
        self.changes.append(filename)

    def load_wsgi(self) -> None:
        # as gunicorn does for an app file with a syntax error
        for filename in self.loaded:
            self.reloader.add_extra_file(filename)


class _Worker(Reloading, _GunicornWorker):
    pass


def test_the_worker_replaces_gunicorns_polling_reloader_and_primes_it(tmp_path: Path) -> None:
    """gunicorn's own reloader would note the saved file's new time on its first turn
    and never report it."""
    extra = tmp_path / "settings.toml"
    broken = tmp_path / "app.py"
    extra.write_text("a = 1\n")
    broken.write_text("def (\n")
    worker = _Worker([str(extra)], loaded=[str(broken)])
    worker.load_wsgi()
    assert isinstance(worker.reloader, PrimedReloader)
    _saved_later(extra)
    _saved_later(broken)
    worker.reloader.scan()
    assert sorted(worker.changes) == sorted([str(extra), str(broken)])


def test_other_reloaders_are_left_alone() -> None:
    worker = _Worker([], loaded=[])
    other = object()
    worker.reloader = other
    worker.load_wsgi()
    assert worker.reloader is other
