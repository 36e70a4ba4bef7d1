"""A worker's writes to its scoreboard slot, on the request path (compiled with it).

`SlotWriter` is the worker's side of its slot in `microsvc.observe.scoreboard` (which
holds the rest of the layout, the master's side and the readers; the worker's parts are
laid out here): the worker's state, the requests
in flight with the oldest one shown, the requests served, the queue time of the last
request that had one. The HTTP engine calls it around each request (`Hooks.slot`), the
gunicorn engine through `ScoreboardApp`.

Each write is a seqlock write: the sequence counter made odd, the fields, the counter
made even. A counter is written with one 8-byte store (`counters`), never with
`struct.pack_into`, which clears the bytes it packs before it fills them: the counter
would read 0 for a moment, even, and a reader that saw 0 at both ends of a write would
take its torn fields for whole ones.

Threads of one worker (gthread) write under a lock of this process; green threads
(gevent, eventlet) never switch in the middle of a write and take none. A signal
handler (worker_int, worker_abort) that interrupts a write of its own thread leaves the
slot alone (`writing`): its state goes out with the next write.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from typing import Final

#: A worker's states, as its slot holds them, and their names.
STATES: Final = ("free", "booting", "idle", "busy", "stopping")
FREE: Final = 0
BOOTING: Final = 1
IDLE: Final = 2
BUSY: Final = 3
STOPPING: Final = 4

#: Each part of the scoreboard starts with its sequence counter (the seqlock).
SEQ: Final = struct.Struct("=Q")
# The worker part, at the slot's start: pid, generation, started, stop reason; then what
# changes with each request: state, in flight, requests, start of the request shown (0:
# none), and that request's method, path and request id.
W_STATIC: Final = struct.Struct("=i I d 16s")
W_DYN: Final = struct.Struct("=B I Q d")
W_DYNREQ: Final = struct.Struct("=B I Q d 16s 192s 64s")
WORKER: Final = struct.Struct("=i I d 16s B I Q d 16s 192s 64s")
DYN_AT: Final = SEQ.size + W_STATIC.size
# The queue part, in the worker's half of its slot: pid, queue time of its last request
# that had one, when (epoch seconds), requests it shed.
QUEUE: Final = struct.Struct("=i d d Q")
QUEUE_AT: Final = 448
assert SEQ.size + WORKER.size <= QUEUE_AT
assert STATES[FREE] == "free" and STATES[STOPPING] == "stopping"

_SEQ_SIZE: Final = SEQ.size
_ENCODING: Final = "latin-1"


def counters(buffer: mmap.mmap) -> memoryview:
    """`buffer` as 8-byte words: item `offset // SEQ.size` is the sequence counter at
    `offset` (a multiple of 8), written with one store."""
    return memoryview(buffer).cast("Q")


class SlotWriter:
    """Writes one worker's slot: `request_started` / `request_ended` around each request,
    `note_queue` for a request's queue time, `set_state` for the worker's state."""

    def __init__(
        self,
        buffer: mmap.mmap,
        offset: int,
        pid: int,
        generation: int,
        threads: bool,
        state: int,
    ) -> None:
        assert offset % SEQ.size == 0, offset
        self.buffer = buffer
        self.offset = offset
        self.counters = counters(buffer)
        self.seq_at = offset // SEQ.size
        self.queue_seq_at = (offset + QUEUE_AT) // SEQ.size
        self.pid = pid
        self.generation = generation
        self.threads = threads
        self.started = time.time()
        self.state = state
        self.requests = 0
        self.stop_reason = b""
        # requests in progress, by token: (start, method, path, request id)
        self.active: dict[int, tuple[float, bytes, bytes, bytes]] = {}
        self.shown = 0
        self.shown_since = 0.0
        self.last_token = 0  # tokens are 1, 2, ... (0: none)
        self.lock = threading.Lock()
        self.writing = False
        seq: int = self.counters[self.seq_at]
        self.seq = seq + (seq & 1)
        seq = self.counters[self.queue_seq_at]
        self.queue_seq = seq + (seq & 1)
        self.shed_total = 0

    def release(self) -> None:
        """Lets the buffer be closed (nothing is written after)."""
        self.counters.release()

    # the request path

    def begin(self, method: str, path: str, request_id: str) -> int:
        """A request begins (text fields); returns its token for `request_ended`."""
        return self.request_started(
            method.encode(_ENCODING, "replace"),
            path.encode(_ENCODING, "replace"),
            request_id.encode(_ENCODING, "replace"),
        )

    def request_started(self, method: bytes, path: bytes, request_id: bytes) -> int:
        """A request begins; returns its token for `request_ended`. The fields are cut to
        their size in the slot (16, 192 and 64 bytes)."""
        entry = (time.time(), method, path, request_id)
        if self.threads:
            with self.lock:
                return self._begin(entry)
        return self._begin(entry)

    def _begin(self, entry: tuple[float, bytes, bytes, bytes]) -> int:
        # A counter, not the entry's id(): compiled, the tuple is unboxed and a boxed copy
        # made for id() is freed at once, so two requests could get the same address.
        token = self.last_token = self.last_token + 1
        self.writing = True
        counters, at = self.counters, self.seq_at
        self.seq += 1
        counters[at] = self.seq
        active = self.active
        active[token] = entry
        if self.state == IDLE:
            self.state = BUSY
        if len(active) == 1:
            self.shown, self.shown_since = token, entry[0]
            self._write_requests(entry)
        else:
            self._write_requests(None)
        self.seq += 1
        counters[at] = self.seq
        self.writing = False
        return token

    def _write_requests(self, shown: tuple[float, bytes, bytes, bytes] | None) -> None:
        """The fields that change with each request (inside a write): with `shown`, the
        request shown is written too (it changed)."""
        buffer, at, active = self.buffer, self.offset + DYN_AT, self.active
        if shown is None:
            W_DYN.pack_into(buffer, at, self.state, len(active), self.requests, self.shown_since)
        else:
            since, method, path, request_id = shown
            W_DYNREQ.pack_into(
                buffer, at, self.state, len(active), self.requests, since, method, path, request_id
            )

    def request_ended(self, token: int) -> None:
        if self.threads:
            with self.lock:
                self._end(token)
        else:
            self._end(token)

    def _end(self, token: int) -> None:
        self.writing = True
        counters, at = self.counters, self.seq_at
        self.seq += 1
        counters[at] = self.seq
        active = self.active
        active.pop(token, None)
        self.requests += 1
        if not active:
            if self.state == BUSY:
                self.state = IDLE
            self.shown, self.shown_since = 0, 0.0
            self._write_requests(None)
        elif token == self.shown:
            self.shown = shown = next(iter(active))
            entry = active[shown]
            self.shown_since = entry[0]
            self._write_requests(entry)
        else:
            self._write_requests(None)
        self.seq += 1
        counters[at] = self.seq
        self.writing = False

    def note_queue(self, seconds: float, shed: bool) -> None:
        """A request waited `seconds` before it was taken up (`shed`: and was answered
        503 for it)."""
        if self.threads:
            with self.lock:
                self._note_queue(seconds, shed)
        else:
            self._note_queue(seconds, shed)

    def _note_queue(self, seconds: float, shed: bool) -> None:
        if shed:
            self.shed_total += 1
        buffer, offset = self.buffer, self.offset + QUEUE_AT
        self.queue_seq += 1
        self.counters[self.queue_seq_at] = self.queue_seq
        QUEUE.pack_into(buffer, offset + _SEQ_SIZE, self.pid, seconds, time.time(), self.shed_total)
        self.queue_seq += 1
        self.counters[self.queue_seq_at] = self.queue_seq

    # the worker's state

    def set_state(self, state: int, stop_reason: bytes | None = None) -> None:
        """The worker's state (and why it stops). Safe in a signal handler: it never
        waits long for the lock, nor writes over a write it interrupted."""
        if stop_reason is not None:
            self.stop_reason = stop_reason
        if not self.threads:
            if self.writing:
                self.state = state
            else:
                self._write_worker(state)
            return
        if not self.lock.acquire(timeout=0.05):
            self.state = state
            return
        try:
            self._write_worker(state)
        finally:
            self.lock.release()

    def _write_worker(self, state: int) -> None:
        self.writing = True
        self.state = state
        shown = self.active.get(self.shown)
        since, method, path, request_id = shown if shown else (0.0, b"", b"", b"")
        buffer, offset = self.buffer, self.offset
        self.seq += 1
        self.counters[self.seq_at] = self.seq
        WORKER.pack_into(
            buffer,
            offset + _SEQ_SIZE,
            self.pid,
            self.generation,
            self.started,
            self.stop_reason,
            state,
            len(self.active),
            self.requests,
            since,
            method,
            path,
            request_id,
        )
        self.seq += 1
        self.counters[self.seq_at] = self.seq
        self.writing = False
