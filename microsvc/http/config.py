"""The settings of microsvc's HTTP engine, one frozen value per server."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Peer addresses whose trust is remembered at most (the memory is emptied when full).
TRUST_CACHE_SIZE = 1024

DEFAULT_SECURE_SCHEME_HEADERS: Mapping[str, str] = MappingProxyType(
    {"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"}
)


@dataclass(frozen=True)
class HTTPConfig:
    """Limits, timeouts and trust for serving HTTP/1.x connections.

    The limits and the forwarding trust have the meaning of gunicorn's settings of the
    same names (`limit_request_line`, `limit_request_fields`, `limit_request_field_size`,
    `forwarded_allow_ips`, `secure_scheme_headers`, `forwarder_headers`, `header_map`),
    except that each limit here must be positive (gunicorn reads 0 as "the maximum") and
    `header_map` is "drop" (a header name with "_" is left out of the environ, as it could
    pass for one with "-") or "refuse" (such a request is answered 400); gunicorn's
    "dangerous" is not offered.

    Timeouts are in seconds: `keepalive_timeout` is how long an idle keep-alive connection
    waits for the first byte of its next request, `header_timeout` how long a request's
    head (request line and headers) may take to arrive once it has started, and also how
    long a new connection waits for its first request; `read_timeout` bounds each wait for
    body bytes (None: no bound).
    """

    limit_request_line: int = 4094
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    keepalive_timeout: float = 2.0
    header_timeout: float = 10.0
    read_timeout: float | None = 30.0
    is_ssl: bool = False
    server_software: str = "microsvc"
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    secure_scheme_headers: Mapping[str, str] = field(
        default_factory=lambda: DEFAULT_SECURE_SCHEME_HEADERS
    )
    forwarder_headers: tuple[str, ...] = ("SCRIPT_NAME", "PATH_INFO")
    header_map: str = "drop"
    script_name: str = ""
    drain_limit: int = 1024 * 1024
    sendfile: bool = True
    multithread: bool = False
    multiprocess: bool = False
    #: The stream of `wsgi.errors` (None: sys.stderr).
    errors: Any = None

    def __post_init__(self) -> None:
        for name in ("limit_request_line", "limit_request_fields", "limit_request_field_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number")
        if self.keepalive_timeout <= 0 or self.header_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.read_timeout is not None and self.read_timeout <= 0:
            raise ValueError("read_timeout must be positive or None")
        if self.header_map not in ("drop", "refuse"):
            raise ValueError('header_map must be "drop" or "refuse"')
        if self.drain_limit < 0:
            raise ValueError("drain_limit must not be negative")
        _ = self.trusted_networks  # validates forwarded_allow_ips now

    @cached_property
    def trust_all_peers(self) -> bool:
        return "*" in self.forwarded_allow_ips

    @cached_property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        networks: list[IPNetwork] = []
        for entry in self.forwarded_allow_ips:
            if entry == "*":
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"forwarded_allow_ips: {entry!r} is not an address") from None
        return tuple(networks)

    @cached_property
    def upper_scheme_headers(self) -> Mapping[str, str]:
        return {name.upper(): value for name, value in self.secure_scheme_headers.items()}

    @cached_property
    def upper_forwarder_headers(self) -> frozenset[str]:
        return frozenset(name.upper() for name in self.forwarder_headers)

    @cached_property
    def max_head_size(self) -> int:
        """The most bytes a request head may take before it is refused with 431."""
        fields = self.limit_request_fields * (self.limit_request_field_size + 2)
        return self.limit_request_line + 2 + fields + 2

    @cached_property
    def _trust_by_address(self) -> dict[object, bool]:
        return {}

    def peer_is_trusted(self, peer: object) -> bool:
        """Whether a peer may set the forwarding and scheme headers. A peer that is not an
        (address, port) pair, as on a Unix socket, is trusted, like in gunicorn."""
        if not isinstance(peer, tuple):
            return True
        if self.trust_all_peers:
            return True
        # Peers come back (a proxy, returning clients): each address is parsed once.
        known = self._trust_by_address
        address = peer[0]
        trusted = known.get(address)
        if trusted is None:
            trusted = self._address_is_trusted(address)
            if len(known) >= TRUST_CACHE_SIZE:
                known.clear()
            known[address] = trusted
        return trusted

    def _address_is_trusted(self, text: object) -> bool:
        try:
            address = ipaddress.ip_address(text)  # type: ignore[arg-type]
        except ValueError:
            return False
        return any(address in network for network in self.trusted_networks)
