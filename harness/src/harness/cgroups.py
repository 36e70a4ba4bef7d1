"""Memory cgroups that tests make for their servers, and their removal."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path


def remove_cgroup(path: Path, deadline: float = 20.0) -> None:
    """rmdir `path` once the cgroup is empty, killing what is still in it (the caller
    started it); raises OSError if it is still busy after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > end:
                raise
        for pid in (int(p) for p in (path / "cgroup.procs").read_text().split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
