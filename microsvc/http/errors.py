"""The errors of microsvc's HTTP engine: the client's (answered with a 4xx or 5xx and the
connection closed) and the application's (a 500)."""

from __future__ import annotations

REASONS: dict[int, str] = {
    400: "Bad Request",
    408: "Request Timeout",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
}


class RequestError(Exception):
    """The request cannot be served as sent: it is answered with `status` and the
    connection is closed, because what follows it on the connection cannot be trusted."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "Bad Request")


class InvalidBody(RequestError):
    """Raised by `wsgi.input` when the request body turns out malformed or truncated while
    the application reads it (a bad chunk size, a missing chunk terminator, the client
    closing early). The connection handler answers 400 if no response has started, and
    otherwise closes the connection."""


class ResponseError(Exception):
    """The application gave an invalid status line or response header (CR, LF or NUL in a
    value, a name that is not a token): answered with 500, like any application error."""


class ConnectionLost(Exception):
    """Writing to the client failed: it closed the connection or reset it. Not logged,
    and not the application's error even when raised inside it, from `write()`."""
