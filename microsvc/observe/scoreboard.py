"""The scoreboard: a small shared-memory table of what each worker is doing.

One file per server, `microsvc-<master pid>.scoreboard` in the runtime directory
(`runtime_dir()`), mapped by the master before it forks, so every worker shares it; the
metrics exporter and `microsvc status` map the same file by name. It holds:

- a header the master writes: master pid, start time, worker class, HTTP engine, the
  listen addresses with their accept-queue length and limit (read from the kernel with
  `TCP_INFO` once a second), workers recycled by reason, and with `--autoscale` its
  bounds, the worker count it keeps and the reason of its last change;
- one fixed-size slot per worker. Each slot has a worker part, written only by the worker
  that owns it (pid, generation, state, requests served, requests in flight, the request
  in progress, why it is stopping), and a master part (pid, when the master asked it to
  stop and why, the last memory sample: own (USS), PSS, RSS, the last worker that left
  the slot and why). The worker part has a queue part too: the queue time of the
  worker's last request that had one, and how many requests it shed (see
  `microsvc.serving.middleware`).

Each part is guarded by a sequence counter (a seqlock): the writer makes the counter odd,
writes, and makes it even again; a reader copies the part and retries when the counter
was odd or changed meanwhile. No lock is shared between processes, so a worker killed
halfway through a write blocks nobody: its part reads as torn until the master, reaping
the pid, clears the slot.

Slots: `slot_count(workers)` (four times the planned workers, at least 64), so reloads
(old and new workers side by side) and TTIN fit. A worker started when every slot is
taken serves as usual but has no slot: the header counts such workers (`unslotted`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from microsvc.http.slot import BOOTING, FREE, IDLE, STATES, STOPPING, SlotWriter, counters
from microsvc.http.slot import QUEUE as _QUEUE
from microsvc.http.slot import QUEUE_AT as _QUEUE_AT
from microsvc.http.slot import SEQ as _SEQ
from microsvc.http.slot import WORKER as _WORKER
from microsvc.serving.patching import green_threads
from microsvc.wsgi import QUEUE_TIME_KEY, SHED_KEY, Environ, StartResponse, WSGIApp

MAGIC = b"MSVCSB02"
#: Why a worker ended, in order: counted in the header, and the metrics' exit reasons.
REASONS = (
    "max-requests",
    "memory",
    "lifetime",
    "reload",
    "shutdown",
    "scale-down",
    "timeout",
    "crash",
)
UNKNOWN = 255
MAX_LISTENERS = 4
SUFFIX = ".scoreboard"

# header: magic, slots, slot size, master pid, unslotted, started, updated,
# worker class, engine, recycled by reason, then per listener: address, queue, limit
_HEADER_FIXED = struct.Struct("=8sIIiId d 32s 16s 8Q")
_LISTENER = struct.Struct("=96s i i")
_HEADER_SIZE = 1024
# after the listeners: --max-worker-memory (0: off)
_HEADER_ALL = struct.Struct(
    _HEADER_FIXED.format + "".join(_LISTENER.format.lstrip("=") for _ in range(MAX_LISTENERS)) + "Q"
)
assert _SEQ.size + _HEADER_ALL.size <= _HEADER_SIZE
# worker part and queue part: `microsvc.http.slot` (the worker writes them)
# master part: pid, generation, stop asked at, stop reason, own, pss (0: unknown), rss,
# sampled at, last pid, last reason, last exit at, measure of own (USS, RSS)
_MASTER = struct.Struct("=i I d 16s Q Q Q d i 16s d 4s")
_WORKER_AT = 0
_MASTER_AT = 512
SLOT_SIZE = 1024
assert _SEQ.size + _WORKER.size <= _MASTER_AT
assert _MASTER_AT + _SEQ.size + _MASTER.size <= SLOT_SIZE
assert _SEQ.size + _WORKER.size <= _QUEUE_AT
assert _QUEUE_AT + _SEQ.size + _QUEUE.size <= _MASTER_AT
# autoscale part, at the end of the header, written by the master (--autoscale; fewest 0:
# off): fewest, most and target workers, last change at (epoch seconds), its reason
_AUTOSCALE = struct.Struct("=i i i d 96s")
_AUTOSCALE_AT = 896
assert _SEQ.size + _HEADER_ALL.size <= _AUTOSCALE_AT
assert _AUTOSCALE_AT + _SEQ.size + _AUTOSCALE.size <= _HEADER_SIZE
# every sequence counter is an aligned 8-byte word (`counters`)
assert all(
    at % _SEQ.size == 0
    for at in (_HEADER_SIZE, SLOT_SIZE, _WORKER_AT, _MASTER_AT, _QUEUE_AT, _AUTOSCALE_AT)
)

#: How often a reader retries a part that is being written before it gives up on it.
READ_ATTEMPTS = 1000


class ScoreboardError(Exception):
    """The file is not a scoreboard, or cannot be read."""


def slot_count(workers: int) -> int:
    return max(64, 4 * workers)


def runtime_dir(create: bool = False) -> Path:
    """Where this user's servers keep their scoreboards: $XDG_RUNTIME_DIR, else
    /dev/shm/microsvc-UID (a directory of this user's, mode 0700), else ~/.microsvc."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        own = shm / f"microsvc-{os.getuid()}"
        if create:
            with contextlib.suppress(FileExistsError):
                own.mkdir(mode=0o700)
        with contextlib.suppress(OSError):
            info = os.lstat(own)
            if info.st_uid == os.getuid() and (info.st_mode & 0o077) == 0 and own.is_dir():
                return own
    home = Path.home() / ".microsvc"
    if create:
        home.mkdir(mode=0o700, exist_ok=True)
    return home


def scoreboard_path(pid: int, directory: Path | None = None) -> Path:
    return (directory or runtime_dir()) / f"microsvc-{pid}{SUFFIX}"


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _field(text: str, size: int) -> bytes:
    return text.encode("utf-8", "replace")[:size]


# reading


@dataclass
class Listener:
    address: str
    queue: int | None
    queue_limit: int | None


@dataclass
class WorkerView:
    slot: int
    pid: int
    generation: int
    state: str
    started: float
    requests: int
    in_flight: int
    request: dict[str, Any] | None
    stop_reason: str
    memory: dict[str, Any] | None
    last_exit: dict[str, Any] | None = None
    #: The queue time of the worker's last request that had one: seconds, at, and how
    #: many requests it shed (None: none yet).
    queue: dict[str, Any] | None = None


@dataclass
class Snapshot:
    master_pid: int
    started: float
    updated: float
    worker_class: str
    http_engine: str
    listeners: list[Listener]
    recycled: dict[str, int]
    unslotted: int
    workers: list[WorkerView] = field(default_factory=list)
    torn: int = 0
    #: --max-worker-memory, compared with each worker's own memory (None: off).
    max_worker_memory: int | None = None
    #: --autoscale: fewest, most, target, changed (epoch seconds), reason (None: off).
    autoscale: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scoreboard:
    """A scoreboard file, mapped. `create` makes a new one (the master); `open` maps an
    existing one (any reader)."""

    def __init__(self, path: Path, buffer: mmap.mmap, slots: int) -> None:
        self.path = path
        self.buffer = buffer
        self.slots = slots
        # the sequence counters, written one store each (`microsvc.http.slot`); made by
        # the first write (a reader's buffer is read-only)
        self._counters: memoryview | None = None
        self.owner = os.getpid()
        # worker side (after fork): the slot and its writer (`microsvc.http.slot`)
        self._slot: int | None = None
        self._writer: SlotWriter | None = None
        # master side
        self._by_pid: dict[int, int] = {}
        self._pending: int | None = None
        self._recycled = dict.fromkeys(REASONS, 0)
        self._unslotted: set[int] = set()
        self._info: tuple[float, str, str] = (0.0, "", "")
        self._listeners: list[Listener] = []
        #: --max-worker-memory as the master applies it (published with the header).
        self.max_worker_memory: int | None = None

    @property
    def reserved(self) -> int | None:
        """The slot `reserve` chose for the worker being forked."""
        return self._pending

    # creating and opening

    @classmethod
    def create(
        cls,
        slots: int,
        *,
        worker_class: str,
        http_engine: str,
        directory: Path | None = None,
    ) -> Scoreboard:
        """A new scoreboard for this process (the master), readable by this user only.
        It appears under its name only once its header is written."""
        path = scoreboard_path(os.getpid(), directory or runtime_dir(create=True))
        partial = path.with_name(path.name + ".new")
        size = _HEADER_SIZE + slots * SLOT_SIZE
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        board = cls(path, buffer, slots)
        board._info = (time.time(), worker_class, http_engine)
        board.publish_header()
        try:
            os.replace(partial, path)
        except OSError:
            board.close()
            partial.unlink(missing_ok=True)
            raise
        return board

    @classmethod
    def open(cls, path: Path) -> Scoreboard:
        """Map an existing scoreboard for reading. Raises ScoreboardError."""
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size < _HEADER_SIZE:
                    raise ScoreboardError(f"{path} is not a microsvc scoreboard")
                buffer = mmap.mmap(file.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:
            raise ScoreboardError(f"cannot read {path}: {exc.strerror or exc}") from None
        magic, slots, slot_size = struct.unpack_from("=8sII", buffer, _SEQ.size)
        if magic != MAGIC or slot_size != SLOT_SIZE or size < _HEADER_SIZE + slots * SLOT_SIZE:
            buffer.close()
            raise ScoreboardError(f"{path} is not a microsvc scoreboard of this version")
        return cls(path, buffer, slots)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
        if self._counters is not None:
            self._counters.release()
        with contextlib.suppress(BufferError, ValueError):
            self.buffer.close()

    def remove(self) -> None:
        """In the master when the server stops."""
        if os.getpid() == self.owner:
            self.path.unlink(missing_ok=True)
        self.close()

    # seqlock

    def _write(self, offset: int, packer: struct.Struct, *values: Any) -> None:
        words = self._counters
        if words is None:
            words = self._counters = counters(self.buffer)
        at = offset // _SEQ.size
        seq: int = words[at]
        seq += 1 if seq % 2 == 0 else 0  # odd: being written (also after a writer died)
        words[at] = seq
        packer.pack_into(self.buffer, offset + _SEQ.size, *values)
        words[at] = seq + 1

    def _read(self, offset: int, packer: struct.Struct) -> tuple[Any, ...] | None:
        """The part at `offset`, or None when every attempt found it being written."""
        buffer = self.buffer
        end = offset + _SEQ.size + packer.size
        for attempt in range(READ_ATTEMPTS):
            before = _SEQ.unpack_from(buffer, offset)[0]
            if before % 2 == 0:
                raw = buffer[offset + _SEQ.size : end]
                if _SEQ.unpack_from(buffer, offset)[0] == before:
                    return packer.unpack(raw)
            if attempt > 10:
                time.sleep(0.0001)
        return None

    def _worker_offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * SLOT_SIZE + _WORKER_AT

    def _master_offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * SLOT_SIZE + _MASTER_AT

    # the master

    def publish_header(self) -> None:
        started, worker_class, engine = self._info
        values: list[Any] = [
            MAGIC,
            self.slots,
            SLOT_SIZE,
            self.owner,
            len(self._unslotted),
            started,
            time.time(),
            _field(worker_class, 32),
            _field(engine, 16),
            *(self._recycled[reason] for reason in REASONS),
        ]
        listeners = self._listeners[:MAX_LISTENERS]
        listeners += [Listener("", None, None)] * (MAX_LISTENERS - len(listeners))
        for listener in listeners:
            queue = -1 if listener.queue is None else listener.queue
            limit = -1 if listener.queue_limit is None else listener.queue_limit
            values += [_field(listener.address, 96), queue, limit]
        values.append(self.max_worker_memory or 0)
        self._write(0, _HEADER_ALL, *values)

    def reserve(self, generation: int) -> int | None:
        """Before a fork: a free slot for the next worker, or None when all are taken."""
        taken = set(self._by_pid.values())
        for slot in range(self.slots):
            if slot not in taken:
                self._pending = slot
                self._write_master(slot, 0, generation, 0.0, b"", None)
                return slot
        self._pending = None
        return None

    def started(self, pid: int) -> None:
        """After a fork, in the master: the reserved slot is the worker `pid`'s."""
        slot, self._pending = self._pending, None
        if slot is None:
            self._unslotted.add(pid)
            self.publish_header()
            return
        self._by_pid[pid] = slot
        master = self._read(self._master_offset(slot), _MASTER)
        generation = master[1] if master else 0
        self._write_master(slot, pid, generation, 0.0, b"", None)

    def stopping(self, pid: int, reason: str) -> None:
        """The master asked worker `pid` to stop."""
        slot = self._by_pid.get(pid)
        if slot is None:
            return
        master = self._read(self._master_offset(slot), _MASTER)
        if master is None or master[2]:
            return
        memory = (*master[4:8], master[11])
        self._write_master(slot, pid, master[1], time.time(), _field(reason, 16), memory)

    def worker_reason(self, pid: int) -> str | None:
        """The reason worker `pid` gave for stopping on its own, if any."""
        slot = self._by_pid.get(pid)
        if slot is None:
            return None
        worker = self._read(self._worker_offset(slot), _WORKER)
        if worker is None or worker[0] != pid:
            return None
        return _text(worker[3]) or None

    def gone(self, pid: int, reason: str) -> None:
        """The master reaped worker `pid`: count why it ended and clear its slot."""
        self._recycled[reason if reason in REASONS else "crash"] += 1
        self._unslotted.discard(pid)
        slot = self._by_pid.pop(pid, None)
        if slot is not None:
            master = self._read(self._master_offset(slot), _MASTER)
            generation = master[1] if master else 0
            offset = self._worker_offset(slot)
            self._write(offset, _WORKER, 0, 0, 0.0, b"", FREE, 0, 0, 0.0, b"", b"", b"")
            self._write(
                self._master_offset(slot),
                _MASTER,
                0,
                generation,
                0.0,
                b"",
                0,
                0,
                0,
                0.0,
                pid,
                _field(reason, 16),
                time.time(),
                b"",
            )
        self.publish_header()

    def sample(
        self,
        listeners: Sequence[Any],
        memory: Mapping[int, MemorySample | None] | None = None,
    ) -> None:
        """Once a second in the master: memory of each worker (`memory`, by pid, when the
        master has read it already; else read here), the listen queues."""
        for pid, slot in list(self._by_pid.items()):
            sample = memory.get(pid) if memory is not None else read_memory(pid)
            master = self._read(self._master_offset(slot), _MASTER)
            if master is None or sample is None:
                continue
            self._write_master(slot, pid, master[1], master[2], master[3], sample)
        self._listeners = [listen_queue(listener) for listener in listeners]
        self.publish_header()

    def _write_master(
        self,
        slot: int,
        pid: int,
        generation: int,
        stop_at: float,
        reason: bytes,
        memory: MemorySample | tuple[int, int, int, float, bytes] | None,
    ) -> None:
        """`memory`: a new sample, the fields of the last one, or None (no sample)."""
        offset = self._master_offset(slot)
        last = self._read(offset, _MASTER)
        last_exit = tuple(last[8:11]) if last else (0, b"", 0.0)
        if memory is None:
            own, pss, rss, sampled, measure = 0, 0, 0, 0.0, b""
        elif isinstance(memory, MemorySample):
            own, pss, rss = memory.own, memory.pss or 0, memory.rss
            sampled, measure = memory.sampled, _field(memory.measure, 4)
        else:
            own, pss, rss, sampled, measure = memory
        self._write(
            offset,
            _MASTER,
            pid,
            generation,
            stop_at,
            reason,
            own,
            pss,
            rss,
            sampled,
            *last_exit,
            measure,
        )

    # a worker

    def attach(self, slot: int | None, generation: int, threads: bool | None = None) -> None:
        """In a worker just forked: take `slot` (None: no slot, nothing is written).
        `threads`: whether the worker's requests may run in several threads at once (None:
        unless `threading` is gevent's or eventlet's, whose green threads never switch in
        the middle of a write)."""
        self._slot = slot
        self._writer = None
        if slot is None:
            return
        self._writer = SlotWriter(
            self.buffer,
            self._worker_offset(slot),
            os.getpid(),
            generation,
            not green_threads() if threads is None else threads,
            BOOTING,
        )
        self._writer.set_state(BOOTING)

    @property
    def has_slot(self) -> bool:
        """In a worker: whether it writes a slot (see `attach`)."""
        return self._writer is not None

    @property
    def writer(self) -> SlotWriter | None:
        """In a worker with a slot: what writes it (the HTTP engine calls it directly)."""
        return self._writer

    def booted(self) -> None:
        if self._writer is not None:
            self._writer.set_state(IDLE)

    def worker_stopping(self, reason: str = "") -> None:
        """Safe in a signal handler (see `microsvc.http.slot`)."""
        if self._writer is not None:
            self._writer.set_state(STOPPING, _field(reason, 16) if reason else None)

    def request_started(self, method: bytes, path: bytes, request_id: bytes) -> int:
        """A request begins; returns its token for `request_ended` (0 without a slot)."""
        if self._writer is None:
            return 0
        return self._writer.request_started(method, path, request_id)

    def request_ended(self, token: int) -> None:
        if self._writer is not None:
            self._writer.request_ended(token)

    def note_queue(self, seconds: float, shed: bool) -> None:
        """In a worker: a request waited `seconds` before it was taken up (`shed`: and was
        answered 503 for it)."""
        if self._writer is not None:
            self._writer.note_queue(seconds, shed)

    def publish_autoscale(self, minimum: int, maximum: int, target: int, reason: str) -> None:
        """In the master: the bounds and the count --autoscale keeps, and why."""
        self._write(
            _AUTOSCALE_AT, _AUTOSCALE, minimum, maximum, target, time.time(), _field(reason, 96)
        )

    # reading

    def snapshot(self) -> Snapshot:
        """Everything, read without blocking any writer. Raises ScoreboardError when the
        header stays torn (its writer died mid-write)."""
        header = self._read(0, _HEADER_ALL)
        if header is None:
            raise ScoreboardError(f"{self.path}: the header is being written")
        (_, _, _, master_pid, unslotted, started, updated, worker_class, engine) = header[:9]
        recycled = dict(zip(REASONS, header[9:17], strict=True))
        listeners = []
        rest = header[9 + len(REASONS) :]
        for index in range(MAX_LISTENERS):
            address, queue, limit = rest[3 * index : 3 * index + 3]
            if address.strip(b"\0"):
                listeners.append(
                    Listener(
                        _text(address), None if queue < 0 else queue, None if limit < 0 else limit
                    )
                )
        snapshot = Snapshot(
            master_pid,
            started,
            updated,
            _text(worker_class),
            _text(engine),
            listeners,
            recycled,
            unslotted,
            max_worker_memory=header[-1] or None,
        )
        scaling = self._read(_AUTOSCALE_AT, _AUTOSCALE)
        if scaling is not None and scaling[0] > 0:
            fewest, most, target, changed, why = scaling
            snapshot.autoscale = {
                "min_workers": fewest,
                "max_workers": most,
                "target": target,
                "changed": changed,
                "reason": _text(why),
            }
        now = time.time()
        for slot in range(self.slots):
            view = self._slot_view(slot, now)
            if view == "torn":
                snapshot.torn += 1
            elif view is not None:
                assert not isinstance(view, str)
                snapshot.workers.append(view)
        return snapshot

    def _slot_view(self, slot: int, now: float) -> WorkerView | str | None:
        master = self._read(self._master_offset(slot), _MASTER)
        worker = self._read(self._worker_offset(slot), _WORKER)
        if master is None:
            return "torn"
        m_pid, generation, stop_at, stop_reason, own, pss, rss, sampled, *last, measure = master
        last_exit = (
            {"pid": last[0], "reason": _text(last[1]), "ended": last[2]} if last[0] else None
        )
        if worker is None:
            if not m_pid:
                return None
            # torn: its writer died mid-write; the master clears it when it reaps the pid
            worker = (m_pid, generation, 0.0, b"", UNKNOWN, 0, 0, 0.0, b"", b"", b"")
        w_pid, w_gen, started, reason, state, in_flight, requests, since, method, path, rid = worker
        pid = w_pid or m_pid
        if not pid:
            return None
        if w_pid != pid:  # forked, not yet written by the worker
            state, in_flight, started, requests, since = BOOTING, 0, 0.0, 0, 0.0
            method = path = rid = reason = b""
        if stop_at and state not in (FREE, UNKNOWN):
            state = STOPPING
        request = None
        if since:
            request = {
                "method": _text(method),
                "path": _text(path),
                "request_id": _text(rid) or None,
                "started": since,
                "seconds": max(0.0, now - since),
            }
        memory = None
        if sampled:
            memory = {
                "own": own,
                "shared": max(0, rss - own),
                "pss": pss or None,
                "rss": rss,
                "measure": _text(measure) or "USS",
                "sampled": sampled,
            }
        return WorkerView(
            slot=slot,
            pid=pid,
            generation=w_gen or generation,
            state=STATES[state] if state < len(STATES) else "unknown",
            started=started,
            requests=requests,
            in_flight=in_flight,
            request=request,
            stop_reason=_text(reason) or _text(stop_reason),
            memory=memory,
            last_exit=last_exit,
            queue=self._queue_view(slot, pid),
        )

    def _queue_view(self, slot: int, pid: int) -> dict[str, Any] | None:
        part = self._read(self._worker_offset(slot) + _QUEUE_AT, _QUEUE)
        if part is None or part[0] != pid or not part[2]:
            return None
        return {"seconds": part[1], "at": part[2], "shed": part[3]}


# what the master measures


@dataclass(frozen=True)
class MemorySample:
    """One reading of a process's memory, in bytes.

    `own`: what the process alone holds, its USS (unique set size: private pages, freed
    when it exits); RSS where the platform gives no USS, and then `measure` says "RSS".
    `pss`: its proportional set size (each shared page split among the processes that
    map it), None where the platform gives none. `shared`: resident pages others map
    too (RSS minus own)."""

    own: int
    pss: int | None
    rss: int
    measure: str
    sampled: float

    @property
    def shared(self) -> int:
        return max(0, self.rss - self.own)


def read_memory(pid: int) -> MemorySample | None:
    """The memory of process `pid`: from /proc/PID/smaps_rollup (Linux 4.14 and later),
    else from psutil (which reads /proc/PID/smaps on older Linux, and knows other
    platforms); None when it cannot be read (the process is gone, or not ours)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as file:
            text = file.read()
    except OSError:
        return _read_memory_psutil(pid)
    values: dict[bytes, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    if b"Rss" not in values:
        return _read_memory_psutil(pid)
    own = values.get(b"Private_Clean", 0) + values.get(b"Private_Dirty", 0)
    pss = values.get(b"Pss")
    return MemorySample(own, pss, values[b"Rss"], "USS", time.time())


def _read_memory_psutil(pid: int) -> MemorySample | None:
    import psutil

    try:
        process = psutil.Process(pid)
        try:
            full = process.memory_full_info()
        except psutil.AccessDenied:
            rss = int(process.memory_info().rss)
            return MemorySample(rss, None, rss, "RSS", time.time())
    except psutil.Error:
        return None
    uss = getattr(full, "uss", None)
    pss = getattr(full, "pss", None)
    if uss is None:
        return MemorySample(int(full.rss), pss, int(full.rss), "RSS", time.time())
    return MemorySample(int(uss), pss, int(full.rss), "USS", time.time())


def listen_queue(listener: Any) -> Listener:
    """A gunicorn listener's address, and for TCP its accept queue's length and limit:
    for a socket in LISTEN state Linux's TCP_INFO gives them as tcpi_unacked and
    tcpi_sacked."""
    address = str(listener)
    sock = getattr(listener, "sock", listener)
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return Listener(address, None, None)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
        queue, limit = struct.unpack_from("=II", info, 24)
    except (OSError, struct.error):
        return Listener(address, None, None)
    return Listener(address, queue, limit)


# the per-request wrapper


class _Body:
    __slots__ = ("board", "body", "token")

    def __init__(self, body: Iterable[bytes], board: Scoreboard, token: int) -> None:
        self.body = body
        self.board = board
        self.token = token

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            token, self.token = self.token, 0
            if token:
                self.board.request_ended(token)


class _SizedBody(_Body):
    """A body whose length the server can ask, as it could the app's (PEP 3333: a body
    of one block then gets a Content-Length instead of chunked encoding)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(cast(Sized, self.body))


class _ListBody(_SizedBody):
    """A list, the most common body: nothing to close."""

    __slots__ = ()

    def close(self) -> None:
        token, self.token = self.token, 0
        if token:
            self.board.request_ended(token)


class ScoreboardApp:
    """`app`, with each request noted in this worker's slot while it runs: method, path
    (no query string), X-Request-ID, start time."""

    def __init__(self, app: WSGIApp, board: Scoreboard) -> None:
        self.app = app
        self.board = board

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        board = self.board
        if board._slot is None:  # a worker without a slot: nothing to note
            return self.app(environ, start_response)
        raw = environ.get("RAW_URI")
        if raw:
            path = raw.partition("?")[0]
        else:
            path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        token = board.request_started(
            environ.get("REQUEST_METHOD", "").encode("latin-1", "replace"),
            path.encode("latin-1", "replace"),
            environ.get("HTTP_X_REQUEST_ID", "").encode("latin-1", "replace"),
        )
        try:
            body = self.app(environ, start_response)
        except BaseException:
            board.request_ended(token)
            raise
        waited = environ.get(QUEUE_TIME_KEY)
        if waited is not None and isinstance(waited, float):
            board.note_queue(waited, environ.get(SHED_KEY) is True)
        if type(body) is list:
            return _ListBody(body, board, token)
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(body, wrapper):
            board.request_ended(token)  # sent by the server with sendfile; close() is its
            return body
        return (_SizedBody if hasattr(body, "__len__") else _Body)(body, board, token)


# finding instances


def find_instances(directory: Path | None = None) -> dict[int, Path]:
    """Scoreboards of this user's running servers, by master pid. Files left by a
    master that no longer runs are removed."""
    directory = directory or runtime_dir()
    found: dict[int, Path] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if not (name.startswith("microsvc-") and name.endswith(SUFFIX)):
            continue
        number = name[len("microsvc-") : -len(SUFFIX)]
        if not number.isdigit():
            continue
        pid = int(number)
        if process_running(pid):
            found[pid] = entry
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return dict(sorted(found.items()))


def process_running(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
