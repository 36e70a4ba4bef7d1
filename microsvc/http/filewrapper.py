"""`wsgi.file_wrapper`. Not compiled (see `build`): applications subclass it, set
attributes on it and give it any file-like object, as with any server's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any


class FileWrapper:
    """`wsgi.file_wrapper`: iterates a file in blocks. When the application returns one
    for a real file on a plain socket, the connection sends it with sendfile(2)."""

    def __init__(self, filelike: IO[bytes] | Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data: bytes = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration
