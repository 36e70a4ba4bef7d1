"""The state the master shares with its workers, across a real fork."""

from __future__ import annotations

import os

from microsvc.arbiter import ServerState


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
