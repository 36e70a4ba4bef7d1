"""The shared harness's pure parts: wrk's output read and cross-checked, taskset's CPU
lists, the clean child environment."""

from __future__ import annotations

import itertools
import socket

import pytest

from harness import HarnessError, clean_env, cpu_list, parse_output

BENCH_LINE = (
    "BENCH requests=120 responses=120 non2xx=20 connect=0 read=2 write=0 timeout=1 "
    "status=20 duration_us=2000000 bytes=9000 p50_us=900 p90_us=1500 p99_us=4000 "
    "mean_us=1000.5 max_us=9000"
)
WRK_TEXT = f"""Running 2s test @ http://127.0.0.1:8000/data
  120 requests in 2.00s, 8.79KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 20
{BENCH_LINE}
"""


def test_the_bench_line_gives_every_figure_and_the_derived_ones() -> None:
    result = parse_output(WRK_TEXT, "http://127.0.0.1:8000/data", 8)
    assert (result.responses, result.non2xx, result.socket_errors) == (120, 20, 3)
    assert result.failed == 23 and result.sent == 123
    assert result.rps == 50.0 and result.seconds == 2.0
    figures = result.as_dict()
    assert figures["p99_ms"] == 4.0 and figures["errors"] == 23 and "text" not in figures
    assert "123 requests, 23 failed" in str(result) and "at 8 connections" in str(result)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Running 2s test\n", "no BENCH line"),
        (BENCH_LINE.replace("max_us=9000", "max_us=x"), "malformed"),
        (WRK_TEXT.replace("read 2,", "read 3,"), "disagree on socket errors"),
        (WRK_TEXT.replace("responses: 20", "responses: 21"), "status errors"),
        (WRK_TEXT.replace("responses=120", "responses=119"), "Lua counted 119"),
    ],
    ids=["missing", "malformed", "socket-errors", "statuses", "responses"],
)
def test_a_missing_or_inconsistent_result_is_an_error(text: str, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        parse_output(text)


@pytest.mark.parametrize(
    ("cpus", "shown"),
    [(None, ""), ((0,), "0"), ((2, 0, 1), "0-2"), ((0, 2, 4, 5, 6, 9), "0,2,4-6,9")],
)
def test_cpu_lists_are_written_as_taskset_reads_them(
    cpus: tuple[int, ...] | None, shown: str
) -> None:
    assert cpu_list(cpus) == shown


def test_the_child_environment_drops_what_would_change_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MICROSVC_WORKERS", "WEB_CONCURRENCY", "PORT", "GUNICORN_CMD_ARGS"):
        monkeypatch.setenv(name, "3")
    monkeypatch.setenv("KEPT_BY_HARNESS", "yes")
    env = clean_env({"XDG_RUNTIME_DIR": "/tmp/x"})
    assert not {"MICROSVC_WORKERS", "WEB_CONCURRENCY", "PORT", "GUNICORN_CMD_ARGS"} & set(env)
    assert env["KEPT_BY_HARNESS"] == "yes" and env["XDG_RUNTIME_DIR"] == "/tmp/x"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_free_ports_are_taken_below_the_ephemeral_range() -> None:
    """A port from the ephemeral range can become another connection's local port before
    the server binds it; ports below it cannot."""
    from harness.servers import LOW_PORTS_FROM, ephemeral_ports, free_port

    low, high = ephemeral_ports()
    assert low <= high
    ports = {free_port() for _ in range(20)}
    if low - LOW_PORTS_FROM >= 1000:
        assert all(LOW_PORTS_FROM <= port < low for port in ports), ports
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_test_processes_running_side_by_side_pick_ports_from_separate_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from harness.servers import port_share

    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    slices = []
    for index in range(4):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        slices.append(port_share(20000, 32768))
    assert slices[0][0] == 20000 and slices[-1][1] <= 32768
    for (_, end), (start, _) in itertools.pairwise(slices):
        assert end <= start  # disjoint, in order
    assert all(end - start == 3192 for start, end in slices)

    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert port_share(20000, 32768) == (20000, 32768)  # not under pytest-xdist
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "400")
    assert port_share(20000, 32768) == (20000, 32768)  # slices too small to be worth it
