"""`wsgi.input`, streamed from the connection as the application reads it
(`wsgi.file_wrapper` is in `filewrapper`, which is not compiled)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import SupportsIndex

from microsvc.http.parser import Message, RequestStream


class RequestBody:
    """The request body as PEP 3333's input stream: read, readline, readlines, iteration.

    Bytes come off the socket only as they are asked for. On the first read of a request
    that sent `Expect: 100-continue`, `on_first_read` sends the interim 100 response.
    Raises `InvalidBody` when the body is malformed or truncated."""

    __slots__ = ("_buffer", "_done", "_message", "_on_first_read", "_stream", "consumed")

    def __init__(
        self,
        stream: RequestStream,
        message: Message,
        on_first_read: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self._message = message
        self._buffer = b""
        self._done = False
        self._on_first_read = on_first_read
        self.consumed = 0

    def _next(self) -> bytes:
        if self._done:
            return b""
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        chunk = self._stream.next_body_chunk(self._message)
        if not chunk:
            self._done = True
        self.consumed += len(chunk)
        return chunk

    @property
    def continue_pending(self) -> bool:
        """True while the 100 Continue owed to the client has not been sent."""
        return self._on_first_read is not None

    def read(self, size: SupportsIndex | None = -1) -> bytes:
        buffer = self._buffer
        limit = -1 if size is None else operator.index(size)
        if limit < 0:
            parts = [buffer]
            while chunk := self._next():
                parts.append(chunk)
            self._buffer = b""
            return b"".join(parts)
        while len(buffer) < limit:
            chunk = self._next()
            if not chunk:
                break
            buffer = buffer + chunk if buffer else chunk
        self._buffer = buffer[limit:]
        return buffer[:limit]

    def readline(self, size: SupportsIndex | None = -1) -> bytes:
        buffer = self._buffer
        limit = -1 if size is None else operator.index(size)
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end >= 0:
                end += 1
                break
            if 0 <= limit <= len(buffer):
                end = limit
                break
            start = len(buffer)
            chunk = self._next()
            if not chunk:
                end = len(buffer)
                break
            buffer += chunk
        if 0 <= limit < end:
            end = limit
        self._buffer = buffer[end:]
        return buffer[:end]

    def readlines(self, hint: SupportsIndex | None = -1) -> list[bytes]:
        limit = -1 if hint is None else operator.index(hint)
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < limit <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def drain(self, limit: int) -> bool:
        """Reads and drops the rest of the body; False when more than `limit` bytes are
        left (the connection must then close)."""
        self._buffer = b""
        dropped = 0
        while chunk := self._next():
            dropped += len(chunk)
            if dropped > limit:
                return False
        return True

    @property
    def finished(self) -> bool:
        """Whether the whole body is off the connection (read or not by the app)."""
        return self._done or self._message.complete
