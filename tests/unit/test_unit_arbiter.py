"""The state the master shares with its workers, across a real fork."""

from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest

from microsvc.serving.arbiter import ServerState


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
