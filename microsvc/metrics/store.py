"""The metrics store: one server's directory of prometheus_client multiprocess files.

Every process that records metrics (the master and each worker) writes its own
memory-mapped files, `counter_<pid>.db`, `histogram_<pid>.db`, `gauge_<mode>_<pid>.db`,
into a directory private to the server (prometheus_client's multiprocess mode, selected
by PROMETHEUS_MULTIPROC_DIR). A scrape sums the files.

Workers come and go (recycling, reloads, crashes), so files of dead processes would pile
up. `compact()` folds them away; what a dead process's values become depends on what
they mean:

- counters, histograms, summaries: added into one `<type>_archive.db` per type, so no
  total changes;
- gauges in mode `sum`, `min`, `max`, `mostrecent` (values that prometheus_client keeps
  for dead processes): folded into one `gauge_<mode>_archive.db` per mode by the mode's
  own rule (added, the lower, the higher, the later one), so the exported value is the
  one prometheus_client would give with every file kept;
- gauges in mode `all` and `liveall` (one series per process, labelled by pid) and the
  `live*` modes: deleted, as prometheus_client's `mark_process_dead` does for `live*`.
  A series labelled with the pid of a process that has ended would only grow the
  number of series, by one per replaced worker, forever.

Gauges of a mode this module does not know are left as they are. So the files are
those of live processes plus at most one archive per type and gauge mode, however
often workers are replaced. Compaction holds an exclusive lock on the directory and a
scrape holds a shared one (`reading()`), so a scrape never sees a value both in the
archive and in its original file.

The metrics exporter process, which shares no log with the master, leaves a note with
the reason when it fails (`note_exit`); the master takes it when it restarts the
exporter (`take_exit_note`). Workers leave none: the master decides memory and lifetime
recycles itself, and reads a worker's own reason (max-requests) from its scoreboard
slot.

Values a process writes on every request (the request metrics) skip prometheus_client's
per-value path (a lock, a fork check and a struct packed per write): `InPlaceValues`
maps the process's own files a second time and hands out each value's place there, so
a write is one float added in shared memory. prometheus_client still creates every
key (it owns the layout of the files); the values are in the files the moment they are
written, so a process killed with SIGKILL loses none it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.mmap_dict import MmapedDict

from microsvc.observe.scoreboard import process_running

#: The process-id part of the archive files' names.
ARCHIVE = "archive"
#: Types whose values add up across processes.
ADDITIVE_TYPES = ("counter", "histogram", "summary")
#: Gauge modes whose values of dead processes are folded into an archive, by mode.
FOLDED_GAUGE_MODES = ("sum", "min", "max", "mostrecent")
#: Gauge modes whose values of dead processes are deleted.
DROPPED_GAUGE_MODES = ("all", "liveall", "livesum", "livemin", "livemax", "livemostrecent")

_LOCK_NAME = ".lock"
_NOTE_SUFFIX = ".exit"
#: A values file starts with this many bytes of header (how much of it is used).
_HEADER_SIZE = 8


def _default_base() -> str:
    """RAM when possible: the files are written on every request."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def _sized(path: Path) -> bool:
    """Whether the file at `path` has its size: prometheus_client creates a file empty
    and only then sizes it, so a process starting now may have one that is too short to
    hold even the header. Files never shrink, so one that has its size keeps it."""
    try:
        return path.stat().st_size >= _HEADER_SIZE
    except FileNotFoundError:
        return False


def _values_in(path: Path) -> Iterator[tuple[str, float, float]]:
    """(key, value, timestamp) of every value in the file at `path`; none while the
    file has no size yet."""
    if not _sized(path):
        return
    for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
        yield key, value, timestamp


def _parse_name(name: str) -> tuple[str, str, str] | None:
    """(type, gauge mode or '', pid part) of `counter_12.db`, `gauge_livesum_12.db`."""
    if not name.endswith(".db"):
        return None
    parts = name[: -len(".db")].split("_")
    if len(parts) == 2:
        return parts[0], "", parts[1]
    if len(parts) == 3 and parts[0] == "gauge":
        return parts[0], parts[1], parts[2]
    return None


class MetricsStore:
    """The directory at `path` (which must exist)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_path = self.path / _LOCK_NAME
        self._archives: dict[str, MmapedDict] = {}

    @classmethod
    def create(cls, base: str | None = None) -> MetricsStore:
        """A new, empty directory under `base` (default /dev/shm, else the temp dir)."""
        return cls(tempfile.mkdtemp(prefix="microsvc-metrics-", dir=base or _default_base()))

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()
        self._archives.clear()

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold while collecting, so compaction does not run halfway through."""
        return self._locked(fcntl.LOCK_SH)

    def value_files(self) -> list[str]:
        """The files a scrape sums (hold `reading()`): every `*.db` file but those a
        starting process has created and not yet sized, which hold no values."""
        return [str(path) for path in sorted(self.path.glob("*.db")) if _sized(path)]

    # exit reasons

    def note_exit(self, pid: int, reason: str) -> None:
        """Called in the exporter process that is about to fail, with the reason."""
        final = self.path / f"{pid}{_NOTE_SUFFIX}"
        partial = self.path / f"{pid}{_NOTE_SUFFIX}.tmp"
        partial.write_text(reason)
        os.replace(partial, final)

    def take_exit_note(self, pid: int) -> str | None:
        """The reason a process noted before it stopped, once (None when it left none)."""
        note = self.path / f"{pid}{_NOTE_SUFFIX}"
        try:
            reason = note.read_text().strip()
        except FileNotFoundError:
            return None
        note.unlink(missing_ok=True)
        return reason or None

    # compaction

    def process_files(self) -> dict[int, list[Path]]:
        """The files compaction folds away or deletes, by process id: counters,
        histograms, summaries and gauges of the modes it knows."""
        found: dict[int, list[Path]] = {}
        for path in self.path.glob("*.db"):
            parsed = _parse_name(path.name)
            if parsed is None or not parsed[2].isdigit():
                continue
            kind, mode, pid = parsed
            if kind in ADDITIVE_TYPES or (
                kind == "gauge" and mode in FOLDED_GAUGE_MODES + DROPPED_GAUGE_MODES
            ):
                found.setdefault(int(pid), []).append(path)
        return found

    def compact(self, *, keep: frozenset[int] = frozenset()) -> list[int]:
        """Fold away the files of every process that is not running (and not in
        `keep`); returns their process ids."""
        dead = {
            pid: paths
            for pid, paths in self.process_files().items()
            if pid not in keep and not process_running(pid)
        }
        if not dead:
            return []
        with self._locked(fcntl.LOCK_EX):
            for paths in dead.values():
                for path in paths:
                    self._fold(path)
        return sorted(dead)

    def _fold(self, path: Path) -> None:
        parsed = _parse_name(path.name)
        assert parsed is not None
        kind, mode, _ = parsed
        if kind in ADDITIVE_TYPES:
            archive = self._archive(kind)
            for key, value, _timestamp in _values_in(path):
                if value:
                    current, timestamp = archive.read_value(key)
                    archive.write_value(key, current + value, timestamp)
                else:
                    archive.read_value(key)  # keep the series, at zero
        elif mode in FOLDED_GAUGE_MODES:
            self._fold_gauge(path, mode)
        path.unlink(missing_ok=True)

    def _fold_gauge(self, path: Path, mode: str) -> None:
        archive = self._archive(f"gauge_{mode}")
        kept = {key: (value, timestamp) for key, value, timestamp in archive.read_all_values()}
        for key, value, timestamp in _values_in(path):
            old = kept.get(key)
            if old is None:
                new = (value, timestamp)
            elif mode == "sum":
                new = (old[0] + value, old[1])
            elif mode == "min":
                new = (value, timestamp) if value < old[0] else old
            elif mode == "max":
                new = (value, timestamp) if value > old[0] else old
            else:  # mostrecent: the value set last (prometheus_client stamps each set)
                new = (value, timestamp) if timestamp > old[1] else old
            if new != old:
                archive.write_value(key, *new)
                kept[key] = new

    def _archive(self, prefix: str) -> MmapedDict:
        """The archive file of a type (`counter`) or gauge mode (`gauge_max`)."""
        archive = self._archives.get(prefix)
        if archive is None:
            name = f"{prefix}_{ARCHIVE}.db"
            archive = self._archives[prefix] = MmapedDict(str(self.path / name))
        return archive


class InPlaceValues:
    """Values of this process's prometheus_client multiprocess files, to write in place.

    `place(value)` takes a value object of prometheus_client's multiprocess mode (the
    `_value` of a counter or gauge, the `_sum` or one of the `_buckets` of a histogram)
    and returns a view of its file as doubles and the index of the value in it, so that
    `view[index] += amount` is the write. Only the process that owns the file may
    write it, and only while nothing else writes the same value: the metric object
    keeps its own copy of the value and would write that back on its next `inc()`.

    A view stays valid while the file grows: it maps the part that existed when it was
    made, and a value never moves. Views made before a fork map the parent's files:
    drop them (and the places handed out) in the child. `place` returns None for a
    value it cannot place (prometheus_client without multiprocess mode, or with a
    layout this module does not know); write that one through its metric.
    """

    def __init__(self) -> None:
        self._views: dict[str, memoryview[float]] = {}

    def place(self, value: Any) -> tuple[memoryview[float], int] | None:
        try:
            value.get()  # after a fork, prometheus_client moves to this process's files here
            values = value._file
            position = values._positions[value._key]
            path = values._fname
        except (AttributeError, KeyError, TypeError):
            return None
        if not isinstance(path, str) or not isinstance(position, int) or position % 8:
            return None
        view = self._views.get(path)
        if view is None or len(view) * 8 < position + 8:
            view = self._views[path] = _map_doubles(path)
        return view, position // 8

    def forget(self) -> None:
        """Drop every view (in a child after a fork); places handed out stay usable in
        the parent only."""
        self._views.clear()


def _map_doubles(path: str) -> memoryview[float]:
    """The whole file at `path`, mapped shared, as doubles."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, size - size % 8, access=mmap.ACCESS_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the file
    return memoryview(mapped).cast("d")
