"""Starting and controlling the master: the start-up app check with apps that misbehave
at import, --reload through a syntax error, the signal handlers a program embedding
`Launcher` gets back, and USR2 where it cannot work."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


HELLO = """\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%s"]
"""


def get_text(url: str) -> str:
    with requests.get(url, timeout=10) as response:
        assert response.status_code == 200, response.text
        return response.text


def status_of(url: str) -> int | str:
    try:
        with requests.get(url, timeout=10) as response:
            return response.status_code
    except requests.RequestException as exc:
        return type(exc).__name__


# the start-up app check


def test_app_starting_a_thread_at_import_is_served(serve: ServeFactory, tmp_path: Path) -> None:
    """A non-daemon thread started at import does not hold the check until it ends."""
    write(
        tmp_path / "thread_app.py",
        """\
        import threading
        import time

        threading.Thread(target=time.sleep, args=(3600,)).start()

        def app(environ, start_response):
            start_response("200 OK", [])
            return [b"ok"]
        """,
    )
    # The worker cannot exit either (the same thread): a short graceful timeout ends it.
    args = ["thread_app:app", "-w", "1", "--graceful-timeout", "1"]
    server = serve(args, cwd=tmp_path, wait=False)
    server.wait_ready("/", deadline=20)
    assert get_text(server.url + "/") == "ok"


def test_app_writing_to_stdout_is_served(serve: ServeFactory, tmp_path: Path) -> None:
    """What the app prints (here at exit, after it has loaded, in the shape of the
    check's own report) is not taken for the check's result."""
    write(
        tmp_path / "chatty_app.py",
        """\
        import atexit
        import threading
        import time

        print("starting")
        atexit.register(print, "\\nAppLoadError\\tthe app's own output")

        def chatter():
            while True:
                print("AppLoadError\\tbackground", flush=True)
                time.sleep(0.05)

        threading.Thread(target=chatter, daemon=True).start()

        def app(environ, start_response):
            start_response("200 OK", [])
            return [b"ok"]
        """,
    )
    server = serve(["chatty_app:app", "-w", "1"], cwd=tmp_path, wait=False)
    server.wait_ready("/", deadline=20)
    assert get_text(server.url + "/") == "ok"


def test_app_reading_raw_env_at_import_is_served(serve: ServeFactory, tmp_path: Path) -> None:
    write(
        tmp_path / "env_app.py",
        """\
        import os

        GREETING = os.environ["MICROSVC_TEST_GREETING"].encode()

        def app(environ, start_response):
            start_response("200 OK", [])
            return [GREETING]
        """,
    )
    server = serve(
        ["env_app:app", "-w", "1", "--set", "raw_env=MICROSVC_TEST_GREETING=hello"],
        cwd=tmp_path,
        wait=False,
    )
    server.wait_ready("/", deadline=20)
    assert get_text(server.url + "/") == "hello"


# --reload


@pytest.mark.server_tracebacks("the app's file is saved with a syntax error")
@pytest.mark.parametrize(
    "extra", [[], ["--metrics", "--metrics-bind", "127.0.0.1:0"]], ids=["plain", "metrics"]
)
def test_reload_survives_a_syntax_error_and_serves_the_fixed_code(
    serve: ServeFactory, tmp_path: Path, extra: list[str]
) -> None:
    """As with gunicorn --reload: the broken file is logged, the master stays, and the
    fixed file is served (with --metrics too: the engine's meter does not import the
    broken app again)."""
    app_file = write(tmp_path / "edited_app.py", HELLO % "one")
    server = serve(["edited_app:app", "-w", "1", "--reload", *extra], cwd=tmp_path, ready_path="/")
    assert get_text(server.url + "/") == "one"

    app_file.write_text(HELLO.replace("[b", "[[b") % "two")  # '[' never closed
    server.wait_log(r"edited_app.*SyntaxError")
    # The worker stays up and answers with the error, so the master has no failed boot
    # to halt on.
    end = time.monotonic() + 20
    while status_of(server.url + "/") != 500 and time.monotonic() < end:
        time.sleep(0.2)
    assert status_of(server.url + "/") == 500, server.describe()
    assert server.proc.poll() is None, server.describe()

    end = time.monotonic() + 20
    while time.monotonic() < end:
        # Saved again each turn, so a reloader that had not looked at the file yet sees
        # a change all the same.
        app_file.write_text(HELLO % "three")
        try:
            if get_text(server.url + "/") == "three":
                break
        except (AssertionError, requests.RequestException):
            pass
        time.sleep(1.0)
    assert get_text(server.url + "/") == "three", server.describe()
    assert server.proc.poll() is None, server.describe()


# Launcher.run() in a program of the user's


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_launcher_run_gives_the_signal_handlers_back(
    serve: ServeFactory, tmp_path: Path, worker_class: str
) -> None:
    """After run() returns, SIGINT and SIGTERM do what they did before: the program's
    own SIGINT handler runs, and SIGTERM (default) ends the program."""
    write(
        tmp_path / "embedder.py",
        """\
        import os
        import signal
        import sys

        from microsvc import Launcher

        def on_int(signum, frame):
            print("own SIGINT handler", flush=True)

        if __name__ == "__main__":
            signal.signal(signal.SIGINT, on_int)
            before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            Launcher(
                "embedded_app:app", bind=f"127.0.0.1:{sys.argv[1]}", workers=1,
                worker_class=sys.argv[2],
            ).run()
            after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            print("run returned; handlers restored:", after == before, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            print("still alive after SIGTERM", flush=True)
        """,
    )
    write(tmp_path / "embedded_app.py", HELLO % "ok")
    command = [sys.executable, "embedder.py", "{port}", worker_class]
    server = serve(command=command, cwd=tmp_path, ready_path="/")
    server.proc.send_signal(signal.SIGTERM)  # the master alone, as a supervisor would
    server.proc.wait(30)
    log = server.log_text()
    assert "run returned; handlers restored: True" in log, server.describe()
    assert "own SIGINT handler" in log, server.describe()
    assert "still alive after SIGTERM" not in log, server.describe()
    assert server.proc.returncode == -signal.SIGTERM, server.describe()


# USR2


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        pytest.param(
            ["--metrics", "--metrics-bind", "127.0.0.1:{metrics}"], "--metrics", id="metrics"
        ),
        pytest.param(["--set", "reuse_port=true"], "reuse_port", id="reuse-port"),
    ],
)
def test_usr2_that_cannot_work_is_refused_with_one_line(
    serve: ServeFactory, free_port: Callable[[], int], args: list[str], reason: str
) -> None:
    metrics = str(free_port())
    server = serve(["-w", "1", *(arg.replace("{metrics}", metrics) for arg in args)])
    server.wait_log(r"Ready: 1 workers booted")
    server.proc.send_signal(signal.SIGUSR2)
    line = server.wait_log(r"USR2 ignored: .*")
    assert reason in line.group(0), server.describe()
    server.proc.send_signal(signal.SIGTTIN)  # a signal handled after USR2: the loop went on
    server.wait_log(r"Handling signal: ttin")
    assert server.proc.poll() is None, server.describe()
    assert server.log_text().count("Starting gunicorn") == 1, server.describe()
    assert server.stop() == 0, server.describe()
