"""Bad values from the environment and from config files (-c): exit 2, one `Error: `
line that names where the value came from (the variable, the file), no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc

ENV_ERRORS = [
    # (environment, fragments of the error line)
    pytest.param({"MICROSVC_WORKERS": "abc"}, ["MICROSVC_WORKERS", "'abc'"], id="workers"),
    pytest.param({"MICROSVC_WORKERS": "0"}, ["MICROSVC_WORKERS", "'0'"], id="workers-0"),
    pytest.param({"WEB_CONCURRENCY": "0"}, ["WEB_CONCURRENCY", "'0'"], id="web-concurrency-0"),
    pytest.param({"WEB_CONCURRENCY": "-2"}, ["WEB_CONCURRENCY", "'-2'"], id="web-concurrency-neg"),
    pytest.param({"PORT": "notaport"}, ["PORT", "'notaport'"], id="port"),
    pytest.param({"PORT": "99999"}, ["PORT", "'99999'"], id="port-range"),
    pytest.param({"HOST": "bad/host"}, ["HOST", "'bad/host'"], id="host"),
    pytest.param(
        {"HOST": "bad/host", "PORT": "x"}, ["HOST and PORT", "'bad/host:x'"], id="host-and-port"
    ),
    pytest.param({"MICROSVC_BIND": "nohost"}, ["MICROSVC_BIND", "'nohost'"], id="bind"),
    pytest.param(
        {"MICROSVC_WORKER_CLASS": "nosuch"}, ["MICROSVC_WORKER_CLASS", "'nosuch'"], id="class"
    ),
    pytest.param({"MICROSVC_THREADS": "x"}, ["MICROSVC_THREADS", "'x'"], id="threads"),
    pytest.param(
        {"MICROSVC_MEMORY_PER_WORKER": "12XB"}, ["MICROSVC_MEMORY_PER_WORKER", "'12XB'"], id="mem"
    ),
    pytest.param({"MICROSVC_TIMEOUT": "-5"}, ["MICROSVC_TIMEOUT", "'-5'"], id="timeout"),
    pytest.param({"MICROSVC_LOG_LEVEL": "loud"}, ["MICROSVC_LOG_LEVEL", "'loud'"], id="log-level"),
    pytest.param({"MICROSVC_PRELOAD": "maybe"}, ["MICROSVC_PRELOAD", "'maybe'"], id="preload"),
    pytest.param({"MICROSVC_SET": "novalue"}, ["MICROSVC_SET", "'novalue'"], id="set"),
    pytest.param({"MICROSVC_SET": "workers=3"}, ["'workers'", "use --workers"], id="set-owned"),
    pytest.param(
        {"MICROSVC_THREADS": "4"},
        ["--threads 4", "MICROSVC_THREADS", "gthread"],
        id="threads-with-sync",
    ),
    pytest.param(
        {"MICROSVC_CONFIG": "/nonexistent/microsvc.conf.py"},
        ["'/nonexistent/microsvc.conf.py'", "does not exist"],
        id="config",
    ),
]


@pytest.mark.parametrize(("env", "fragments"), ENV_ERRORS)
def test_invalid_environment_value(
    microsvc: Microsvc, env: dict[str, str], fragments: list[str]
) -> None:
    microsvc("plan", env=env).assert_error(2, *fragments)


@pytest.mark.parametrize("value", ["zero", "3.5"])
def test_web_concurrency_not_a_number(microsvc: Microsvc, value: str) -> None:
    microsvc("plan", env={"WEB_CONCURRENCY": value}).assert_error(2, "WEB_CONCURRENCY", repr(value))


def test_web_concurrency_not_a_number_overridden_by_workers(microsvc: Microsvc) -> None:
    result = microsvc("plan", "--json", "--workers", "2", env={"WEB_CONCURRENCY": "zero"})
    assert result.returncode == 0, result.describe()


# config files


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_file_missing(microsvc: Microsvc, tmp_path: Path) -> None:
    missing = tmp_path / "missing.py"
    microsvc("plan", "-c", str(missing)).assert_error(2, repr(str(missing)), "does not exist")


def test_config_file_not_python(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write(tmp_path, "settings.conf", "workers = 2\n")
    microsvc("plan", "-c", str(path)).assert_error(2, repr(str(path)), "not a Python file")


def test_config_file_is_a_directory(microsvc: Microsvc, tmp_path: Path) -> None:
    (tmp_path / "conf.py").mkdir()
    microsvc("plan", "-c", "conf.py").assert_error(2, "conf.py", "directory")


def test_config_file_syntax_error(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write(tmp_path, "syntax.py", "bind = '127.0.0.1:8000'\nworkers = (\n")
    microsvc("plan", "-c", str(path)).assert_error(2, repr(str(path)), "syntax error", "line 2")


def test_config_file_raises(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write(tmp_path, "raises.py", "raise ValueError('config boom')\n")
    microsvc("plan", "-c", str(path)).assert_error(2, repr(str(path)), "ValueError", "config boom")


def test_config_file_import_fails(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write(tmp_path, "imports.py", "import no_such_module_for_microsvc\n")
    microsvc("plan", "-c", str(path)).assert_error(
        2, repr(str(path)), "ModuleNotFoundError", "no_such_module_for_microsvc"
    )


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("workers = 'many'\n", ["workers", "'many'"], id="workers-many"),
        pytest.param("workers = 0\n", ["workers", "0"], id="workers-0"),
        pytest.param("bind = 5\n", ["bind", "5"], id="bind-int"),
        pytest.param("bind = 'nohost'\n", ["bind", "'nohost'"], id="bind-no-port"),
        pytest.param("worker_class = 'nosuch'\n", ["worker_class", "'nosuch'"], id="class"),
        pytest.param("keepalive = 'x'\n", ["keep_alive", "'x'"], id="gunicorn-name"),
        pytest.param("preload_app = 'maybe'\n", ["preload", "'maybe'"], id="preload"),
        pytest.param("threads = 4\n", ["--threads 4", "gthread"], id="threads-with-sync"),
    ],
)
def test_config_file_bad_value_names_the_file(
    microsvc: Microsvc, tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, "microsvc_conf.py", text)
    microsvc("plan", "-c", str(path)).assert_error(2, str(path), *fragments)


def test_config_file_bad_value_through_microsvc_config(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write(tmp_path, "microsvc_conf.py", "workers = 'many'\n")
    microsvc("plan", env={"MICROSVC_CONFIG": str(path)}).assert_error(2, str(path), "'many'")


@pytest.mark.parametrize("status", ["0", "3", "'bye'"])
def test_config_file_calls_sys_exit(microsvc: Microsvc, tmp_path: Path, status: str) -> None:
    """Not a silent exit with the file's status (sys.exit(0) would look like success)."""
    path = write(tmp_path, "exits.py", f"import sys\nsys.exit({status})\n")
    microsvc("plan", "-c", str(path)).assert_error(2, repr(str(path)), "SystemExit")


@pytest.mark.parametrize("origin", ["config-file", "MICROSVC_SET"])
def test_bad_gunicorn_setting_names_its_origin(
    microsvc: Microsvc, tmp_path: Path, origin: str
) -> None:
    if origin == "config-file":
        path = write(tmp_path, "conns.py", "worker_connections = 'abc'\n")
        result, where = microsvc("plan", "-c", str(path)), str(path)
    else:
        result = microsvc("plan", env={"MICROSVC_SET": "worker_connections=abc"})
        where = "MICROSVC_SET"
    result.assert_error(2, "'worker_connections'", where)
