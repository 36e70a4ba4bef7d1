"""The one error of the harness."""

from __future__ import annotations


class HarnessError(Exception):
    """A server or wrk did not do what was asked: the message says what, with its output."""
