"""gunicorn's sync worker, recycled by memory and lifetime (see `recycling`)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

from microsvc.workers.recycling import Recycling


class SyncWorker(Recycling, _GunicornSyncWorker):  # type: ignore[misc]
    def wait(self, timeout: float) -> Any:
        # Idle, gunicorn's sync worker sleeps timeout/2 (15 s by default) between checks.
        return super().wait(self.check_interval(timeout))

    def _wake(self) -> None:
        if self.PIPE:
            with contextlib.suppress(OSError):
                os.write(self.PIPE[1], b"1")
