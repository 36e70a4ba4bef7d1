"""microsvc.serving.binding: resolving bind addresses, which of them overlap, and the listening
sockets a master takes over instead of binding, deferred accepts."""

from __future__ import annotations

import os
import select
import socket
import tempfile

import pytest

from microsvc.errors import UsageError
from microsvc.serving.binding import (
    TCPAddress,
    check_overlaps,
    defer_accept,
    inherited_listeners,
    overlap,
    resolve_tcp,
)


def v4(host: str, port: int = 8000) -> TCPAddress:
    return TCPAddress(f"{host}:{port}", socket.AF_INET, (host, port))


def v6(host: str, port: int = 8000) -> TCPAddress:
    return TCPAddress(f"[{host}]:{port}", socket.AF_INET6, (host, port, 0, 0))


@pytest.mark.parametrize(
    ("first", "second", "dual_stack", "expected"),
    [
        pytest.param(v4("127.0.0.1"), v4("127.0.0.1"), True, True, id="same"),
        pytest.param(v4("0.0.0.0"), v4("127.0.0.1"), True, True, id="v4-wildcard"),
        pytest.param(v4("127.0.0.1"), v4("0.0.0.0"), True, True, id="v4-wildcard-second"),
        pytest.param(v4("127.0.0.1"), v4("127.0.0.2"), True, False, id="two-v4-addresses"),
        pytest.param(v4("127.0.0.1"), v4("127.0.0.1", 8001), True, False, id="two-ports"),
        pytest.param(v4("0.0.0.0", 0), v4("0.0.0.0", 0), True, False, id="ephemeral"),
        pytest.param(v6("::"), v4("127.0.0.1"), True, True, id="v6-wildcard-dual-stack"),
        pytest.param(v6("::"), v4("127.0.0.1"), False, False, id="v6-wildcard-v6-only"),
        pytest.param(v4("0.0.0.0"), v6("::1"), True, False, id="v4-wildcard-v6-loopback"),
        pytest.param(v6("::"), v6("::1"), False, True, id="v6-wildcard-v6"),
        pytest.param(v6("::1"), v6("::1"), False, True, id="same-v6"),
        pytest.param(v6("::ffff:127.0.0.1"), v4("127.0.0.1"), False, True, id="v4-mapped"),
    ],
)
def test_overlap(first: TCPAddress, second: TCPAddress, dual_stack: bool, expected: bool) -> None:
    assert overlap(first, second, dual_stack=dual_stack) is expected
    assert overlap(second, first, dual_stack=dual_stack) is expected


def test_resolve_like_gunicorn_takes_ipv4_for_a_host_name() -> None:
    address = resolve_tcp("localhost:8000", "listen on", like_gunicorn=True)
    assert address.family == socket.AF_INET
    assert str(address.ip) == "127.0.0.1"


def test_resolve_unknown_host_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"cannot listen on no-such-host\.invalid:80"):
        resolve_tcp("no-such-host.invalid:80", "listen on")


def test_check_overlaps_names_both_addresses() -> None:
    with pytest.raises(UsageError) as info:
        check_overlaps(["unix:/tmp/x.sock", "127.0.0.1:9000"], "0.0.0.0:9000")
    message = str(info.value)
    assert "--metrics-bind 0.0.0.0:9000" in message
    assert "--bind 127.0.0.1:9000" in message
    check_overlaps(["127.0.0.1:9000", "fd://3"], "127.0.0.1:9100")
    check_overlaps(["127.0.0.1:9000"], None)
    with pytest.raises(UsageError, match=r"--bind 0\.0\.0\.0:9000 and --bind 127\.0\.0\.1:9000"):
        check_overlaps(["0.0.0.0:9000", "127.0.0.1:9000"], None)
    check_overlaps(["0.0.0.0:9000", "127.0.0.1:9000"], None, reuse_port=True)
    with pytest.raises(UsageError, match="--metrics-bind"):
        check_overlaps(["0.0.0.0:9000", "127.0.0.1:9000"], "127.0.0.1:9000", reuse_port=True)


def test_inherited_listeners() -> None:
    pid = str(os.getpid())
    assert inherited_listeners({}) is None
    assert inherited_listeners({"GUNICORN_PID": "1", "GUNICORN_FD": "5,7"}) == [5, 7]
    assert inherited_listeners({"GUNICORN_FD": "5"}) is None  # no master handed them over
    assert inherited_listeners({"LISTEN_PID": pid, "LISTEN_FDS": "2"}) == [3, 4]
    assert inherited_listeners({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) is None  # not ours


def _acceptable(listener: socket.socket, wait: float) -> bool:
    return bool(select.select([listener], [], [], wait)[0])


def test_deferred_listener_offers_a_connection_once_its_first_bytes_arrive() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        class Wrapped:  # as gunicorn wraps a listening socket
            sock = listener

        # 30 s: a silent connection is offered once that time has passed, which no
        # stall of a busy machine reaches before the check below.
        assert defer_accept([Wrapped()], seconds=30) == 1
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            assert not _acceptable(listener, 0.3)  # connected, silent: not offered yet
            client.sendall(b"GET / HTTP/1.1\r\n")
            assert _acceptable(listener, 5)
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.recv(100) == b"GET / HTTP/1.1\r\n"


def test_plain_listener_offers_a_silent_connection_at_once() -> None:
    # What the deferral changes: without it, a silent connection is offered at once.
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname(), timeout=5),
    ):
        assert _acceptable(listener, 5)


def test_defer_accept_leaves_unix_sockets_alone() -> None:
    with (
        tempfile.TemporaryDirectory() as folder,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
        socket.create_server(("127.0.0.1", 0)) as tcp,
    ):
        unix.bind(os.path.join(folder, "sock"))
        unix.listen()
        assert defer_accept([unix, tcp]) == 1
