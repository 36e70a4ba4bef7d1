"""The state the master shares with its workers, across a real fork."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
from gunicorn import arbiter as gunicorn_arbiter

from microsvc.config.options import Settings
from microsvc.observe.scoreboard import Scoreboard, read_memory
from microsvc.serving.arbiter import MicrosvcArbiter, ServerState
from microsvc.workers.recycling import Recycler


def test_ready_only_when_started_and_not_draining() -> None:
    state = ServerState()
    assert not state.is_ready()
    state.ready = True
    assert state.is_ready()
    state.draining = True
    assert not state.is_ready()


def test_flags_and_boot_count_cross_fork() -> None:
    state = ServerState()
    pid = os.fork()
    if pid == 0:  # a worker: boots, and sees what the master set before the fork
        state.worker_booted()
        os._exit(0 if not state.draining else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert state.booted == 1
    state.draining = True
    pid = os.fork()
    if pid == 0:
        os._exit(3 if state.draining else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


def _exit_code_after(state: ServerState, kill_at: int | None) -> int:
    """Fork a worker that reports its boot; with `kill_at`, SIGKILL it at that step
    (a Python call or return, or a call into C) inside `worker_booted`. Returns the
    child's wait status as an exit code: -9 when it was killed, else the number of
    steps `worker_booted` took."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        steps = 0

        def step(frame: types.FrameType, event: str, arg: object) -> None:
            nonlocal steps
            steps += 1
            if steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        sys.setprofile(step)
        state.worker_booted()
        sys.setprofile(None)
        os._exit(min(steps, 255))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_worker_killed_anywhere_inside_its_boot_report_blocks_no_later_boot() -> None:
    state = ServerState()
    steps = _exit_code_after(state, kill_at=None)
    assert 0 < steps < 255
    for kill_at in range(1, steps + 1):
        assert _exit_code_after(state, kill_at) == -signal.SIGKILL
        # A later worker boots, and the master counts: neither waits for the dead one.
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            state.worker_booted()
            os._exit(0 if state.booted >= 1 else 3)
        deadline = time.monotonic() + 15  # a hang detector, not a measurement
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"a worker killed at step {kill_at} of its boot report blocks others")
        assert os.waitstatus_to_exitcode(done[1]) == 0


def test_boots_are_counted_until_ready_only() -> None:
    state = ServerState()
    state.worker_booted()
    state.worker_booted()
    assert state.booted == 2
    state.ready = True
    for _ in range(100):  # replaced workers, once serving: nothing grows
        state.worker_booted()
    assert state.booted == 2


# recycling by memory and lifetime, decided in the master


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)

    def warning(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)


def bare_master(settings: object, board: Scoreboard | None = None) -> MicrosvcArbiter:
    """A MicrosvcArbiter with only what recycling uses (no gunicorn setup, no loop)."""
    master: MicrosvcArbiter = MicrosvcArbiter.__new__(MicrosvcArbiter)
    master.app = types.SimpleNamespace(settings=settings)
    master.cfg = types.SimpleNamespace(preload_app=False)
    master.log = FakeLog()
    master.WORKERS = {}
    master.LISTENERS = []
    master._stats = {"workers_killed": 0}
    master.metrics = None
    master.scoreboard = board
    master.recycler = Recycler()
    master._frozen = False
    master._stopping_for = "scale-down"
    master._stopped_for = {}
    return master


def fork_child(private_bytes: int) -> int:
    """A child that writes `private_bytes` of its own, says so on a pipe, and sleeps
    until a signal ends it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        kept = bytearray(private_bytes)
        for offset in range(0, private_bytes, 4096):
            kept[offset] = 1
        os.write(write_end, b"x")
        while True:
            time.sleep(1)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    return pid


def ended_by(pid: int) -> int:
    """Wait (at most 10 s, a hang detector) for child `pid`; its exit code."""
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not end")
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(done[1])


MiB = 1024**2
#: Written by the test process before it forks: every child maps it, none owns it.
SHARED_MB = 120
LIMIT = 50 * MiB


def test_the_master_recycles_by_own_memory_not_by_pages_shared_after_fork(
    tmp_path: Path,
) -> None:
    shared = bytearray(SHARED_MB * MiB)
    for offset in range(0, len(shared), 4096):
        shared[offset] = 1  # resident in this process, so in each child's RSS
    board = Scoreboard.create(8, worker_class="sync", http_engine="microsvc", directory=tmp_path)
    master = bare_master(replace(Settings(), max_worker_memory=LIMIT), board)
    sharer = leaker = 0
    # A collection in this (test) process would write to the pages of every object it
    # tracks, copying them, and a child's copies would become its own memory: tens of
    # MiB in a long-lived test process. Kept out of the collector while the children
    # live, as microsvc's master does with --preload.
    collecting = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        sharer, leaker = fork_child(MiB), fork_child(80 * MiB)
        for pid in (sharer, leaker):
            board.reserve(1)
            master.WORKERS[pid] = object()
            board.started(pid)
            master.recycler.started(pid, master.app.settings)
        sharer_memory = read_memory(sharer)
        assert sharer_memory is not None
        assert sharer_memory.rss > LIMIT > sharer_memory.own  # an RSS limit would recycle it

        master._sample_and_recycle()
        assert master.log.lines == [] and master._stopped_for == {}  # one read above: no
        master._sample_and_recycle()
        [line] = master.log.lines
        assert line.startswith(f"Recycling worker (pid: {leaker}): memory (USS) ")
        assert line.endswith("MiB above --max-worker-memory 50MiB")
        assert master._stopped_for == {leaker: "memory"}
        assert ended_by(leaker) == -signal.SIGTERM  # gunicorn's graceful stop of a worker

        views = {view.pid: view for view in board.snapshot().workers}
        assert views[leaker].stop_reason == "memory"
        memory = views[sharer].memory
        assert memory is not None and memory["measure"] == "USS"
        assert memory["own"] < LIMIT < memory["rss"] and memory["pss"] < memory["rss"]
        assert board.snapshot().max_worker_memory == LIMIT

        master.WORKERS.pop(leaker)
        master._worker_gone(leaker)  # what reaping does
        snapshot = board.snapshot()
        assert snapshot.recycled["memory"] == 1
        board.reserve(2)
        board.started(leaker + 100_000)  # its replacement takes the slot, and shows why
        [replacement] = [view for view in board.snapshot().workers if view.pid == leaker + 100_000]
        assert replacement.last_exit is not None
        assert (replacement.last_exit["pid"], replacement.last_exit["reason"]) == (
            leaker,
            "memory",
        )

        master._sample_and_recycle()
        master._sample_and_recycle()
        assert len(master.log.lines) == 1  # logged once; the sharer stays
        assert os.waitpid(sharer, os.WNOHANG)[0] == 0
    finally:
        for pid in (sharer, leaker):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        gc.unfreeze()
        if collecting:
            gc.enable()
        board.remove()
        del shared


def test_the_master_recycles_by_lifetime_with_term() -> None:
    master = bare_master(replace(Settings(), max_worker_lifetime=0.05))
    pid = fork_child(MiB)
    try:
        master.WORKERS[pid] = object()
        master.recycler.started(pid, master.app.settings)
        time.sleep(0.1)
        master._sample_and_recycle()
        [line] = master.log.lines
        assert line.startswith(f"Recycling worker (pid: {pid}): lifetime ")
        assert master._stopped_for == {pid: "lifetime"}
        assert ended_by(pid) == -signal.SIGTERM
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_a_worker_the_master_already_stops_is_not_recycled_again() -> None:
    master = bare_master(replace(Settings(), max_worker_lifetime=0.01))
    master.WORKERS[4242] = object()
    master.recycler.started(4242, master.app.settings)
    master._stopped_for[4242] = "reload"
    time.sleep(0.02)
    master._sample_and_recycle()  # would SIGTERM pid 4242 if it were not skipped
    assert master.log.lines == [] and master._stopped_for == {4242: "reload"}


@pytest.mark.parametrize("preload", [True, False])
def test_with_preload_the_master_freezes_the_collector_once_before_forking(
    monkeypatch: pytest.MonkeyPatch, preload: bool
) -> None:
    frozen: list[str] = []
    forked: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append("freeze"))

    def fake_spawn(self: object) -> int:
        forked.append(len(frozen))
        return 10_000 + len(forked)

    monkeypatch.setattr(gunicorn_arbiter.Arbiter, "spawn_worker", fake_spawn)
    master = bare_master(Settings())
    master.cfg.preload_app = preload
    master.spawn_worker()
    master.spawn_worker()
    assert frozen == (["freeze"] if preload else [])
    assert forked == ([1, 1] if preload else [0, 0])  # frozen before the first fork


def test_a_worker_stopping_on_its_own_is_not_recycled_again(tmp_path: Path) -> None:
    """A worker that gunicorn stops after --max-requests logs that reason; the master
    does not add a second recycle (and a second line) while it drains."""
    board = Scoreboard.create(8, worker_class="sync", http_engine="microsvc", directory=tmp_path)
    master = bare_master(replace(Settings(), max_worker_lifetime=0.01), board)
    read_end, write_end = os.pipe()
    slot = board.reserve(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        board.attach(slot, 1)
        board.worker_stopping("max-requests")
        os.write(write_end, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.close(write_end)
        assert os.read(read_end, 1) == b"x"
        board.started(pid)
        master.WORKERS[pid] = object()
        master.recycler.started(pid, master.app.settings)
        time.sleep(0.02)
        master._sample_and_recycle()
        assert master.log.lines == [] and master._stopped_for == {}
        assert os.waitpid(pid, os.WNOHANG)[0] == 0  # not signalled
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        board.remove()


def test_the_control_socket_line_is_logged_once_per_path_unless_debugging() -> None:
    import logging

    from microsvc.serving.arbiter import ControlSocketLine

    logger = logging.getLogger("microsvc.test.control-socket-line")
    logger.propagate = False
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger.addHandler(keep)
    line = ControlSocketLine(logger)
    logger.addFilter(line)
    try:
        logger.setLevel(logging.INFO)
        for _ in range(3):  # the first start, then two forks
            logger.info("Control socket listening at %s", "/run/a.ctl")
        logger.info("Booting worker with pid: %s", 42)
        logger.info("Control socket listening at %s", "/run/b.ctl")
        assert [record.getMessage() for record in records] == [
            "Control socket listening at /run/a.ctl",
            "Booting worker with pid: 42",
            "Control socket listening at /run/b.ctl",
        ]
        logger.setLevel(logging.DEBUG)
        logger.info("Control socket listening at %s", "/run/a.ctl")
        assert len(records) == 4
    finally:
        logger.removeFilter(line)
        logger.removeHandler(keep)
