"""Failures that show up only when `run` starts: the app does not import, an extra is
missing, the address cannot be bound. Each exits on its own with one `Error: ` line,
before any worker starts: 2 for what the user wrote wrong, 1 for what failed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc

APP_MODULES = {
    "cli_app_ok": "def app(environ, start_response):\n    return []\n",
    "cli_app_notcallable": "app = 42\n",
    "cli_app_unnamed": "handler = 1\n",
    "cli_app_raises": "raise RuntimeError('boom at import')\n",
    "cli_app_missing_dep": "import no_such_dependency_for_microsvc\n",
    "cli_app_exits": "import sys\nsys.exit(3)\n",
    "cli_app_factory": "def create_app(name='x'):\n    raise ValueError('factory boom ' + name)\n",
}


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """The modules above in the directory `run` starts in (its cwd), so they import."""
    for name, text in APP_MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    return tmp_path


APP_USAGE_ERRORS = [
    # (app string, fragments of the error line): exit 2
    pytest.param(
        "no_such_module_for_microsvc",
        ["'no_such_module_for_microsvc'", "no module named"],
        id="module-missing",
    ),
    pytest.param(
        "no_such_package_for_microsvc.mod:app",
        ["'no_such_package_for_microsvc'"],
        id="package-missing",
    ),
    pytest.param("os:nosuch", ["'os'", "no attribute 'nosuch'"], id="attribute-missing"),
    pytest.param(
        "os.path:nosuch.deeper", ["'os.path'", "no attribute 'nosuch'"], id="dotted-missing"
    ),
    pytest.param(
        "cli_app_notcallable:app", ["'cli_app_notcallable:app'", "int", "not"], id="not-callable"
    ),
    pytest.param("cli_app_notcallable:app()", ["'app'", "not callable"], id="call-not-callable"),
    pytest.param(
        "cli_app_unnamed", ["'cli_app_unnamed'", "'app' or 'application'"], id="no-app-name"
    ),
    pytest.param("a b:c", ["'a b:c'", "not an app import string"], id="space-in-module"),
    pytest.param("mod:1+", ["'mod:1+'", "'1+'"], id="bad-expression"),
    pytest.param("mod:1", ["'mod:1'", "a name or a call"], id="literal-expression"),
    pytest.param("mod:a[0]", ["'mod:a[0]'", "a name or a call"], id="subscript"),
    pytest.param("mod:create_app(", ["'mod:create_app('"], id="unclosed-call"),
    pytest.param("mod:create_app(x)", ["literals"], id="non-literal-argument"),
    pytest.param("mod:create_app(*[1])", ["literals"], id="starred-argument"),
    pytest.param("mod:create_app(**{})", ["'mod:create_app(**{})'"], id="double-star-argument"),
    pytest.param(":app", ["':app'", "not an app import string"], id="no-module"),
    pytest.param("pkg.:app", ["'pkg.:app'", "not an app import string"], id="empty-part"),
    pytest.param("1mod:app", ["'1mod:app'", "not an app import string"], id="not-identifier"),
]

APP_LOAD_ERRORS = [
    # (app string, fragments of the error line): exit 1, the app's own code failed
    pytest.param(
        "cli_app_raises", ["'cli_app_raises'", "RuntimeError", "boom at import"], id="raises"
    ),
    pytest.param(
        "cli_app_missing_dep",
        ["'cli_app_missing_dep'", "ModuleNotFoundError", "no_such_dependency_for_microsvc"],
        id="dependency-missing",
    ),
    pytest.param("cli_app_exits", ["'cli_app_exits'", "SystemExit"], id="sys-exit"),
    pytest.param(
        "cli_app_factory:create_app()",
        ["factory raised", "ValueError", "factory boom x"],
        id="factory-raises",
    ),
    pytest.param(
        "cli_app_factory:create_app(name='y')", ["factory boom y"], id="factory-literal-args"
    ),
]


@pytest.mark.parametrize(("app", "fragments"), APP_USAGE_ERRORS)
def test_app_string_usage_error(
    microsvc: Microsvc, app_dir: Path, bind: str, app: str, fragments: list[str]
) -> None:
    microsvc("run", app, "-b", bind, cwd=app_dir).assert_error(2, *fragments)


@pytest.mark.parametrize(("app", "fragments"), APP_LOAD_ERRORS)
def test_app_load_error(
    microsvc: Microsvc, app_dir: Path, bind: str, app: str, fragments: list[str]
) -> None:
    microsvc("run", app, "-b", bind, cwd=app_dir).assert_error(1, *fragments)


@pytest.mark.parametrize(
    ("app", "exit_code", "fragment"),
    [
        pytest.param("cli_app_raises", 1, "boom at import", id="raises"),
        pytest.param("cli_app_notcallable:app", 2, "int", id="not-callable"),
        pytest.param("no_such_module_for_microsvc", 2, "no module named", id="module-missing"),
        pytest.param("cli_app_factory:create_app()", 1, "factory boom", id="factory-raises"),
    ],
)
def test_app_error_with_preload(
    microsvc: Microsvc, app_dir: Path, bind: str, app: str, exit_code: int, fragment: str
) -> None:
    """--preload loads the app in the gunicorn master: the same one line, the same status."""
    microsvc("run", app, "--preload", "-b", bind, cwd=app_dir).assert_error(exit_code, fragment)


@pytest.mark.parametrize("worker_class", ["gevent", "eventlet"])
def test_app_error_with_patching_worker_class(
    microsvc: Microsvc, app_dir: Path, bind: str, worker_class: str
) -> None:
    """A monkey-patched master reports the app's failure the same way."""
    microsvc("run", "cli_app_raises", "-k", worker_class, "-b", bind, cwd=app_dir).assert_error(
        1, "boom at import"
    )


@pytest.mark.parametrize("worker_class", ["gevent", "eventlet"])
def test_bind_in_use_with_patching_worker_class(
    microsvc: Microsvc, busy_port: int, worker_class: str
) -> None:
    address = f"127.0.0.1:{busy_port}"
    microsvc("run", "-k", worker_class, "-b", address).assert_error(1, address, "in use")


def test_app_from_microsvc_app(microsvc: Microsvc, app_dir: Path, bind: str) -> None:
    microsvc(
        "run", "-b", bind, cwd=app_dir, env={"MICROSVC_APP": "no_such_module_for_microsvc"}
    ).assert_error(2, "no module named")


def test_app_string_is_checked_by_plan(microsvc: Microsvc) -> None:
    """`plan` imports nothing but checks the shape of the app string."""
    microsvc("plan", "a b:c").assert_error(2, "'a b:c'")


@pytest.mark.parametrize("app", ["mod:create_app({[1]: 2})", "mod:create_app({1, [2]})"])
def test_app_string_unhashable_literal(microsvc: Microsvc, app: str) -> None:
    """ast.literal_eval raises TypeError for these: still one line, not a traceback."""
    microsvc("plan", app).assert_error(2, repr(app))


def test_empty_app_string(microsvc: Microsvc) -> None:
    microsvc("plan", "").assert_error(2, "''")


# missing extras

MISSING_EXTRA = (
    "import sys; sys.modules[{package!r}] = None; from microsvc.cli import main; "
    "main(['run', '-k', {worker_class!r}, '-b', {bind!r}])"
)


@pytest.mark.parametrize(
    ("worker_class", "package"),
    [("gevent", "gevent"), ("gevent", "packaging"), ("eventlet", "eventlet")],
    ids=["gevent", "gevent-packaging", "eventlet"],
)
def test_missing_extra(microsvc: Microsvc, bind: str, worker_class: str, package: str) -> None:
    code = MISSING_EXTRA.format(package=package, worker_class=worker_class, bind=bind)
    microsvc.python(code).assert_error(1, f"'{package}'", f"pip install 'microsvc[{worker_class}]'")


# listen addresses


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by a listening socket for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_bind_in_use(microsvc: Microsvc, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    microsvc("run", "-b", address).assert_error(1, address, "in use")


def test_bind_in_use_second_address(microsvc: Microsvc, bind: str, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    microsvc("run", "-b", bind, "-b", address).assert_error(1, address, "in use")


def test_bind_in_use_through_port(microsvc: Microsvc, busy_port: int) -> None:
    microsvc("run", env={"PORT": str(busy_port)}).assert_error(
        1, f"127.0.0.1:{busy_port}", "in use"
    )


def test_bind_held_without_listening(microsvc: Microsvc) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        microsvc("run", "-b", address).assert_error(1, address, "in use")


def test_bind_address_not_on_this_machine(microsvc: Microsvc) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): no machine of ours has it.
    microsvc("run", "-b", "192.0.2.1:8000").assert_error(1, "192.0.2.1:8000")


def test_bind_host_does_not_resolve(microsvc: Microsvc) -> None:
    microsvc("run", "-b", "no-such-host.invalid:8000").assert_error(2, "no-such-host.invalid:8000")


def test_bind_unix_socket_in_missing_directory(microsvc: Microsvc, tmp_path: Path) -> None:
    path = tmp_path / "missing" / "app.sock"
    microsvc("run", "-b", f"unix:{path}").assert_error(1, str(path))


def test_bind_closed_file_descriptor(microsvc: Microsvc) -> None:
    # The child gets no descriptors beyond 0-2 (close_fds), so 99 is closed there.
    microsvc("run", "-b", "fd://99").assert_error(1, "fd://99")


# other failures while starting


def test_access_log_in_missing_directory(microsvc: Microsvc, bind: str, tmp_path: Path) -> None:
    path = tmp_path / "missing" / "access.log"
    microsvc("run", "-b", bind, "--access-log", str(path)).assert_error(1, str(path))


def test_access_log_error_has_one_prefix(microsvc: Microsvc, bind: str, tmp_path: Path) -> None:
    path = tmp_path / "missing" / "access.log"
    line = microsvc("run", "-b", bind, "--access-log", str(path)).assert_error(1, str(path))
    assert not line.startswith("Error: Error:")


@pytest.mark.parametrize(
    "setting",
    ["user=no_such_user_for_microsvc", "group=no_such_group_for_microsvc", "chdir=/nonexistent"],
    ids=["user", "group", "chdir"],
)
def test_set_rejected_by_gunicorn_config_error(microsvc: Microsvc, setting: str) -> None:
    microsvc("plan", "--set", setting).assert_error(2, repr(setting.partition("=")[0]))


def test_set_worker_tmp_dir_missing(microsvc: Microsvc, bind: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    microsvc("run", "-b", bind, "--set", f"worker_tmp_dir={missing}").assert_error(2, str(missing))


def test_metrics_address_in_use(microsvc: Microsvc, busy_port: int, bind: str) -> None:
    address = f"127.0.0.1:{busy_port}"
    microsvc("run", "-b", bind, "--metrics", "--metrics-bind", address).assert_error(
        1, "cannot serve metrics on", address, "in use"
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--metrics-bind", "127.0.0.1:9999"], ["--metrics-bind", "needs --metrics"]),
        (["--metrics", "--metrics-bind", "unix:/tmp/m.sock"], ["not a TCP address"]),
        (["--metrics", "--metrics-bind", "127.0.0.1"], ["has no port"]),
        (["--log-format", "xml"], ["--log-format", "not one of"]),
        (
            ["--log-format", "json", "--set", "logger_class=gunicorn.glogging.Logger"],
            ["--log-format json replaces gunicorn's logger_class"],
        ),
    ],
)
def test_metrics_and_log_format_usage_errors(
    microsvc: Microsvc, bind: str, args: list[str], fragments: list[str]
) -> None:
    microsvc("run", "-b", bind, *args).assert_error(2, *fragments)


def test_metrics_bind_same_as_app_address(microsvc: Microsvc, bind: str) -> None:
    microsvc("run", "-b", bind, "--metrics", "--metrics-bind", bind).assert_error(
        2, "is also an app address"
    )


def test_metrics_bind_from_the_environment_without_metrics(microsvc: Microsvc, bind: str) -> None:
    microsvc("run", "-b", bind, env={"MICROSVC_METRICS_BIND": "127.0.0.1:9999"}).assert_error(
        2, "MICROSVC_METRICS_BIND", "needs --metrics"
    )
