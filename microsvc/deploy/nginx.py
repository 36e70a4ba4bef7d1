"""nginx configuration for microsvc instances (`microsvc nginx`).

`render` writes what nginx needs to balance over one or more microsvc instances:

- an `upstream` block with every instance (`max_fails`/`fail_timeout` each), a shared
  `zone` (so all nginx workers agree on which instance failed) and idle `keepalive`
  connections, reused with HTTP/1.1 and an empty `Connection` header. The upstream
  `keepalive_timeout` is shorter than microsvc's default `--keep-alive` (2 s), so nginx
  never reuses a connection the server is about to close;
- a `server` block that proxies everything to it with the headers microsvc's proxy trust
  reads (Host, X-Real-IP, X-Forwarded-For as `$proxy_add_x_forwarded_for`,
  X-Forwarded-Proto, X-Forwarded-Host), X-Request-Start `t=${msec}` (when nginx passed the
  request on, for microsvc's queue time and `--max-queue-time`), a short connect timeout,
  read/send timeouts that match microsvc's default `--timeout` (30 s),
  `client_max_body_size`, and retries: a request that fails with a connection error, a
  timeout or a 502/503/504 goes to the next instance (`proxy_next_upstream`, bounded by
  `proxy_next_upstream_tries` and `proxy_next_upstream_timeout`). nginx never retries a
  non-idempotent request (POST, LOCK, PATCH) once it was sent to an instance; that default
  is kept on purpose. A request an instance shed (`--max-queue-time`, 503) is retried on
  the next instance too; nginx counts it toward that instance's `max_fails` (it cannot
  retry on a 503 without doing so), and when every instance is marked failed it resets
  them all.

microsvc believes the X-Forwarded-* headers only from `--forwarded-allow-ips` (loopback
by default): run it with nginx's address there when nginx is on another machine.

Without `full` the output goes into nginx's http context (a file in conf.d/). With `full`
it is a whole nginx.conf (`events {}` and `http {}` around the same blocks) that sets no
file paths: the pid file, logs and temporary directories are nginx's compiled-in defaults
(`/run/nginx.pid`, stderr, `/var/lib/nginx/...` on Debian), or what the caller gives, e.g.
`nginx -c nginx.conf -g 'pid /tmp/nginx.pid;'`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from microsvc.config.values import parse_bind, split_bind
from microsvc.errors import UsageError

__all__ = ["render"]

#: microsvc's default --timeout: nginx waits as long for a response (and to send a body).
READ_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 5
#: Attempts for one request in all (the first and two retries), and how long they may take.
NEXT_UPSTREAM_TRIES = 3
NEXT_UPSTREAM_TIMEOUT_S = 60
#: Failures within FAIL_TIMEOUT_S that take an instance out for FAIL_TIMEOUT_S.
MAX_FAILS = 3
FAIL_TIMEOUT_S = 10
#: Idle connections each nginx worker keeps to the upstream, and for how long (below
#: microsvc's default --keep-alive of 2 s).
KEEPALIVE_CONNECTIONS = 32
KEEPALIVE_TIMEOUT_S = 1
CLIENT_MAX_BODY_SIZE = "10m"

DEFAULT_UPSTREAM_NAME = "microsvc"

_SERVER_NAME_RE = re.compile(r"[A-Za-z0-9_.*-]+")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-_]+")


def render(upstreams: Sequence[str], *, listen: str, server_name: str, full: bool) -> str:
    """The nginx configuration text (ends with a newline). Raises UsageError for no
    upstream, a duplicate one, an address that is not HOST:PORT, or a bad server name."""
    if isinstance(upstreams, str):
        raise UsageError("upstreams must be a sequence of HOST:PORT addresses, not a string")
    if not upstreams:
        raise UsageError("give at least one --upstream HOST:PORT")
    servers: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for item in upstreams:
        address, key = _address(item, what="--upstream", wildcard_ok=False)
        if key in seen:
            raise UsageError(f"--upstream {item!r} is given twice (as {seen[key]!r})")
        seen[key] = item
        servers.append(address)
    listen_address, _ = _address(listen, what="--listen", wildcard_ok=True)
    names = _server_names(server_name)
    upstream_name = _upstream_name(names)

    blocks = (
        _upstream_block(upstream_name, servers)
        + "\n"
        + _server_block(upstream_name, listen_address, names)
    )
    if not full:
        header = (
            "# microsvc behind nginx: goes into nginx's http context (conf.d/).\n"
            "# Written by `microsvc nginx`.\n\n"
        )
        return header + blocks
    return _full(blocks)


def _address(value: object, *, what: str, wildcard_ok: bool) -> tuple[str, tuple[str, int]]:
    """nginx's spelling of a HOST:PORT address and a key that tells duplicates apart."""
    try:
        text = parse_bind(value)
    except ValueError as exc:
        raise UsageError(f"invalid value for {what}: {exc}") from None
    parts = split_bind(text)
    if parts is None:
        raise UsageError(f"invalid value for {what}: {value!r} is not HOST:PORT")
    host, port = parts
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid value for {what}: {value!r}: port must be 1 to 65535")
    if text.startswith(":"):  # `:PORT` (every address) is for a listener only
        if not wildcard_ok:
            raise UsageError(f"invalid value for {what}: {value!r} names no host")
        host = "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.fullmatch(host) or host.startswith(("-", ".")):
            raise UsageError(f"invalid value for {what}: {host!r} is not a host name") from None
        return f"{host}:{port}", (host.lower().rstrip("."), port)
    if not wildcard_ok and ip.is_unspecified:
        raise UsageError(f"invalid value for {what}: {value!r} is not an address to connect to")
    spelled = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"{spelled}:{port}", (ip.compressed, port)


def _server_names(value: object) -> list[str]:
    if not isinstance(value, str) or not value.split():
        raise UsageError("invalid value for --server-name: give a name such as example.com or _")
    names = value.split()
    for name in names:
        if not _SERVER_NAME_RE.fullmatch(name):
            raise UsageError(
                f"invalid value for --server-name: {name!r} is not a host name "
                "(letters, digits, '.', '-', '_' and '*' wildcards)"
            )
    return names


def _upstream_name(names: Sequence[str]) -> str:
    """`microsvc`, or `microsvc_<first server name>` with every other character as `_`
    (never a real host name, so `proxy_pass` cannot mistake it for one)."""
    for name in names:
        words = re.findall(r"[A-Za-z0-9]+", name)
        if words:
            return f"{DEFAULT_UPSTREAM_NAME}_{'_'.join(words).lower()}"[:64]
    return DEFAULT_UPSTREAM_NAME


def _upstream_block(name: str, servers: Sequence[str]) -> str:
    lines = [f"upstream {name} {{", f"    zone {name} 64k;"]
    lines += [
        f"    server {server} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_S}s;"
        for server in servers
    ]
    lines += [
        f"    keepalive {KEEPALIVE_CONNECTIONS};",
        f"    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _server_block(upstream: str, listen: str, names: Sequence[str]) -> str:
    return f"""\
server {{
    listen {listen};
    server_name {" ".join(names)};

    client_max_body_size {CLIENT_MAX_BODY_SIZE};

    location / {{
        proxy_pass http://{upstream};

        # Reuse idle connections to the instances (the upstream's keepalive).
        proxy_http_version 1.1;
        proxy_set_header Connection "";

        # What microsvc's proxy trust reads (--forwarded-allow-ips must name nginx).
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        # When nginx passed the request on: microsvc's queue time (--max-queue-time).
        proxy_set_header X-Request-Start "t=${{msec}}";

        proxy_connect_timeout {CONNECT_TIMEOUT_S}s;
        proxy_send_timeout {READ_TIMEOUT_S}s;
        proxy_read_timeout {READ_TIMEOUT_S}s;

        # A failed idempotent request goes to the next instance (never a POST or PATCH
        # that reached one: nginx's default, kept).
        proxy_next_upstream error timeout http_502 http_503 http_504;
        proxy_next_upstream_tries {NEXT_UPSTREAM_TRIES};
        proxy_next_upstream_timeout {NEXT_UPSTREAM_TIMEOUT_S}s;
    }}
}}
"""


def _full(blocks: str) -> str:
    body = "".join(f"    {line}".rstrip() + "\n" for line in blocks.splitlines())
    return f"""\
# nginx.conf for microsvc behind nginx. Written by `microsvc nginx --full`.
# Sets no file paths: the pid file, logs and temporary directories are nginx's defaults,
# or the caller's (nginx -c nginx.conf -g 'pid /run/microsvc-nginx.pid;').

worker_processes auto;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65s;
    server_tokens off;

{body}}}
"""
