"""A WSGI app whose /slow?s=N answers after N seconds; while it waits, /tmp/in-flight
exists, so a test knows the request has reached the app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

MARKER = "/tmp/in-flight"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["3"])[0])
        with open(MARKER, "w") as marker:
            marker.write(str(os.getpid()))
        time.sleep(seconds)
        os.unlink(MARKER)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"done by {os.getpid()}\n".encode()]
