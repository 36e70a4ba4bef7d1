"""The checks `run` makes before any worker starts: the app check in a child process (its
time limit, its report channel) and addresses that overlap. Each failure is one
`Error: ` line and an exit status of its own, well before gunicorn would give up."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc

ENV_APP = (
    "import os\nGREETING = os.environ['MICROSVC_TEST_GREETING']\n"
    "def app(environ, start_response):\n    return []\n"
)
SLOW_APP = "import time\ntime.sleep(120)\ndef app(environ, start_response):\n    return []\n"


def test_app_check_is_bounded_by_the_worker_timeout(
    microsvc: Microsvc, tmp_path: Path, bind: str
) -> None:
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    # Without a bound the check waits out the app's sleep: the call overruns and fails.
    result = microsvc("run", "slow_app:app", "-b", bind, "--timeout", "2", timeout=25)
    result.assert_error(1, "'slow_app:app'", "did not finish within 2 s", "timeout")


def test_app_check_without_raw_env_fails(microsvc: Microsvc, tmp_path: Path, bind: str) -> None:
    """The app reads a variable at import; without it the check fails (with it, see
    tests/e2e/test_e2e_startup.py)."""
    (tmp_path / "env_app.py").write_text(ENV_APP)
    microsvc("run", "env_app:app", "-b", bind).assert_error(1, "KeyError", "GREETING")


@pytest.mark.parametrize("preload", [[], ["--preload"]], ids=["check", "preload"])
def test_raw_env_entry_without_value(microsvc: Microsvc, bind: str, preload: list[str]) -> None:
    microsvc("run", "-b", bind, *preload, "--set", "raw_env=NOEQUALS").assert_error(
        2, "raw_env", "'NOEQUALS'"
    )


@pytest.fixture
def port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("app_host", "metrics_host"),
    [
        pytest.param("0.0.0.0", "127.0.0.1", id="ipv4-wildcard-app"),
        pytest.param("127.0.0.1", "0.0.0.0", id="ipv4-wildcard-metrics"),
        pytest.param("localhost", "127.0.0.1", id="hostname"),
        pytest.param("127.0.0.1", "localhost", id="hostname-metrics"),
    ],
)
def test_metrics_bind_overlapping_the_app_address(
    microsvc: Microsvc, port: int, app_host: str, metrics_host: str
) -> None:
    app, metrics = f"{app_host}:{port}", f"{metrics_host}:{port}"
    microsvc("run", "-b", app, "--metrics", "--metrics-bind", metrics).assert_error(
        2, f"--metrics-bind {metrics}", f"--bind {app}", "overlaps"
    )


def test_metrics_bind_overlapping_under_the_ipv6_wildcard(microsvc: Microsvc, port: int) -> None:
    bindv6only = Path("/proc/sys/net/ipv6/bindv6only")
    if not socket.has_ipv6 or not bindv6only.exists() or bindv6only.read_text().strip() != "0":
        pytest.skip("needs a dual-stack IPv6 machine")
    microsvc(
        "run", "-b", f"[::]:{port}", "--metrics", "--metrics-bind", f"127.0.0.1:{port}"
    ).assert_error(2, "overlaps")


def test_app_addresses_overlapping_each_other(microsvc: Microsvc, port: int) -> None:
    microsvc("run", "-b", f"0.0.0.0:{port}", "-b", f"127.0.0.1:{port}").assert_error(
        2, "overlap", f"0.0.0.0:{port}", f"127.0.0.1:{port}"
    )
