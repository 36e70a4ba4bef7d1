"""Parsers for option values: each takes what a user typed (or a Python value) and
returns the value, or raises ValueError with a message that reads well after
"invalid value for --option: "."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

Auto = Literal["auto"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_auto_or_positive_int(value: object) -> int | Auto:
    """`auto` or an integer >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_positive_int(value, what="'auto' or an integer >= 1")


def parse_positive_int(value: object, what: str = "an integer >= 1") -> int:
    number = _to_int(value, what)
    if number < 1:
        raise ValueError(f"{value!r} is not {what}")
    return number


def parse_non_negative_int(value: object) -> int:
    number = _to_int(value, "an integer >= 0")
    if number < 0:
        raise ValueError(f"{value!r} is not an integer >= 0")
    return number


def _to_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not {what}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not {what}")


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
    raise ValueError(f"{value!r} is not a boolean (true/false, 1/0, yes/no)")


def parse_size(value: object) -> int:
    """A byte count: `536870912`, `512MB`, `512MiB`, `1.5GiB`."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise ValueError(f"{value!r} has an unknown unit (use B, KB, MB, GB, KiB, MiB, GiB)")
        number = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"{value!r} is not a size such as 512MB or 1GiB")
    if number < 1:
        raise ValueError(f"{value!r} is not a size above zero")
    return number


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}".replace(".0" + unit, unit)
    return f"{size}B"


def parse_bind(value: object) -> str:
    """`HOST:PORT`, `[IPv6]:PORT`, `:PORT`, `unix:PATH` or `fd://N`."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not an address (HOST:PORT, unix:PATH or fd://N)")
    text = value.strip()
    if text.startswith("unix:"):
        if not text[5:]:
            raise ValueError(f"{value!r} names no socket path")
        return text
    if text.startswith("fd://"):
        parse_non_negative_int(text[5:])
        return text
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} has no port (HOST:PORT)")
        if ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 host in brackets, [::1]:PORT")
        if host and not re.fullmatch(r"[A-Za-z0-9.\-_]+", host):
            raise ValueError(f"{value!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port {port!r} is not a number from 0 to 65535")
    return text


def split_bind(bind: str) -> tuple[str, int] | None:
    """The (host, port) of a TCP bind address, or None for unix: and fd:// binds."""
    if bind.startswith(("unix:", "fd://")):
        return None
    if bind.startswith("["):
        host, _, port = bind[1:].partition("]:")
    else:
        host, _, port = bind.rpartition(":")
    return host or "0.0.0.0", int(port)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """Seconds: `30`, `2.5`, `90s`, `15m`, `1h30m`, `250ms`. Zero means off."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_RE.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"{value!r} is not a duration such as 30s, 15m or 1h") from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"{value!r} is not a duration such as 30s, 15m or 1h")
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"{value!r} is not a duration of zero or more")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def parse_url_path(value: object) -> str | None:
    """A path such as /healthz, or `off` (or an empty string) for none."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "off", "none"):
            return None
        if text.startswith("/") and not any(c.isspace() or c in "?#" for c in text):
            return text
    raise ValueError(f"{value!r} is not a path starting with '/' (or 'off')")


def parse_ip_list(value: object) -> tuple[str, ...]:
    """Addresses or networks, comma-separated or a list; `*` trusts every address.

    Networks are strict, as gunicorn's `forwarded_allow_ips` wants them: `10.0.0.0/8`,
    not `10.0.0.1/8` (host bits set)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{value!r} is not a comma-separated list of addresses")
    result = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if text != "*":
            _check_network(text)
        result.append(text)
    return tuple(result)


def _check_network(text: str) -> None:
    try:
        ipaddress.ip_network(text)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network") from None
        raise ValueError(
            f"{text!r} has host bits set; the network is {network.with_prefixlen}"
        ) from None
