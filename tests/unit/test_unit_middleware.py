"""The health/readiness and proxy-trust middleware, called directly with environ dicts."""

from __future__ import annotations

import ipaddress
import json
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from microsvc.serving import middleware
from microsvc.serving.middleware import PROXY_ADDR_KEY, TrustedProxies, wrap


class InnerApp:
    """A WSGI app that records the environ it saw and has its own /health route."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        self.seen.append(dict(environ))
        if environ["PATH_INFO"] == "/health":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"app health"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"app:" + environ["PATH_INFO"].encode()]

    @property
    def last(self) -> dict[str, Any]:
        return self.seen[-1]


class Response:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


def call(app: Callable[..., Iterable[bytes]], **environ: Any) -> Response:
    recorded: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        recorded.append((status, headers))
        return lambda data: None

    body = b"".join(app(environ, start_response))
    assert len(recorded) == 1
    return Response(recorded[0][0], recorded[0][1], body)


def env(
    path: str = "/",
    method: str = "GET",
    remote: str | None = "203.0.113.9",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8000",
        "HTTP_HOST": "internal:8000",
        "REMOTE_PORT": "50000",
        "wsgi.url_scheme": "http",
    }
    if remote is not None:
        environ["REMOTE_ADDR"] = remote
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    environ.update(extra)
    return environ


class Ready:
    def __init__(self, value: bool) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.value


def make(
    inner: InnerApp | None = None,
    *,
    health_path: str | None = "/healthz",
    ready_path: str | None = "/readyz",
    is_ready: Callable[[], bool] | None = None,
    trusted: Sequence[str] = (),
    **kw: Any,
) -> middleware.Middleware:
    return wrap(
        inner or InnerApp(),
        health_path=health_path,
        ready_path=ready_path,
        is_ready=is_ready or Ready(True),
        trusted_proxies=trusted,
        **kw,
    )


# health and readiness


def test_health_answers_ok_json_without_calling_the_app() -> None:
    inner = InnerApp()
    response = call(make(inner), **env("/healthz"))
    assert response.code == 200
    assert response.json() == {"status": "ok"}
    assert response.header("Content-Type") == "application/json"
    assert response.header("Cache-Control") == "no-store"
    assert response.header("Content-Length") == str(len(response.body))
    assert inner.seen == []


def test_health_does_not_ask_readiness() -> None:
    ready = Ready(False)
    assert call(make(is_ready=ready), **env("/healthz")).code == 200
    assert ready.calls == 0


def test_ready_answers_200_when_ready() -> None:
    inner = InnerApp()
    response = call(make(inner, is_ready=Ready(True)), **env("/readyz"))
    assert response.code == 200
    assert response.json() == {"status": "ready"}
    assert response.header("Cache-Control") == "no-store"
    assert inner.seen == []


def test_ready_answers_503_when_not_ready() -> None:
    response = call(make(is_ready=Ready(False)), **env("/readyz"))
    assert response.status == "503 Service Unavailable"
    assert response.json() == {"status": "not ready"}
    assert response.header("Content-Type") == "application/json"


def test_readiness_is_asked_on_every_request() -> None:
    ready = Ready(True)
    app = make(is_ready=ready)
    assert call(app, **env("/readyz")).code == 200
    ready.value = False  # the Launcher starts draining
    assert call(app, **env("/readyz")).code == 503
    assert ready.calls == 2


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_head_has_the_headers_and_no_body(path: str) -> None:
    response = call(make(), **env(path, method="HEAD"))
    assert response.code == 200
    assert response.body == b""
    assert response.header("Content-Type") == "application/json"
    assert int(response.header("Content-Length") or 0) > 0


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_get_405_with_allow(path: str, method: str) -> None:
    inner = InnerApp()
    response = call(make(inner), **env(path, method=method))
    assert response.status == "405 Method Not Allowed"
    assert response.header("Allow") == "GET, HEAD"
    assert response.header("Content-Length") == str(len(response.body))
    assert inner.seen == []


@pytest.mark.parametrize(
    "path", ["/healthz/", "/healthzx", "/healthz/x", "/health", "/HEALTHZ", "/readyz/", "/", ""]
)
def test_only_the_exact_path_is_answered(path: str) -> None:
    inner = InnerApp()
    call(make(inner), **env(path))
    assert inner.last["PATH_INFO"] == path


def test_the_apps_own_routes_still_work() -> None:
    inner = InnerApp()
    response = call(make(inner), **env("/health", method="POST"))
    assert (response.code, response.body) == (200, b"app health")
    assert inner.last["REQUEST_METHOD"] == "POST"


def test_query_string_does_not_change_the_match() -> None:
    assert call(make(InnerApp()), **env("/healthz", QUERY_STRING="verbose=1")).code == 200


def test_paths_are_relative_to_script_name() -> None:
    inner = InnerApp()
    app = make(inner)
    assert call(app, **env("/healthz", SCRIPT_NAME="/api")).json() == {"status": "ok"}
    call(app, **env("/api/healthz", SCRIPT_NAME=""))
    assert inner.last["PATH_INFO"] == "/api/healthz"


@pytest.mark.parametrize("off", ["health_path", "ready_path"])
def test_a_path_that_is_off_goes_to_the_app(off: str) -> None:
    inner = InnerApp()
    path = {"health_path": "/healthz", "ready_path": "/readyz"}[off]

    def without_path() -> middleware.Middleware:
        if off == "health_path":
            return make(inner, health_path=None)
        return make(inner, ready_path=None)

    response = call(without_path(), **env(path))
    assert response.code == 404
    assert response.body == b"app:" + path.encode()
    other = "/readyz" if off == "health_path" else "/healthz"
    assert call(without_path(), **env(other)).code == 200


def test_custom_paths() -> None:
    inner = InnerApp()
    app = make(inner, health_path="/_/live", ready_path="/_/ready")
    assert call(app, **env("/_/live")).json() == {"status": "ok"}
    assert call(app, **env("/_/ready")).json() == {"status": "ready"}
    call(app, **env("/healthz"))
    assert inner.last["PATH_INFO"] == "/healthz"


def test_other_paths_reach_the_app_unchanged() -> None:
    inner = InnerApp()
    environ = env("/orders/7", method="POST", headers={"X-Forwarded-For": "198.51.100.1"})
    before = dict(environ)
    response = call(make(inner), **environ)
    assert response.body == b"app:/orders/7"
    assert inner.last == before


@pytest.mark.parametrize(
    ("health", "ready"), [("/same", "/same"), ("healthz", "/readyz"), ("/healthz", "readyz")]
)
def test_bad_paths_are_rejected(health: str, ready: str) -> None:
    with pytest.raises(ValueError):
        make(health_path=health, ready_path=ready)


def test_app_exceptions_propagate() -> None:
    def broken(environ: object, start_response: object) -> list[bytes]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        call(wrap(broken, health_path=None, ready_path=None, is_ready=bool, trusted_proxies=()))


# proxy trust


def forwarded(
    trusted: Sequence[str],
    remote: str | None,
    headers: dict[str, str],
    **kw: Any,
) -> dict[str, Any]:
    """The environ the inner app sees for one request."""
    inner = InnerApp()
    call(make(inner, trusted=trusted, **kw), **env("/x", remote=remote, headers=headers))
    return inner.last


def test_trusted_peer_single_forwarded_for() -> None:
    seen = forwarded(["127.0.0.1"], "127.0.0.1", {"X-Forwarded-For": "198.51.100.7"})
    assert seen["REMOTE_ADDR"] == "198.51.100.7"
    assert seen[PROXY_ADDR_KEY] == "127.0.0.1"


def test_trusted_peer_chain_skips_trusted_hops_from_the_right() -> None:
    seen = forwarded(
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        "10.0.0.1",
        {"X-Forwarded-For": "6.6.6.6, 198.51.100.7, 10.0.0.3, 10.0.0.2"},
    )
    assert seen["REMOTE_ADDR"] == "198.51.100.7"  # not the forgeable 6.6.6.6
    assert seen[PROXY_ADDR_KEY] == "10.0.0.1"


def test_chain_of_only_trusted_hops_gives_the_leftmost() -> None:
    seen = forwarded(["10.0.0.0/8"], "10.0.0.1", {"X-Forwarded-For": "10.1.1.1, 10.2.2.2"})
    assert seen["REMOTE_ADDR"] == "10.1.1.1"


def test_untrusted_hop_in_the_middle_stops_the_walk() -> None:
    seen = forwarded(
        ["10.0.0.0/8"], "10.0.0.1", {"X-Forwarded-For": "10.9.9.9, 198.51.100.7, 10.2.2.2"}
    )
    assert seen["REMOTE_ADDR"] == "198.51.100.7"


def test_repeated_headers_joined_by_the_server_are_one_list() -> None:
    # gunicorn joins repeated X-Forwarded-For headers with ",", without a space
    seen = forwarded(["10.0.0.0/8"], "10.0.0.1", {"X-Forwarded-For": "198.51.100.7,10.2.2.2"})
    assert seen["REMOTE_ADDR"] == "198.51.100.7"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "198.51.100.7"},
        {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"},
        {"X-Forwarded-Host": "evil.example"},
    ],
)
def test_untrusted_peer_forging_headers_changes_nothing(headers: dict[str, str]) -> None:
    seen = forwarded(["127.0.0.1", "10.0.0.0/8"], "203.0.113.9", headers)
    assert seen["REMOTE_ADDR"] == "203.0.113.9"
    assert seen["wsgi.url_scheme"] == "http"
    assert seen["HTTP_HOST"] == "internal:8000"
    assert PROXY_ADDR_KEY not in seen


def test_network_trust() -> None:
    trusted = ["10.0.0.0/8"]
    header = {"X-Forwarded-For": "198.51.100.7"}
    assert forwarded(trusted, "10.200.3.4", header)["REMOTE_ADDR"] == "198.51.100.7"
    assert forwarded(trusted, "11.0.0.1", header)["REMOTE_ADDR"] == "11.0.0.1"


def test_ipv6_peer_and_client() -> None:
    trusted = ["::1", "fd00::/8"]
    header = {"X-Forwarded-For": "2001:db8::7, fd00::2"}
    seen = forwarded(trusted, "::1", header)
    assert seen["REMOTE_ADDR"] == "2001:db8::7"
    assert seen[PROXY_ADDR_KEY] == "::1"
    assert forwarded(trusted, "2001:db8::99", header)["REMOTE_ADDR"] == "2001:db8::99"


def test_ipv6_addresses_are_normalized() -> None:
    seen = forwarded(["::1"], "::1", {"X-Forwarded-For": "2001:DB8:0:0:0:0:0:7"})
    assert seen["REMOTE_ADDR"] == "2001:db8::7"


@pytest.mark.parametrize(
    ("entry", "client"),
    [
        ("198.51.100.7:4711", "198.51.100.7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
    ],
)
def test_addresses_with_ports_or_brackets(entry: str, client: str) -> None:
    seen = forwarded(["127.0.0.1"], "127.0.0.1", {"X-Forwarded-For": entry})
    assert seen["REMOTE_ADDR"] == client


def test_ipv4_mapped_peer_matches_ipv4_networks() -> None:
    seen = forwarded(["10.0.0.0/8"], "::ffff:10.0.0.1", {"X-Forwarded-For": "198.51.100.7"})
    assert seen["REMOTE_ADDR"] == "198.51.100.7"


def test_star_trusts_every_peer_but_only_the_entry_it_wrote() -> None:
    # curl -H 'X-Forwarded-For: 6.6.6.6, 203.0.113.9' through a proxy that appends nothing
    # or that is itself the peer: 6.6.6.6 is what the client wrote.
    header = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}
    seen = forwarded(["*"], "127.0.0.1", header)
    assert seen["REMOTE_ADDR"] == "203.0.113.9"
    assert seen[PROXY_ADDR_KEY] == "127.0.0.1"


#: (trusted, X-Forwarded-For as the app gets it, the client; None: REMOTE_ADDR stays the peer)
WALKS = [
    # '*': the rightmost entry, whatever the client wrote left of it
    (["*"], "203.0.113.9", "203.0.113.9"),
    (["*"], "6.6.6.6, 203.0.113.9", "203.0.113.9"),
    (["*"], "6.6.6.6,203.0.113.9", "203.0.113.9"),  # two header lines, joined by gunicorn
    (["*"], "6.6.6.6, 7.7.7.7,203.0.113.9", "203.0.113.9"),  # a list in the client's line
    (["*"], "127.0.0.1, 10.0.0.1, 203.0.113.9", "203.0.113.9"),  # claims of trusted hops
    (["*"], "6.6.6.6, 203.0.113.9, ", "203.0.113.9"),  # empty list elements are skipped
    (["*"], "6.6.6.6, 203.0.113.9:4711", "203.0.113.9"),
    (["*"], "6.6.6.6, [2001:db8::9]:443", "2001:db8::9"),
    (["*"], "2001:db8::6, 2001:DB8::9", "2001:db8::9"),
    (["*"], "6.6.6.6, unknown", None),  # the rightmost is not an address: no client
    (["*"], "6.6.6.6, _hidden", None),
    (["*"], "6.6.6.6 203.0.113.9", None),  # not a list
    (["*"], "6.6.6.6; 203.0.113.9", None),
    (["*"], "for=203.0.113.9", None),  # Forwarded syntax is not X-Forwarded-For
    # '*' with listed proxies: the listed ones are walked past
    (["*", "10.0.0.0/8"], "6.6.6.6, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
    (["*", "10.0.0.0/8"], "10.0.0.5, 10.0.0.2", "10.0.0.5"),
    # listed proxies: the first address from the right that is not one of them
    (["10.0.0.1"], "6.6.6.6, 203.0.113.9", "203.0.113.9"),
    (["10.0.0.0/8"], "6.6.6.6, 203.0.113.9, 10.0.0.3", "203.0.113.9"),
    (["10.0.0.0/8"], "6.6.6.6,203.0.113.9,10.0.0.3,10.0.0.2", "203.0.113.9"),
    (["10.0.0.0/8"], "6.6.6.6, 203.0.113.9, ::ffff:10.0.0.3", "203.0.113.9"),
    (["10.0.0.0/8"], "6.6.6.6, 10.0.0.3:8080", "6.6.6.6"),  # 10.0.0.3 says it saw 6.6.6.6
    (["10.0.0.0/8"], "6.6.6.6, garbage, 10.0.0.3", "10.0.0.3"),
    (["10.0.0.0/8"], "6.6.6.6, 10.0.0.3, unknown", None),
    (["10.0.0.0/8"], "6.6.6.6, 10.0.0.256", None),
    (["10.0.0.1", "fd00::/8"], "2001:db8::6, 2001:db8::7, fd00::2", "2001:db8::7"),
    (["10.0.0.1", "fd00::/8"], "2001:db8::6, [2001:db8::7]:1234, [fd00::2]", "2001:db8::7"),
    (["10.0.0.1", "fd00::/8"], "2001:db8::6, 2001:db8::7%eth0", None),  # no scopes
]


@pytest.mark.parametrize(("trusted", "header", "client"), WALKS)
def test_the_walk_from_the_right(trusted: list[str], header: str, client: str | None) -> None:
    peer = "10.0.0.1"
    seen = forwarded(trusted, peer, {"X-Forwarded-For": header})
    assert seen["REMOTE_ADDR"] == (client or peer)
    assert seen.get(PROXY_ADDR_KEY) == (peer if client else None)
    assert TrustedProxies(trusted).client_address(header) == client


@pytest.mark.parametrize(("trusted", "header", "client"), WALKS)
def test_what_a_client_writes_left_of_the_proxys_entries_never_wins(
    trusted: list[str], header: str, client: str | None
) -> None:
    # A client puts what it likes in front of what the proxies wrote, in its own header
    # line or in the same one: the walk stops before it. Only when every entry is a listed
    # proxy does the walk reach it (trusted networks that hold clients: see the docs).
    proxies = TrustedProxies(trusted)
    if client is not None and proxies.contains(ipaddress.ip_address(client)):
        return
    for forged in ("1.1.1.1", "1.1.1.1, 10.0.0.9", "::1,127.0.0.1", "garbage", "", "[::1]:80"):
        assert proxies.client_address(f"{forged},{header}") == client, forged
        assert proxies.client_address(f"{forged}, {header}") == client, forged


def test_empty_trust_list_trusts_no_ip_peer() -> None:
    headers = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}
    seen = forwarded([], "127.0.0.1", headers)
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["wsgi.url_scheme"] == "http"


def test_unix_socket_peer_is_trusted_like_gunicorn() -> None:
    seen = forwarded(["127.0.0.1"], "", {"X-Forwarded-For": "198.51.100.7"})
    assert seen["REMOTE_ADDR"] == "198.51.100.7"
    assert seen[PROXY_ADDR_KEY] == ""


def test_unix_socket_peer_can_be_untrusted() -> None:
    header = {"X-Forwarded-For": "198.51.100.7"}
    seen = forwarded(["127.0.0.1"], "", header, trust_socket_peers=False)
    assert seen["REMOTE_ADDR"] == ""


def test_missing_remote_addr_is_not_trusted() -> None:
    seen = forwarded(["*"], None, {"X-Forwarded-For": "198.51.100.7"})
    assert "REMOTE_ADDR" not in seen


@pytest.mark.parametrize(
    "header",
    [
        "not-an-ip",
        "unknown",
        "198.51.100.300",
        "1.2.3.4:port",
        "1.2.3.4:99999999",
        "[2001:db8::7",
        "[2001:db8::7]x",
        "[1.2.3.4]:80",
        "2001:db8::zz",
        "",
        " , ,",
        "\x00",
        "\uff11.\uff12.\uff13.\uff14",  # fullwidth digits
        "1.2.3.4:\u0661\u0662",  # Arabic-Indic digits
        "fe80::1%eth0",
        "[fe80::1%25eth0]:80",
        "::1%<script>",
    ],
)
def test_malformed_forwarded_for_is_ignored(header: str) -> None:
    seen = forwarded(["127.0.0.1"], "127.0.0.1", {"X-Forwarded-For": header})
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert PROXY_ADDR_KEY not in seen


def test_malformed_entry_ends_the_walk() -> None:
    # Left of the bad entry nothing is believed; the nearest good hop right of it wins.
    seen = forwarded(
        ["10.0.0.0/8"], "10.0.0.1", {"X-Forwarded-For": "198.51.100.7, garbage, 10.2.2.2"}
    )
    assert seen["REMOTE_ADDR"] == "10.2.2.2"


def test_empty_entries_are_skipped() -> None:
    seen = forwarded(["127.0.0.1"], "127.0.0.1", {"X-Forwarded-For": "198.51.100.7, ,"})
    assert seen["REMOTE_ADDR"] == "198.51.100.7"


def test_non_string_header_values_are_ignored() -> None:
    inner = InnerApp()
    environ = env("/x", remote="127.0.0.1", HTTP_X_FORWARDED_FOR=None, HTTP_X_FORWARDED_PROTO=1)
    call(make(inner, trusted=["127.0.0.1"]), **environ)
    assert (inner.last["REMOTE_ADDR"], inner.last["wsgi.url_scheme"]) == ("127.0.0.1", "http")


@pytest.mark.parametrize("proto", ["https", "HTTPS", "http", "http, https", "https, http"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_scheme_is_left_as_the_server_set_it(proto: str, scheme: str) -> None:
    # gunicorn decides wsgi.url_scheme from its secure_scheme_headers for the same peers
    inner = InnerApp()
    headers = {"X-Forwarded-Proto": proto, "X-Forwarded-For": "198.51.100.7"}
    environ = env("/x", remote="127.0.0.1", headers=headers)
    environ["wsgi.url_scheme"] = scheme
    call(make(inner, trusted=["*"]), **environ)
    assert (inner.last["wsgi.url_scheme"], inner.last["REMOTE_ADDR"]) == (scheme, "198.51.100.7")


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("api.example.com", "api.example.com"),
        ("api.example.com:8443", "api.example.com:8443"),
        ("inner.example, api.example.com", "api.example.com"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("evil.example/path", "internal:8000"),
        ("a b", "internal:8000"),
        ("user@evil.example", "internal:8000"),
        ("", "internal:8000"),
        ("api.example.com, ", "internal:8000"),
        ("evil.example,api.example.com", "api.example.com"),  # two lines: the proxy's is last
        ("api.example.com, evil.example/x", "internal:8000"),
    ],
)
def test_forwarded_host(value: str, host: str) -> None:
    seen = forwarded(["127.0.0.1"], "127.0.0.1", {"X-Forwarded-Host": value})
    assert seen["HTTP_HOST"] == host


def test_host_without_forwarded_for_keeps_the_address() -> None:
    headers = {"X-Forwarded-Host": "api.example.com"}
    seen = forwarded(["127.0.0.1"], "127.0.0.1", headers)
    assert seen["HTTP_HOST"] == "api.example.com"
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert PROXY_ADDR_KEY not in seen


def test_the_callers_environ_is_changed_in_place() -> None:
    # gunicorn's access log reads REMOTE_ADDR from the same dict after the app ran
    environ = env("/x", remote="127.0.0.1", headers={"X-Forwarded-For": "198.51.100.7"})
    make(trusted=["127.0.0.1"])(environ, lambda status, headers, exc_info=None: None)
    assert environ["REMOTE_ADDR"] == "198.51.100.7"


def test_health_paths_are_answered_for_untrusted_peers_with_headers() -> None:
    app = make(trusted=["127.0.0.1"])
    environ = env("/healthz", remote="203.0.113.9", headers={"X-Forwarded-For": "1.1.1.1"})
    assert call(app, **environ).code == 200


# construction and cost


def test_trusted_list_as_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match="not a string"):
        make(trusted="10.0.0.1")  # would otherwise be read character by character


def test_invalid_trusted_entry_is_refused() -> None:
    with pytest.raises(ValueError):
        make(trusted=["10.0.0.1", "proxy.internal"])


def test_blank_trusted_entries_are_skipped() -> None:
    assert TrustedProxies([" ", "10.0.0.1 "]).networks == (ipaddress.ip_network("10.0.0.1"),)


def test_untrusted_peer_without_forwarded_headers_parses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inner = InnerApp()
    app = make(inner, trusted=["10.0.0.0/8"])

    def forbidden(text: str) -> None:
        raise AssertionError(f"parsed {text!r} on the hot path")

    monkeypatch.setattr(ipaddress, "ip_address", forbidden)
    call(app, **env("/x", remote="203.0.113.9"))
    assert inner.last["REMOTE_ADDR"] == "203.0.113.9"


def test_peer_and_hop_decisions_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = InnerApp()
    app = make(inner, trusted=["10.0.0.0/8"])
    environ = env("/x", remote="10.0.0.1", headers={"X-Forwarded-For": "198.51.100.7"})
    call(app, **environ)
    calls: list[str] = []
    real = ipaddress.ip_address

    def counting(text: str) -> Any:
        calls.append(text)
        return real(text)

    monkeypatch.setattr(ipaddress, "ip_address", counting)
    call(app, **environ)
    call(app, **env("/x", remote="203.0.113.9", headers={"X-Forwarded-For": "1.1.1.1"}))
    call(app, **env("/x", remote="203.0.113.9", headers={"X-Forwarded-For": "1.1.1.1"}))
    assert calls == ["203.0.113.9"]
    assert inner.last["REMOTE_ADDR"] == "203.0.113.9"


# agreement with gunicorn


@pytest.mark.parametrize("allow", ["127.0.0.1,::1", "10.0.0.0/8,fd00::/8", "*", "192.168.1.10", ""])
@pytest.mark.parametrize(
    "peer",
    ["127.0.0.1", "::1", "10.1.2.3", "fd00::5", "192.168.1.10", "203.0.113.9", "2001:db8::1"],
)
def test_peer_trust_agrees_with_gunicorn(allow: str, peer: str) -> None:
    from gunicorn.config import Config
    from gunicorn.http.message import _ip_in_allow_list

    cfg = Config()
    cfg.set("forwarded_allow_ips", allow)
    expected = _ip_in_allow_list(peer, cfg.forwarded_allow_ips, cfg.forwarded_allow_networks())
    ours = TrustedProxies([part for part in allow.split(",") if part])
    assert ours.peer_is_trusted(peer) is expected
    seen = forwarded(allow.split(","), peer, {"X-Forwarded-For": "198.51.100.7"})
    assert seen["REMOTE_ADDR"] == ("198.51.100.7" if expected else peer)


# queue time and load shedding

NOW = 1_800_000_000.25


@pytest.mark.parametrize(
    ("stamp", "waited"),
    [
        ("t=1800000000.000", 0.25),  # nginx t=${msec}
        ("1800000000", 0.25),  # plain seconds
        ("1800000000.050", 0.2),
        ("t=1800000000000", 0.25),  # milliseconds (Heroku's router)
        ("1800000000000000", 0.25),  # microseconds
        ("t=1800000000000000", 0.25),
        ("1800000000000000000", 0.25),  # nanoseconds
        (" t=1799999999.25 ", 1.0),
    ],
)
def test_request_start_forms(stamp: str, waited: float) -> None:
    got = middleware.parse_request_start(stamp, NOW)
    assert got is not None
    assert abs(got - waited) < 1e-6, (stamp, got)


@pytest.mark.parametrize(
    "stamp", ["", "t=", "abc", "t=12.5.6", "-1800000000", "t=1e9", "1800000000.0000000001x"]
)
def test_request_start_that_is_not_a_stamp_is_ignored(stamp: str) -> None:
    assert middleware.parse_request_start(stamp, NOW) is None


def test_request_start_in_the_future_is_zero_and_too_old_is_ignored() -> None:
    assert middleware.parse_request_start("t=1800000005.0", NOW) == 0.0
    assert middleware.parse_request_start("t=1700000000.0", NOW) is None


def stamped(seconds_ago: float) -> dict[str, str]:
    import time

    return {"X-Request-Start": f"t={time.time() - seconds_ago:.3f}"}


def test_queue_time_from_a_trusted_proxy() -> None:
    inner = InnerApp()
    app = make(inner, trusted=["10.0.0.0/8"])
    call(app, **env("/x", remote="10.0.0.2", headers=stamped(0.5)))
    assert inner.last[middleware.QUEUE_SOURCE_KEY] == "proxy"
    assert 0.45 < inner.last[middleware.QUEUE_TIME_KEY] < 5


def test_queue_time_header_of_an_untrusted_peer_is_ignored() -> None:
    inner = InnerApp()
    app = make(inner, trusted=["10.0.0.0/8"], max_queue_time=1.0)
    response = call(app, **env("/x", remote="203.0.113.9", headers=stamped(30)))
    assert response.code == 404  # the app answered
    assert middleware.QUEUE_TIME_KEY not in inner.last


def test_shed_when_waited_longer_than_the_limit() -> None:
    inner = InnerApp()
    app = make(inner, trusted=["10.0.0.0/8"], max_queue_time=1.0)
    environ = env("/x", remote="10.0.0.2", headers=stamped(2.5))
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses == ["503 Service Unavailable"]
    response = call(app, **env("/x", remote="10.0.0.2", headers=stamped(2.5)))
    assert response.body == body
    assert response.header("Retry-After") == "1"
    assert response.json() == {"error": "overloaded, retry later"}
    assert inner.seen == []  # the app never ran
    assert environ[middleware.SHED_KEY] is True
    assert environ[middleware.ROUTE_KEY] == middleware.SHED_ROUTE
    assert environ[middleware.QUEUE_TIME_KEY] > 2


def test_not_shed_within_the_limit_nor_without_one() -> None:
    inner = InnerApp()
    limited = make(inner, trusted=["10.0.0.0/8"], max_queue_time=1.0)
    assert call(limited, **env("/x", remote="10.0.0.2", headers=stamped(0.2))).code == 404
    unlimited = make(inner, trusted=["10.0.0.0/8"])
    assert call(unlimited, **env("/x", remote="10.0.0.2", headers=stamped(60))).code == 404
    assert len(inner.seen) == 2


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_and_readiness_are_never_shed(path: str) -> None:
    app = make(trusted=["10.0.0.0/8"], max_queue_time=0.5)
    response = call(app, **env(path, remote="10.0.0.2", headers=stamped(10)))
    assert response.code == 200


def test_head_shed_has_no_body_and_retry_after_rounds_up() -> None:
    app = make(trusted=["*"], max_queue_time=2.5)
    response = call(app, **env("/x", method="HEAD", remote="10.0.0.2", headers=stamped(5)))
    assert response.code == 503
    assert response.body == b""
    assert response.header("Retry-After") == "3"


@pytest.mark.parametrize("limit", [0.0, -1.0])
def test_a_limit_must_be_positive(limit: float) -> None:
    with pytest.raises(ValueError, match="max_queue_time"):
        make(max_queue_time=limit)


def test_shedding_is_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    app = make(trusted=["*"], max_queue_time=1.0)
    with caplog.at_level("WARNING", logger="gunicorn.error"):
        for _ in range(3):
            call(app, **env("/x", remote="10.0.0.2", headers=stamped(5)))
    lines = [r.getMessage() for r in caplog.records if "Shed" in r.getMessage()]
    assert len(lines) == 1 and "Shed 1 request(s)" in lines[0], lines


def test_queue_time_from_the_kernel_for_a_direct_client() -> None:
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        try:
            client.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.3)  # the request waits in the listen queue
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                inner = InnerApp()
                app = make(inner, trusted=["127.0.0.1"], max_queue_time=0.2)
                environ = {**env("/x", remote="127.0.0.1"), "gunicorn.socket": conn}
                response = call(app, **environ)
                assert response.code == 503
                fresh = make(inner, trusted=["127.0.0.1"], max_queue_time=5.0)
                assert call(fresh, **{**env("/x"), "gunicorn.socket": conn}).code == 404
        finally:
            client.close()
    assert inner.last[middleware.QUEUE_SOURCE_KEY] == "kernel"
    assert 0.25 <= inner.last[middleware.QUEUE_TIME_KEY] < 5


def test_no_queue_time_without_a_tcp_socket() -> None:
    inner = InnerApp()
    call(make(inner), **{**env("/x"), "gunicorn.socket": object()})
    assert middleware.QUEUE_TIME_KEY not in inner.last


def test_no_queue_time_from_a_unix_socket() -> None:
    import socket

    inner = InnerApp()
    left, right = socket.socketpair()
    with left, right:
        call(make(inner), **{**env("/x", remote=""), "gunicorn.socket": left})
    assert middleware.QUEUE_TIME_KEY not in inner.last


def test_queue_time_sampled_when_only_the_scoreboard_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a sample interval, the first request after the interval has its queue time,
    the others within it do not; a limit to shed by needs every request's."""
    import socket
    import time

    # The middleware's clock, moved by the test alone (a busy machine cannot stretch
    # the interval); `time.monotonic` is all it reads of `time`.
    clock = [time.monotonic()]
    monkeypatch.setattr(middleware, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            client.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            conn.recv(1024)
            direct = {**env("/x", remote="127.0.0.1"), "gunicorn.socket": conn}
            inner = InnerApp()
            sampled = make(inner, queue_sample_interval=0.2)
            for _ in range(3):
                call(sampled, **direct)
            first, *rest = inner.seen
            assert first[middleware.QUEUE_SOURCE_KEY] == "kernel"
            assert [middleware.QUEUE_TIME_KEY in seen for seen in rest] == [False, False]
            clock[0] += 0.25
            call(sampled, **direct)
            assert inner.last[middleware.QUEUE_SOURCE_KEY] == "kernel"
            inner.seen.clear()
            limited = make(inner, queue_sample_interval=60.0, max_queue_time=30.0)
            for _ in range(3):
                call(limited, **direct)
            assert all(middleware.QUEUE_TIME_KEY in seen for seen in inner.seen)


def test_a_trusted_proxys_stamp_is_read_for_every_request_when_sampling() -> None:
    """A proxy's X-Request-Start costs no system call: sampling leaves it out."""
    import time

    inner = InnerApp()
    sampled = make(inner, trusted=["127.0.0.1"], queue_sample_interval=60.0)
    for _ in range(3):
        stamp = f"t={time.time() - 0.5:.3f}"
        call(sampled, **env("/x", remote="127.0.0.1", headers={"X-Request-Start": stamp}))
    assert [seen.get(middleware.QUEUE_SOURCE_KEY) for seen in inner.seen] == ["proxy"] * 3
    assert all(0.4 < seen[middleware.QUEUE_TIME_KEY] < 5 for seen in inner.seen)


def test_a_negative_sample_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="queue_sample_interval"):
        make(queue_sample_interval=-1.0)
