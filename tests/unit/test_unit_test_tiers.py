"""The suite's tiers: each directory under tests/ is selected by the marker of its name,
and by that marker only (tests/conftest.py marks every test by its directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIERS = {"unit", "cli", "e2e", "reliability", "container"}


def collected(*args: str, status: int = 0) -> list[str]:
    """The test ids `pytest --collect-only` selects with these arguments; `status` is its
    exit status (5: every test deselected)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == status, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_this_test_is_in_the_unit_tier_only(request: pytest.FixtureRequest) -> None:
    marks = {mark.name for mark in request.node.iter_markers()}
    assert marks & TIERS == {"unit"}


def test_a_tier_marker_written_in_a_module_does_not_move_it_to_another_tier() -> None:
    """Modules under tests/reliability/ that mark themselves `e2e` are still reliability
    tests only."""
    everything = collected("tests/reliability")
    assert everything
    assert collected("tests/reliability", "-m", "reliability") == everything
    assert collected("tests/reliability", "-m", "e2e", status=5) == []
