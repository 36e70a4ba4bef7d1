"""What the eventlet worker class says in the log."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e


@pytest.fixture
def eventlet_log(serve: ServeFactory) -> str:
    server = serve(["-k", "eventlet", "--workers", "1"])
    assert server.stop() == 0, server.describe()
    return server.log_text()


def test_eventlet_logs_that_it_is_unmaintained_and_gevent_is_better(eventlet_log: str) -> None:
    lines = [line for line in eventlet_log.splitlines() if "eventlet is unmaintained" in line]
    assert len(lines) == 1, eventlet_log
    assert "WARNING" in lines[0], lines[0]
    assert "gevent" in lines[0] and "better" in lines[0], lines[0]


def test_eventlet_says_it_is_deprecated_only_once(eventlet_log: str) -> None:
    """microsvc's own line replaces eventlet's multi-line EventletDeprecationWarning
    (microsvc/serving/patching.py filters it; its message starts with a newline)."""
    assert "EventletDeprecationWarning" not in eventlet_log, eventlet_log
    assert "Eventlet is deprecated" not in eventlet_log, eventlet_log
