"""Bad option values on the command line: exit 2, one `Error: ` line naming the option
and the value, no traceback. `plan` resolves and plans without serving; a few cases
also go through `run` to show it rejects them the same way before starting anything."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from microsvc.config.options import OPTIONS, OptionSpec

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc

INVALID_VALUES = [
    # (arguments, fragments of the error line)
    pytest.param(["--workers", "0"], ["--workers", "'0'", ">= 1"], id="workers-0"),
    pytest.param(["--workers", "-1"], ["--workers", "'-1'", ">= 1"], id="workers-negative"),
    pytest.param(["--workers", "abc"], ["--workers", "'abc'", "'auto'"], id="workers-abc"),
    pytest.param(["-w", "abc"], ["--workers", "'abc'"], id="workers-short-flag"),
    pytest.param(["--threads", "0"], ["--threads", "'0'", ">= 1"], id="threads-0"),
    pytest.param(["--threads", "x"], ["--threads", "'x'"], id="threads-x"),
    pytest.param(
        ["-k", "nosuch"],
        ["--worker-class", "'nosuch'", "sync", "gthread", "gevent", "eventlet"],
        id="worker-class-unknown",
    ),
    pytest.param(["--max-workers", "0"], ["--max-workers", "'0'", ">= 1"], id="max-workers-0"),
    pytest.param(
        ["--memory-per-worker", "12XB"],
        ["--memory-per-worker", "'12XB'", "unit"],
        id="memory-per-worker-unit",
    ),
    pytest.param(
        ["--memory-per-worker", "0"],
        ["--memory-per-worker", "'0'", "above zero"],
        id="memory-per-worker-0",
    ),
    pytest.param(
        ["--memory-per-worker", "lots"], ["--memory-per-worker", "'lots'"], id="memory-words"
    ),
    pytest.param(["--bind", "nohost"], ["--bind", "'nohost'", "port"], id="bind-no-port"),
    pytest.param(
        ["--bind", "127.0.0.1:99999"], ["--bind", "'99999'", "65535"], id="bind-port-range"
    ),
    pytest.param(["--bind", "::1:80"], ["--bind", "'::1:80'", "[::1]"], id="bind-ipv6-brackets"),
    pytest.param(["--bind", ""], ["--bind", "''"], id="bind-empty"),
    pytest.param(["--bind", "[::1]"], ["--bind", "'[::1]'"], id="bind-ipv6-no-port"),
    pytest.param(["--bind", "bad/host:80"], ["--bind", "'bad/host'"], id="bind-bad-host"),
    pytest.param(["--bind", "unix:"], ["--bind", "'unix:'"], id="bind-unix-no-path"),
    pytest.param(["--max-requests", "-1"], ["--max-requests", "'-1'", ">= 0"], id="max-req-neg"),
    pytest.param(["--max-requests-jitter", "x"], ["--max-requests-jitter", "'x'"], id="jitter-x"),
    pytest.param(["--timeout", "-5"], ["--timeout", "'-5'", ">= 0"], id="timeout-negative"),
    pytest.param(["--graceful-timeout", "x"], ["--graceful-timeout", "'x'"], id="graceful-x"),
    pytest.param(["--keep-alive", "x"], ["--keep-alive", "'x'"], id="keep-alive-x"),
    pytest.param(
        ["--log-level", "loud"], ["--log-level", "'loud'", "debug", "critical"], id="log-level"
    ),
    pytest.param(["--access-log", ""], ["--access-log", "''"], id="access-log-empty"),
]

CLICK_PARSE_ERRORS = [
    pytest.param(["--workers"], ["--workers", "requires an argument"], id="missing-value"),
    pytest.param(["--no-such-option"], ["--no-such-option"], id="unknown-option"),
    pytest.param(["a:app", "b:app"], ["b:app"], id="two-apps"),
]

SET_ERRORS = [
    pytest.param(["--set", "novalue"], ["--set", "'novalue'", "NAME=VALUE"], id="no-equals"),
    pytest.param(["--set", "=1"], ["--set", "'=1'", "NAME=VALUE"], id="no-name"),
    pytest.param(["--set", "nosuch=1"], ["'nosuch'", "not a gunicorn setting"], id="unknown"),
    pytest.param(["--set", "workers=3"], ["'workers'", "use --workers"], id="owned-workers"),
    pytest.param(["--set", "bind=x:1"], ["'bind'", "use --bind"], id="owned-bind"),
    pytest.param(["--set", "keepalive=5"], ["'keepalive'", "use --keep-alive"], id="owned-ka"),
    pytest.param(["--set", "loglevel=debug"], ["'loglevel'", "use --log-level"], id="owned-log"),
    pytest.param(["--set", "daemon=true"], ["'daemon'", "managed by microsvc"], id="managed"),
    pytest.param(["--set", "config=x.py"], ["'config'", "managed by microsvc"], id="managed-cfg"),
    pytest.param(
        ["--set", "worker_connections=abc"],
        ["'worker_connections'", "'abc'"],
        id="gunicorn-validator",
    ),
    pytest.param(["--set", "worker-connections=abc"], ["'worker_connections'"], id="dashed-name"),
    pytest.param(["--set", "reuse_port=maybe"], ["'reuse_port'", "maybe"], id="gunicorn-bool"),
]

COMBINATIONS = [
    pytest.param(
        ["--threads", "4", "-k", "sync"], ["--threads 4", "gthread"], id="threads-with-sync"
    ),
    pytest.param(
        ["--threads", "2", "-k", "gevent"], ["--threads 2", "gthread"], id="threads-with-gevent"
    ),
    pytest.param(["--threads", "4"], ["--threads 4", "gthread"], id="threads-default-class"),
    pytest.param(
        ["--max-requests-jitter", "5"],
        ["--max-requests-jitter", "--max-requests"],
        id="jitter-without-max-requests",
    ),
    pytest.param(
        ["--max-requests-jitter", "5", "--max-requests", "0"],
        ["--max-requests-jitter", "--max-requests"],
        id="jitter-with-max-requests-0",
    ),
    pytest.param(["--preload", "--reload"], ["--preload", "--reload"], id="preload-reload"),
]


@pytest.mark.parametrize(("args", "fragments"), INVALID_VALUES)
def test_invalid_option_value(microsvc: Microsvc, args: list[str], fragments: list[str]) -> None:
    microsvc("plan", *args).assert_error(2, *fragments)


@pytest.mark.parametrize(("args", "fragments"), CLICK_PARSE_ERRORS)
def test_click_parse_error(microsvc: Microsvc, args: list[str], fragments: list[str]) -> None:
    microsvc("plan", *args).assert_error(2, *fragments)


@pytest.mark.parametrize(("args", "fragments"), SET_ERRORS)
def test_invalid_set(microsvc: Microsvc, args: list[str], fragments: list[str]) -> None:
    microsvc("plan", *args).assert_error(2, *fragments)


@pytest.mark.parametrize(("args", "fragments"), COMBINATIONS)
def test_invalid_combination(microsvc: Microsvc, args: list[str], fragments: list[str]) -> None:
    microsvc("plan", *args).assert_error(2, *fragments)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(["--workers", "0"], ["--workers", "'0'"], id="value"),
        pytest.param(["-k", "nosuch"], ["'nosuch'"], id="choice"),
        pytest.param(["--set", "nosuch=1"], ["'nosuch'"], id="set"),
        pytest.param(["--set", "workers=3"], ["use --workers"], id="set-owned"),
        pytest.param(["--threads", "4", "-k", "sync"], ["gthread"], id="combination"),
        pytest.param(["--preload", "--reload"], ["--reload"], id="preload-reload"),
    ],
)
def test_run_rejects_before_serving(
    microsvc: Microsvc, bind: str, args: list[str], fragments: list[str]
) -> None:
    """`run` parses exactly like `plan`: the same error, and it exits on its own."""
    microsvc("run", "-b", bind, *args).assert_error(2, *fragments)


#: Options where an empty value is meaningful: no path served, no proxy trusted; the
#: value each then has.
EMPTY_MEANS_NONE: dict[str, list[str] | None] = {
    "health_path": None,
    "ready_path": None,
    "forwarded_allow_ips": [],
}


@pytest.mark.parametrize(
    "spec",
    [spec for spec in OPTIONS if not spec.is_flag and spec.name not in EMPTY_MEANS_NONE],
    ids=lambda spec: spec.flag,
)
def test_every_valued_option_rejects_an_empty_value(microsvc: Microsvc, spec: OptionSpec) -> None:
    """Each option of the registry that takes a value refuses an empty one."""
    microsvc("plan", spec.flag, "").assert_error(2, spec.flag)


@pytest.mark.parametrize("name", sorted(EMPTY_MEANS_NONE))
def test_empty_value_turns_the_option_off(microsvc: Microsvc, name: str) -> None:
    flag = "--" + name.replace("_", "-")
    result = microsvc("plan", "--json", flag, "")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"][name]["value"] == EMPTY_MEANS_NONE[name]
