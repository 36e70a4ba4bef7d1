"""The scoreboard: real shared mmap files, writers in forked processes, the seqlock,
the per-request wrapper, finding instances, and the `status` report built from it."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microsvc.errors import UsageError
from microsvc.http.slot import SEQ, SlotWriter
from microsvc.observe import scoreboard as sb
from microsvc.observe.scoreboard import Scoreboard, ScoreboardApp, ScoreboardError
from microsvc.observe.status import StatusError, build_report, locate, render


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Scoreboard]:
    created = Scoreboard.create(8, worker_class="sync", http_engine="microsvc", directory=tmp_path)
    yield created
    created.remove()


def fork_worker(board: Scoreboard, body: Any) -> int:
    """Fork a worker that owns a fresh slot and runs `body(board)`, as gunicorn's
    arbiter does with the hooks microsvc installs (pre_fork, fork, post_fork)."""
    board.reserve(generation=7)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            board.attach(board.reserved, 7)
            board.booted()
            body(board)
        except BaseException:
            code = 1
        os._exit(code)
    board.started(pid)
    return pid


def worker_view(board: Scoreboard, pid: int) -> sb.WorkerView:
    [view] = [view for view in board.snapshot().workers if view.pid == pid]
    return view


def wait_for_state(board: Scoreboard, pid: int, state: str) -> sb.WorkerView:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        view = worker_view(board, pid)
        if view.state == state:
            return view
        time.sleep(0.01)
    pytest.fail(f"worker {pid} never reached {state}: {worker_view(board, pid)}")


def test_a_forked_worker_shows_its_request_and_the_master_clears_its_slot(
    board: Scoreboard,
) -> None:
    def serve_one_slowly(board: Scoreboard) -> None:
        token = board.request_started(b"GET", b"/slow", b"req-1")
        time.sleep(30)
        board.request_ended(token)

    pid = fork_worker(board, serve_one_slowly)
    try:
        view = wait_for_state(board, pid, "busy")
        assert view.generation == 7
        assert view.in_flight == 1
        assert view.request is not None
        assert (view.request["method"], view.request["path"], view.request["request_id"]) == (
            "GET",
            "/slow",
            "req-1",
        )
        board.stopping(pid, "shutdown")
        assert worker_view(board, pid).state == "stopping"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    board.gone(pid, "shutdown")
    snapshot = board.snapshot()
    assert snapshot.workers == []
    assert snapshot.recycled["shutdown"] == 1


def test_a_writer_killed_mid_write_blocks_no_reader(board: Scoreboard) -> None:
    """The worker dies with its slot's sequence counter odd (halfway through a write):
    readers give up on that slot after bounded retries, read the others, and the master
    clears it when it reaps the pid."""

    def die_mid_write(board: Scoreboard) -> None:
        assert board._slot is not None
        offset = board._worker_offset(board._slot)
        SEQ.pack_into(board.buffer, offset, SEQ.unpack_from(board.buffer, offset)[0] + 1)
        os.kill(os.getpid(), signal.SIGKILL)

    other = fork_worker(board, lambda board: time.sleep(30))
    pid = fork_worker(board, die_mid_write)
    try:
        os.waitpid(pid, 0)
        snapshot = board.snapshot()  # returns: nothing waits on the dead writer
        assert [view.pid for view in snapshot.workers if view.pid == pid] == [pid]
        assert worker_view(board, pid).state == "unknown"  # torn worker part, master part read
        wait_for_state(board, other, "idle")
        board.gone(pid, "crash")
        snapshot = board.snapshot()
        assert pid not in [view.pid for view in snapshot.workers]
        assert snapshot.recycled["crash"] == 1
        slot_after = [view for view in snapshot.workers if view.pid == other]
        assert slot_after and slot_after[0].state == "idle"
    finally:
        os.kill(other, signal.SIGKILL)
        os.waitpid(other, 0)


def test_a_worker_killed_at_a_random_point_of_busy_writing_blocks_no_reader(
    board: Scoreboard,
) -> None:
    def write_forever(board: Scoreboard) -> None:
        while True:
            board.request_ended(board.request_started(b"GET", b"/x", b"id"))

    for delay in (0.0, 0.003, 0.011, 0.029):
        pid = fork_worker(board, write_forever)
        time.sleep(0.05 + delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        board.snapshot()  # returns, torn or not
        board.gone(pid, "crash")
        assert board.snapshot().torn == 0
    assert board.snapshot().workers == []


def test_torn_reads_are_retried(board: Scoreboard) -> None:
    """A worker rewrites its request as fast as it can with path and request id that
    belong together; every read must see a matching pair."""

    def rewrite(board: Scoreboard) -> None:
        number = 0
        while True:
            number += 1
            text = str(number).encode() * 8
            token = board.request_started(b"GET", b"/" + text, text)
            board.request_ended(token)

    pid = fork_worker(board, rewrite)
    seen = 0
    try:
        # A number of reads that found a request, not a time window: on a busy machine
        # the writer may hardly run for a while (the deadline only bounds a hang).
        end = time.monotonic() + 30
        while seen < 2000 and time.monotonic() < end:
            view = worker_view(board, pid)
            if view.request is not None:
                seen += 1
                assert view.request["path"] == "/" + view.request["request_id"]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert seen >= 2000


def test_a_sequence_counter_is_never_seen_half_written(board: Scoreboard) -> None:
    """A counter written with struct's pack_into reads 0 for a moment (its bytes are
    cleared, then filled): even, so a reader that met 0 before and after its copy took a
    torn part for a whole one. Written by a worker (its slot) and by the master (the
    autoscale part) as fast as they can, neither counter may ever read 0."""

    def rewrite(board: Scoreboard) -> None:
        while True:
            board.request_ended(board.request_started(b"GET", b"/", b"id"))

    board.publish_autoscale(1, 4, 2, "start")
    worker = fork_worker(board, rewrite)
    master = os.fork()
    if master == 0:  # pragma: no cover - the child
        try:
            while True:
                board.publish_autoscale(1, 4, 2, "busy")
        finally:
            os._exit(1)
    slot = board._by_pid[worker]
    offsets = (board._worker_offset(slot), sb._AUTOSCALE_AT)
    reads = 0
    zeros = dict.fromkeys(offsets, 0)
    writes = dict.fromkeys(offsets, 0)
    try:
        wait_for_state(board, worker, "idle")
        first = {offset: SEQ.unpack_from(board.buffer, offset)[0] for offset in offsets}
        # Until both writers have written many times while being read (each write adds
        # 2 to its counter), not for a time window: on a busy machine either may hardly
        # run for a while. The deadline only bounds a hang.
        end = time.monotonic() + 30
        while min(writes.values()) < 100_000 and time.monotonic() < end:
            for offset in offsets:
                for _ in range(1000):
                    reads += 1
                    if SEQ.unpack_from(board.buffer, offset)[0] == 0:
                        zeros[offset] += 1
                writes[offset] = (SEQ.unpack_from(board.buffer, offset)[0] - first[offset]) // 2
    finally:
        for pid in (worker, master):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert min(writes.values()) >= 100_000, (writes, reads)
    assert list(zeros.values()) == [0, 0], f"{zeros} of {reads} reads found a counter at 0"


def test_a_reader_in_another_process_opens_the_file_by_name(board: Scoreboard) -> None:
    reader = Scoreboard.open(board.path)
    try:
        snapshot = reader.snapshot()
    finally:
        reader.close()
    assert snapshot.master_pid == os.getpid()
    assert (snapshot.worker_class, snapshot.http_engine) == ("sync", "microsvc")
    assert board.path.stat().st_mode & 0o777 == 0o600


def test_a_file_that_is_not_a_scoreboard_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "microsvc-1.scoreboard"
    path.write_bytes(b"x" * 4096)
    with pytest.raises(ScoreboardError, match="not a microsvc scoreboard"):
        Scoreboard.open(path)


def test_workers_beyond_the_slots_are_counted_not_shown(tmp_path: Path) -> None:
    board = Scoreboard.create(1, worker_class="sync", http_engine="gunicorn", directory=tmp_path)
    try:
        assert board.reserve(1) == 0
        board.started(101)
        assert board.reserve(2) is None
        board.started(102)
        snapshot = board.snapshot()
        assert [view.pid for view in snapshot.workers] == [101]
        assert snapshot.unslotted == 1
        board.gone(102, "scale-down")
        assert board.snapshot().unslotted == 0
    finally:
        board.remove()


def test_a_worker_that_stops_on_its_own_gives_its_reason(board: Scoreboard) -> None:
    def stop_on_its_own(board: Scoreboard) -> None:
        board.worker_stopping("max-requests")
        time.sleep(30)

    pid = fork_worker(board, stop_on_its_own)
    try:
        view = wait_for_state(board, pid, "stopping")
        assert view.stop_reason == "max-requests"
        assert board.worker_reason(pid) == "max-requests"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# the per-request wrapper


class Attached:
    """The test process as a worker with slot 0."""

    def __init__(self, board: Scoreboard) -> None:
        board.reserve(1)
        board.started(os.getpid())
        board.attach(0, 1)
        board.booted()
        self.board = board

    def view(self) -> sb.WorkerView:
        return worker_view(self.board, os.getpid())


def environ(**extra: Any) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/items/7",
        "QUERY_STRING": "token=secret",
        "HTTP_X_REQUEST_ID": "abc-123",
        **extra,
    }


def test_the_wrapper_shows_the_request_until_the_server_closes_the_body(
    board: Scoreboard,
) -> None:
    worker = Attached(board)
    seen: list[sb.WorkerView] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(worker.view())
        start_response("200 OK", [])
        return [b"ok"]

    body = ScoreboardApp(app, board)(environ(RAW_URI="/items/7?token=secret"), lambda *a: None)
    during = worker.view()
    assert during.state == "busy"
    assert during.request is not None
    assert during.request["path"] == "/items/7"
    assert seen[0].request is not None
    assert seen[0].request["started"] == during.request["started"]
    assert list(body) == [b"ok"]
    body.close()  # type: ignore[attr-defined]
    after = worker.view()
    assert (after.state, after.requests, after.in_flight, after.request) == ("idle", 1, 0, None)


def test_the_wrapper_keeps_the_length_of_a_sized_body(board: Scoreboard) -> None:
    """A server gives a one-block body a Content-Length only if it can ask its len()."""
    Attached(board)

    def answer(body: Iterable[bytes]) -> Iterable[bytes]:
        return ScoreboardApp(lambda environ, start: body, board)(environ(), lambda *a: None)

    sized = answer([b"one block"])
    assert len(sized) == 1  # type: ignore[arg-type]
    sized.close()  # type: ignore[attr-defined]
    unsized = answer(iter([b"a", b"b"]))
    assert not hasattr(unsized, "__len__")
    assert list(unsized) == [b"a", b"b"]
    unsized.close()  # type: ignore[attr-defined]


def test_the_wrapper_ends_the_request_when_the_app_raises(board: Scoreboard) -> None:
    worker = Attached(board)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ScoreboardApp(app, board)(environ(), lambda *a: None)
    assert (worker.view().state, worker.view().requests) == ("idle", 1)


def test_the_wrapper_shows_the_oldest_of_several_requests(board: Scoreboard) -> None:
    worker = Attached(board)
    first = board.request_started(b"GET", b"/first", b"1")
    second = board.request_started(b"GET", b"/second", b"2")
    view = worker.view()
    assert view.request is not None
    assert (view.request["path"], view.in_flight) == ("/first", 2)
    board.request_ended(first)
    view = worker.view()
    assert view.request is not None
    assert (view.request["path"], view.in_flight) == ("/second", 1)
    board.request_ended(second)
    assert worker.view().state == "idle"


def test_the_wrapper_returns_a_file_wrapper_as_it_is(board: Scoreboard) -> None:
    worker = Attached(board)

    class FileWrapper:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __iter__(self) -> Iterator[bytes]:
            yield self.data

    response = FileWrapper(b"x")
    result = ScoreboardApp(lambda environ, start: response, board)(
        environ(**{"wsgi.file_wrapper": FileWrapper}), lambda *a: None
    )
    assert result is response
    assert worker.view().requests == 1


def writer_of(board: Scoreboard) -> SlotWriter:
    writer = board.writer
    assert writer is not None
    return writer


def test_a_signal_handler_that_interrupts_a_write_does_not_deadlock(board: Scoreboard) -> None:
    """worker_int and worker_abort run in signal handlers: when they interrupt this
    thread while it holds the slot's lock, they give up waiting and the state goes out
    with the next write."""
    worker = Attached(board)
    with writer_of(board).lock:  # as if interrupted halfway through request_started
        board.worker_stopping("timeout")
    assert worker.view().state == "idle"
    board.request_ended(board.request_started(b"GET", b"/", b""))
    view = worker.view()
    assert (view.state, view.requests) == ("stopping", 1)


def test_requests_started_while_the_lock_is_held_get_tokens_of_their_own(
    board: Scoreboard,
) -> None:
    """Two threads that start a request at once each get a token of their own (compiled,
    a token taken from the entry's address could be the same for both)."""
    Attached(board)
    writer = writer_of(board)
    tokens: list[int] = []
    calling = [threading.Event() for _ in range(2)]

    def start(index: int) -> None:
        calling[index].set()
        tokens.append(board.request_started(b"GET", b"/x", b""))

    threads = [threading.Thread(target=start, args=(index,)) for index in range(2)]
    with writer.lock:  # both wait for it with their entries made
        for thread in threads:
            thread.start()
        assert all(event.wait(10) for event in calling)  # both running, however busy
        time.sleep(0.1)  # and at the lock
        assert tokens == []
    for thread in threads:
        thread.join(5)
    assert len(set(tokens)) == 2 and len(writer.active) == 2
    for token in tokens:
        board.request_ended(token)
    assert not writer.active


def test_green_threads_write_the_slot_without_the_lock(board: Scoreboard) -> None:
    """gevent's and eventlet's green threads never switch in the middle of a write: the
    requests of such a worker write their slot without taking the lock, and still show
    the oldest request, the count in flight and the queue time."""
    board.reserve(1)
    board.started(os.getpid())
    board.attach(0, 1, threads=False)
    board.booted()
    with writer_of(board).lock:  # held by no one who writes: the writes do not wait for it
        first = board.request_started(b"GET", b"/first", b"1")
        second = board.request_started(b"GET", b"/second", b"2")
        board.note_queue(0.25, shed=True)
        view = worker_view(board, os.getpid())
        assert view.request is not None
        assert (view.state, view.in_flight, view.request["path"]) == ("busy", 2, "/first")
        assert view.queue is not None and (view.queue["seconds"], view.queue["shed"]) == (0.25, 1)
        board.request_ended(first)
        view = worker_view(board, os.getpid())
        assert view.request is not None and view.request["path"] == "/second"
        board.request_ended(second)
        view = worker_view(board, os.getpid())
        assert (view.state, view.in_flight, view.requests, view.request) == ("idle", 0, 2, None)


def test_green_threads_a_signal_handler_leaves_a_write_in_progress_alone(
    board: Scoreboard,
) -> None:
    """Without a lock, a signal handler (worker_int, worker_abort) that interrupts a write
    of the slot must not write it too: its state goes out with the next write."""
    worker = Attached(board)
    board.attach(0, 1, threads=False)
    board.booted()
    writer_of(board).writing = True  # as if interrupted halfway through request_started
    board.worker_stopping("timeout")
    writer_of(board).writing = False
    assert worker.view().state == "idle"
    board.request_ended(board.request_started(b"GET", b"/", b""))
    assert (worker.view().state, worker.view().requests) == ("stopping", 1)


@pytest.mark.parametrize(
    ("patch", "green"),
    [
        ("", "False"),
        ("from gevent import monkey; monkey.patch_all()", "True"),
        ("import eventlet; eventlet.monkey_patch()", "True"),
    ],
)
def test_a_worker_writes_without_the_lock_only_under_green_threads(patch: str, green: str) -> None:
    import subprocess
    import sys

    code = f"{patch}\nfrom microsvc.serving.patching import green_threads\nprint(green_threads())"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [green]


# what the master measures


def test_listen_queue_reads_the_accept_queue_and_its_limit() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(7)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            end = time.monotonic() + 10  # a loopback handshake may complete a moment late
            found = sb.listen_queue(listener)
            while found.queue != 3 and time.monotonic() < end:
                time.sleep(0.01)
                found = sb.listen_queue(listener)
        finally:
            for client in clients:
                client.close()
    assert (found.queue, found.queue_limit) == (3, 7)


def test_memory_of_this_process_own_pss_rss() -> None:
    memory = sb.read_memory(os.getpid())
    assert memory is not None
    assert memory.measure == "USS"  # Linux: from /proc/PID/smaps_rollup
    assert 0 < memory.own <= memory.rss and memory.rss == memory.own + memory.shared
    assert memory.pss is not None and memory.own <= memory.pss <= memory.rss
    assert sb.read_memory(2**22 + 12345) is None


# finding instances and the report


def test_find_instances_keeps_running_masters_and_removes_stale_files(
    board: Scoreboard, tmp_path: Path
) -> None:
    stale = tmp_path / "microsvc-999999999.scoreboard"
    stale.write_bytes(b"")
    (tmp_path / "unrelated.txt").write_text("x")
    assert sb.find_instances(tmp_path) == {os.getpid(): board.path}
    assert not stale.exists()


def test_locate_errors(board: Scoreboard, tmp_path: Path) -> None:
    assert locate(None, tmp_path) == board.path
    assert locate(os.getpid(), tmp_path) == board.path
    with pytest.raises(StatusError, match="no running microsvc instance with master pid 1 "):
        locate(1, tmp_path)
    with pytest.raises(StatusError, match="no running microsvc instance of this user"):
        locate(None, tmp_path / "nowhere")
    parent = os.getppid()
    (tmp_path / f"microsvc-{parent}.scoreboard").write_bytes(b"")
    with pytest.raises(UsageError, match=f"several microsvc instances run .*{parent}.*--pid"):
        locate(None, tmp_path)


def test_report_and_its_text(board: Scoreboard) -> None:
    worker = Attached(board)
    board.request_started(b"GET", b"/slow", b"rid-9")
    board.sample([])
    data = build_report(board.snapshot(), time.time())
    assert (data["workers_running"], data["workers_busy"], data["busy_ratio"]) == (1, 1, 1.0)
    assert data["in_flight"] == 1
    [shown] = data["workers"]
    assert shown["pid"] == os.getpid()
    assert shown["memory"]["own"] > 0 and shown["memory"]["pss"] >= shown["memory"]["own"]
    assert (shown["memory"]["measure"], data["memory_measure"]) == ("USS", "USS")
    assert data["max_worker_memory"] is None
    text = render(data)
    assert "GET /slow [rid-9]" in text
    assert "OWN = USS" in text and " PSS " in text and "no --max-worker-memory" in text
    assert f"microsvc master {os.getpid()}" in text
    del worker


# the hooks Launcher installs


def test_launcher_hooks_keep_the_slot_and_still_call_the_configured_hooks(
    board: Scoreboard,
) -> None:
    from types import SimpleNamespace

    from microsvc import Launcher
    from microsvc.planning.plan import SystemFacts

    calls: list[str] = []
    launcher = Launcher(
        "microsvc.demo:app",
        environ={},
        facts=SystemFacts(host_cpus=2, affinity_cpus=2),
        gunicorn_settings={
            "when_ready": lambda server: calls.append("when_ready"),
            "pre_fork": lambda server, worker: calls.append("pre_fork"),
            "post_fork": lambda server, worker: calls.append("post_fork"),
            "worker_abort": lambda worker: calls.append("worker_abort"),
            "worker_exit": lambda server, worker: calls.append("worker_exit"),
        },
    )
    launcher.scoreboard = board
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        launcher.cfg.when_ready(SimpleNamespace(LISTENERS=[listener]))
    assert board.snapshot().listeners[0].queue_limit == 5
    worker = SimpleNamespace(age=3)
    launcher.cfg.pre_fork(None, worker)  # the master, before the fork
    launcher.cfg.post_fork(None, worker)  # the worker (here the same process)
    board.started(os.getpid())  # the master, after the fork
    assert worker_view(board, os.getpid()).state == "booting"
    launcher.cfg.post_worker_init(worker)
    assert worker_view(board, os.getpid()).state == "idle"
    launcher.cfg.worker_abort(worker)
    view = worker_view(board, os.getpid())
    assert (view.state, view.stop_reason, view.generation) == ("stopping", "timeout", 3)
    launcher.cfg.worker_exit(None, worker)
    assert calls == ["when_ready", "pre_fork", "post_fork", "worker_abort", "worker_exit"]
    # gunicorn's engine: a wrapper notes each request; microsvc's engine notes them from
    # its hooks, without one.
    assert not isinstance(launcher.load(), ScoreboardApp)
    gunicorns = Launcher(
        "microsvc.demo:app",
        environ={},
        facts=SystemFacts(host_cpus=2, affinity_cpus=2),
        http_engine="gunicorn",
    )
    gunicorns.scoreboard = board
    assert isinstance(gunicorns.load(), ScoreboardApp)


def test_memory_falls_back_to_psutil_without_smaps_rollup(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    def no_rollup(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/smaps_rollup"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_rollup)
    memory = sb.read_memory(os.getpid())
    assert memory is not None and memory.measure == "USS" and 0 < memory.own <= memory.rss


def test_the_master_publishes_given_samples_and_the_memory_limit(board: Scoreboard) -> None:
    worker = Attached(board)
    sample = sb.MemorySample(10 * 2**20, 30 * 2**20, 90 * 2**20, "USS", time.time())
    board.max_worker_memory = 150_000_000
    board.sample([], {os.getpid(): sample})
    snapshot = board.snapshot()
    assert snapshot.max_worker_memory == 150_000_000
    [view] = snapshot.workers
    assert view.memory is not None
    assert {key: view.memory[key] for key in ("own", "pss", "rss", "shared", "measure")} == {
        "own": 10 * 2**20,
        "pss": 30 * 2**20,
        "rss": 90 * 2**20,
        "shared": 80 * 2**20,
        "measure": "USS",
    }
    board.stopping(os.getpid(), "memory")  # the sample stays while the worker stops
    [view] = board.snapshot().workers
    assert view.memory is not None and view.memory["pss"] == 30 * 2**20
    text = render(build_report(board.snapshot(), time.time()))
    assert "--max-worker-memory 143.1M (of OWN)" in text
    del worker
