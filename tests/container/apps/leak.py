"""A WSGI app that leaks: every request to /leak keeps 8 MiB more (touched, so resident)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

LEAK_BYTES = 8 * 1024 * 1024
_kept: list[bytearray] = []


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/leak":
        _kept.append(bytearray(b"x" * LEAK_BYTES))
    body = json.dumps({"pid": os.getpid(), "kept": len(_kept), "rss": _resident()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
