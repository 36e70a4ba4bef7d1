"""The load helper itself: every non-2xx answer counts as failed, and 2xx ones do not."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from harness import Wrk

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e


def test_wrk_counts_every_non_2xx_response_as_failed(
    serve: ServeFactory, wrk: Wrk, figures: Figures
) -> None:
    server = serve(["-k", "sync", "--workers", "1"])

    missing = wrk.run(server.url + "/no-such-path", seconds=1, connections=4)
    found = wrk.run(server.url + "/health", seconds=1, connections=4)
    figures(f"404s: {missing}; 200s: {found}")

    assert missing.responses > 0 and missing.non2xx == missing.responses, missing.text
    assert missing.failed == missing.responses, missing.text
    assert found.responses > 0 and found.failed == 0, found.text
