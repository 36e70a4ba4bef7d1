"""microsvc.deploy.nginx.render: what the generated configuration says, and what it refuses."""

from __future__ import annotations

import pytest

from microsvc.deploy.nginx import render
from microsvc.errors import UsageError


def blocks(*upstreams: str, listen: str = "0.0.0.0:80", server_name: str = "_") -> str:
    return render(upstreams, listen=listen, server_name=server_name, full=False)


def test_upstream_lists_every_instance_with_failure_limits_and_keepalive() -> None:
    text = blocks("127.0.0.1:5001", "[::1]:5002", "app.internal:5003")
    assert "upstream microsvc {" in text
    for address in ("127.0.0.1:5001", "[::1]:5002", "app.internal:5003"):
        assert f"server {address} max_fails=3 fail_timeout=10s;" in text
    assert "keepalive 32;" in text
    assert "proxy_http_version 1.1;" in text
    assert 'proxy_set_header Connection "";' in text
    assert "proxy_pass http://microsvc;" in text


def test_proxy_headers_timeouts_and_retries() -> None:
    text = blocks("127.0.0.1:5000")
    for line in (
        "proxy_set_header Host $host;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $host;",
        'proxy_set_header X-Request-Start "t=${msec}";',
        "proxy_connect_timeout 5s;",
        "proxy_read_timeout 30s;",
        "proxy_send_timeout 30s;",
        "client_max_body_size 10m;",
        "proxy_next_upstream error timeout http_502 http_503 http_504;",
        "proxy_next_upstream_tries 3;",
        "proxy_next_upstream_timeout 60s;",
    ):
        assert line in text, line
    assert "non_idempotent" not in text


def test_conf_d_output_has_no_main_context_and_full_output_does() -> None:
    text = blocks("127.0.0.1:5000")
    assert "events" not in text and "http {" not in text
    full = render(["127.0.0.1:5000"], listen="127.0.0.1:8080", server_name="_", full=True)
    assert "events {" in full and "http {" in full
    assert "        listen 127.0.0.1:8080;" in full
    assert full.endswith("}\n")


@pytest.mark.parametrize(
    ("server_name", "upstream"),
    [
        ("_", "microsvc"),
        ("api.example.com www.example.com", "microsvc_api_example_com"),
        ("*.example.com", "microsvc_example_com"),
    ],
)
def test_upstream_name_comes_from_the_server_name(server_name: str, upstream: str) -> None:
    text = blocks("127.0.0.1:5000", server_name=server_name)
    assert f"upstream {upstream} {{" in text
    assert f"proxy_pass http://{upstream};" in text
    assert f"server_name {server_name};" in text


def test_listen_on_every_address() -> None:
    assert "listen 0.0.0.0:8080;" in blocks("127.0.0.1:5000", listen=":8080")
    assert "listen [::]:8080;" in blocks("127.0.0.1:5000", listen="[::]:8080")


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ((), "at least one"),
        (("127.0.0.1:5000", "127.0.0.1:05000"), "given twice"),
        (("[::1]:5000", "[0:0:0:0:0:0:0:1]:5000"), "given twice"),
        (("127.0.0.1",), "no port"),
        (("::1:5000",), "brackets"),
        (("127.0.0.1:0",), "port"),
        (("127.0.0.1:70000",), "port"),
        ((":5000",), "no host"),
        (("0.0.0.0:5000",), "connect"),
        (("unix:/tmp/x.sock",), "HOST:PORT"),
        (("bad host;:5000",), "host"),
    ],
)
def test_bad_upstreams_are_usage_errors(upstreams: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        blocks(*upstreams)


@pytest.mark.parametrize("server_name", ["", "   ", "a;b", "evil{", "~^regex$", 'x"y'])
def test_bad_server_names_are_usage_errors(server_name: str) -> None:
    with pytest.raises(UsageError, match="server-name"):
        blocks("127.0.0.1:5000", server_name=server_name)


def test_bad_listen_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--listen"):
        blocks("127.0.0.1:5000", listen="fd://3")


def test_a_string_is_not_a_list_of_upstreams() -> None:
    with pytest.raises(UsageError, match="sequence"):
        render("127.0.0.1:5000", listen=":80", server_name="_", full=False)
