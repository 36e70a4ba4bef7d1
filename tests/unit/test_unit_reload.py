"""The whole gunicorn configuration checked before it is used: `build_gunicorn_config` at
start, `Launcher.reload` (what HUP runs in the master) keeping the running configuration
when the new one fails a check, the app wrapped again with the new settings, and
gunicorn's chdir and pythonpath applied. Nothing here runs the arbiter; tests/e2e does."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microsvc import Launcher, UsageError
from microsvc.config.pipeline import build_gunicorn_config
from microsvc.planning.plan import SystemFacts

FACTS = SystemFacts(host_cpus=4, affinity_cpus=4)


def h2_installed() -> bool:
    from gunicorn.http2 import is_http2_available

    return bool(is_http2_available())


def wsgi_app(environ: object, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"app"]


def get(app: Any, path: str) -> bytes:
    """The body `app` answers to GET `path`: the endpoints' JSON, or b"app"."""
    return b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *args: None))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def gunicorn_log() -> Iterator[Records]:
    """What the master logs (gunicorn's error logger), captured."""
    handler = Records()
    logger = logging.getLogger("gunicorn.error")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory, and sys.path restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def write_config(directory: Path, *lines: str) -> str:
    path = directory / "conf.py"
    path.write_text("\n".join(["bind = '127.0.0.1:0'", *lines]) + "\n")
    return str(path)


def launcher_with_config(directory: Path, app: object = wsgi_app, **options: Any) -> Launcher:
    return Launcher(
        app,  # type: ignore[arg-type]
        config=write_config(directory, "forwarded_allow_ips = '10.9.9.9'"),
        environ={},
        facts=FACTS,
        **options,
    )


# build_gunicorn_config


def test_build_sets_every_value() -> None:
    cfg = build_gunicorn_config({"workers": 3, "bind": ["127.0.0.1:0"], "keepalive": 7})
    assert (cfg.workers, cfg.bind, cfg.keepalive) == (3, ["127.0.0.1:0"], 7)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"forwarded_allow_ips": "10.0.0.1/8"}, "gunicorn setting 'forwarded_allow_ips'"),
        ({"no_such_setting": 1}, "gunicorn setting 'no_such_setting'"),
        ({"workers": "many"}, "gunicorn setting 'workers'"),
        ({"chdir": "/nonexistent/microsvc"}, "gunicorn setting 'chdir'"),
    ],
)
def test_build_refuses_what_a_setting_refuses(values: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_gunicorn_config(values)


def test_build_runs_gunicorns_validation_of_the_whole() -> None:
    if h2_installed():
        pytest.skip("the h2 package is installed")
    with pytest.raises(UsageError, match="h2 package is not installed"):
        build_gunicorn_config({"http_protocols": "h2,h1"})
    with pytest.raises(UsageError, match="h2 package is not installed"):
        Launcher(environ={}, facts=FACTS, gunicorn_settings={"http_protocols": "h2,h1"})


# reload


@pytest.mark.parametrize(
    "lines",
    [
        ["forwarded_allow_ips = '10.0.0.1/8'"],
        ["http_protocols = 'h2,h1'"],
        ["worker_tmp_dir = '/nonexistent/microsvc'"],
        ["pidfile = '/nonexistent/microsvc/pid'"],
        ["chdir = 'no-such-directory'"],
        ["workers = 0"],
        ["syntax error here"],
    ],
    ids=["host-bits", "h2", "worker-tmp-dir", "pidfile", "chdir", "workers", "syntax"],
)
def test_reload_keeps_the_running_configuration(
    workdir: Path, gunicorn_log: Records, lines: list[str]
) -> None:
    if lines == ["http_protocols = 'h2,h1'"] and h2_installed():
        pytest.skip("the h2 package is installed")
    launcher = launcher_with_config(workdir)
    cfg, configuration, wrapped = launcher.cfg, launcher.configuration, launcher.wsgi()
    write_config(workdir, *lines)
    launcher.reload()
    assert launcher.cfg is cfg
    assert launcher.configuration is configuration
    assert launcher.wsgi() is wrapped
    errors = gunicorn_log.errors()
    assert len(errors) == 1, errors
    assert errors[0].startswith("Reload kept the running configuration: ")
    assert "\n" not in errors[0]


def test_reload_refuses_a_new_address_that_cannot_be_bound(
    workdir: Path, gunicorn_log: Records
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launcher = launcher_with_config(workdir)
        cfg = launcher.cfg
        write_config(workdir, f"bind = ['127.0.0.1:0', '127.0.0.1:{port}']")
        launcher.reload()
    assert launcher.cfg is cfg
    assert gunicorn_log.errors() == [
        f"Reload kept the running configuration: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ]


def test_reload_does_not_bind_an_address_already_served(
    workdir: Path, gunicorn_log: Records
) -> None:
    with socket.socket() as listening:  # stands in for the master's own listener
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bind = f"127.0.0.1:{listening.getsockname()[1]}"
        launcher = launcher_with_config(workdir, bind=bind)
        launcher.reload()
    assert gunicorn_log.errors() == []


def test_reload_replaces_the_configuration_and_wraps_the_app_again(
    workdir: Path, gunicorn_log: Records
) -> None:
    launcher = launcher_with_config(workdir)
    before = launcher.wsgi()
    assert get(before, "/healthz") == b'{"status": "ok"}'
    write_config(workdir, "forwarded_allow_ips = '127.0.0.1'", "health_path = '/alive'")
    launcher.reload()
    assert gunicorn_log.errors() == []
    assert launcher.cfg.forwarded_allow_ips == ["127.0.0.1"]
    assert launcher.settings.forwarded_allow_ips == ("127.0.0.1",)
    after = launcher.wsgi()
    assert after is not before
    assert get(after, "/alive") == b'{"status": "ok"}'
    assert get(after, "/healthz") == b"app"
    assert after.trusted.peer_is_trusted("127.0.0.1")
    assert not before.trusted.peer_is_trusted("127.0.0.1")


APP_MODULE = """
import itertools

loads = itertools.count()


def create_app():
    next(loads)
    return lambda environ, start_response: []
"""


def test_preload_imports_the_app_once_and_wraps_it_again(
    workdir: Path, gunicorn_log: Records
) -> None:
    (workdir / "reload_unit_app.py").write_text(APP_MODULE)
    try:
        launcher = launcher_with_config(workdir, "reload_unit_app:create_app()", preload=True)
        first = launcher.wsgi()
        launcher.reload()
        second = launcher.wsgi()
        loads = next(sys.modules["reload_unit_app"].loads)
    finally:
        sys.modules.pop("reload_unit_app", None)
    assert second is not first
    assert second.app is first.app
    assert loads == 1  # create_app() ran once
    assert gunicorn_log.errors() == []


def test_turning_preload_on_loads_the_app_before_the_switch(
    workdir: Path, gunicorn_log: Records
) -> None:
    (workdir / "reload_broken_app.py").write_text("raise RuntimeError('broken at import')\n")
    launcher = launcher_with_config(workdir, "reload_broken_app:app")
    cfg = launcher.cfg
    write_config(workdir, "preload_app = True")
    launcher.reload()
    assert launcher.cfg is cfg
    [error] = gunicorn_log.errors()
    assert "broken at import" in error


def test_chdir_and_pythonpath_are_entered(workdir: Path) -> None:
    (workdir / "service" / "lib").mkdir(parents=True)
    launcher = Launcher(
        wsgi_app,
        environ={},
        facts=FACTS,
        gunicorn_settings={"chdir": "service", "pythonpath": "lib,/opt/extra"},
    )
    assert os.getcwd() == str(workdir)  # nothing moves before run()
    launcher.enter_paths()
    service = str(workdir / "service")
    assert os.getcwd() == service
    assert sys.path[:3] == [f"{service}/lib", "/opt/extra", service]


def test_reload_reads_relative_paths_from_the_start_directory(
    workdir: Path, gunicorn_log: Records
) -> None:
    (workdir / "service").mkdir()
    (workdir / "conf.py").write_text("bind = '127.0.0.1:0'\nchdir = 'service'\n")
    launcher = Launcher(wsgi_app, config="conf.py", environ={}, facts=FACTS)
    launcher.enter_paths()
    launcher.reload()  # from inside service/: conf.py and chdir still mean the same
    assert gunicorn_log.errors() == []
    assert os.getcwd() == str(workdir / "service")


def test_reload_refuses_new_addresses_that_overlap(workdir: Path, gunicorn_log: Records) -> None:
    launcher = launcher_with_config(workdir)
    cfg = launcher.cfg
    write_config(workdir, "bind = ['127.0.0.1:0', '0.0.0.0:47123', '127.0.0.1:47123']")
    launcher.reload()
    assert launcher.cfg is cfg
    [error] = gunicorn_log.errors()
    assert "overlap" in error
