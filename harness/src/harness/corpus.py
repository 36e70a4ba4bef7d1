"""gunicorn's request corpus, as its own tests read it: each case is NAME.http (the
request, with escapes for the bytes a text file cannot hold) beside NAME.py.txt (Python
that sets `request`, the expected request or error class, and `cfg`, a gunicorn Config),
under KIND/ (`valid` or `invalid`) of the corpus directory, which the caller names
(the tests keep it in tests/data/gunicorn_requests).

    for path in case_paths(corpus, "valid"):
        data, cfg = request_bytes(path), expectation(path)["cfg"]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: The kinds of case, each a directory of the corpus.
KINDS = ("valid", "invalid")

#: Valid cases for gunicorn that microsvc.http refuses (400), because llhttp is stricter
#: there: the case's name and why.
STRICTER = {
    "013": "whitespace around ';' in chunk extensions",
    "031": "a method llhttp does not know (-BLARGH): 400 where gunicorn hands it to the app",
}

#: Valid cases for gunicorn's parser reading from a list of bytes, where the end of the
#: list ends a body early without an error; on a connection that is a truncated body: 400.
TRUNCATED = {"099": "the file holds 8 KB of a 17914-byte body"}

_HEX_ESCAPE = re.compile(rb"\\x([0-9A-Fa-f]{2})")


def case_paths(corpus: Path, kind: str) -> list[Path]:
    """The request files (NAME.http) of one kind of case, in the order of their names."""
    return sorted((corpus / kind).glob("*.http"))


def request_bytes(path: Path) -> bytes:
    """The request in a case's NAME.http, decoded as gunicorn's tests/treq.py decodes it:
    line breaks in the file are dropped, and escapes (\\r\\n, \\0, \\n, \\t, \\xHH) give
    the bytes."""
    data = path.read_bytes().replace(b"\n", b"").replace(b"\\r\\n", b"\r\n")
    data = data.replace(b"\\0", b"\0").replace(b"\\n", b"\n").replace(b"\\t", b"\t")
    return _HEX_ESCAPE.sub(lambda match: bytes([int(match.group(1), 16)]), data)


def expectation(path: Path) -> dict[str, Any]:
    """The names the case's NAME.py.txt sets when it runs: `request` (what the request
    parses to, or the error class gunicorn raises) and `cfg` (the gunicorn Config the
    case needs)."""
    # Not a dependency of the harness (harness/pyproject.toml): only this needs gunicorn.
    from gunicorn.config import Config

    namespace: dict[str, Any] = {"uri": lambda raw: raw, "cfg": Config()}
    source = path.with_suffix(".py.txt")
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    return namespace
