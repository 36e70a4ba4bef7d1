"""The master's signal queue for eventlet: what gunicorn's arbiter asks of a
SimpleQueue, with puts from signal handlers that never wait (a storm of signals at an
eventlet master is in tests/e2e/test_e2e_eventlet.py)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from microsvc.serving.signalqueue import Empty, SignalQueue, needed


@pytest.fixture
def signals() -> Iterator[SignalQueue]:
    queue = SignalQueue()
    yield queue
    queue.close()


def test_items_come_out_in_order_and_an_empty_queue_says_so(signals: SignalQueue) -> None:
    with pytest.raises(Empty):
        signals.get_nowait()
    for item in (1, "wake", 3):
        signals.put_nowait(item)
    assert [signals.get(timeout=0), signals.get_nowait(), signals.get(block=False)] == [
        1,
        "wake",
        3,
    ]
    with pytest.raises(Empty):
        signals.get(block=False)


def test_a_get_with_a_timeout_waits_that_long_and_no_less(signals: SignalQueue) -> None:
    started = time.monotonic()
    with pytest.raises(Empty):
        signals.get(timeout=0.2)
    assert time.monotonic() - started >= 0.2


def test_a_put_from_another_thread_wakes_a_waiting_get(signals: SignalQueue) -> None:
    waiting = threading.Event()

    def put_later() -> None:
        waiting.wait()
        time.sleep(0.05)  # the getter is (most likely) inside its select by now
        signals.put_nowait("late")

    thread = threading.Thread(target=put_later)
    thread.start()
    waiting.set()
    assert signals.get(timeout=30) == "late"  # a hang detector, not a measurement
    thread.join()


def test_a_put_from_a_signal_handler_wakes_a_waiting_get(signals: SignalQueue) -> None:
    previous = signal.signal(signal.SIGUSR1, lambda signum, _: signals.put_nowait(signum))
    try:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        assert signals.get(timeout=30) == signal.SIGUSR1
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_puts_never_wait_for_a_reader_however_many(signals: SignalQueue) -> None:
    # Far more than the wake-up pipe holds: a put into a full pipe is not a wait.
    count = 200_000
    for item in range(count):
        signals.put_nowait(item)
    assert [signals.get_nowait() for _ in range(count)] == list(range(count))
    with pytest.raises(Empty):
        signals.get(timeout=0)


def test_it_is_needed_only_where_eventlet_has_patched_threading() -> None:
    assert not needed()  # this process is not patched
    if importlib.util.find_spec("eventlet") is None:  # not imported here: it hooks fork
        pytest.skip("needs eventlet")
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import eventlet; eventlet.monkey_patch()\n"
        "import queue\n"
        "from microsvc.serving.signalqueue import needed\n"
        # The premise: eventlet's SimpleQueue is the pure-Python one, built on a lock.
        "print(needed(), queue.SimpleQueue.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["True", "_PySimpleQueue"], done.stderr
