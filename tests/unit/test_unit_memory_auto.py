"""`--memory-per-worker auto` in `Launcher` (what `microsvc run` builds): the app is
measured in a child process before planning, and the plan (and each reload's) uses it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from microsvc.config.options import OPTIONS, Settings
from microsvc.config.values import parse_size
from microsvc.planning.plan import DEFAULT_MEMORY_PER_WORKER, SystemFacts
from microsvc.serving.launcher import Launcher

MiB = 1024**2
HEAVY = (
    "KEPT = bytearray(100 * 1000 * 1000)\n"
    "KEPT[::4096] = b'x' * len(KEPT[::4096])\n"
    "def app(environ, start_response):\n"
    "    return [b'ok']\n"
)
FACTS = SystemFacts(host_cpus=8, memory_limit=512 * MiB, memory_limit_source="memory.max")


def test_auto_measures_the_app_and_caps_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "heavy_auto.py").write_text(HEAVY)
    monkeypatch.chdir(tmp_path)
    launcher = Launcher("heavy_auto:app", memory_per_worker="auto", environ={}, facts=FACTS)
    plan = launcher.plan
    assert "heavy_auto" not in sys.modules  # measured in a child process
    assert 100 * MiB <= plan.memory_per_worker <= 140 * MiB, plan  # type: ignore[operator]
    assert plan.memory_per_worker_from.startswith("measured: own memory (USS)")
    assert plan.memory_cap == 512 * MiB // plan.memory_per_worker  # type: ignore[operator]
    assert plan.workers == plan.memory_cap < plan.formula_workers  # type: ignore[operator]
    assert launcher.settings.memory_per_worker == "auto"


def test_auto_with_an_app_object_cannot_measure_and_says_so() -> None:
    def app(environ: object, start_response: object) -> list[bytes]:
        return [b"ok"]

    launcher = Launcher(app, memory_per_worker="auto", environ={}, facts=FACTS)
    assert launcher.plan.memory_per_worker == DEFAULT_MEMORY_PER_WORKER
    assert any("auto, not measured" in note for note in launcher.plan.notes)


def test_the_option_parses_auto_and_sizes() -> None:
    spec = {spec.name: spec for spec in OPTIONS}
    option = spec["memory_per_worker"]
    assert option.parse("auto") == option.parse(" AUTO ") == "auto"
    assert option.parse("256MiB") == parse_size("256MiB") == 256 * MiB
    assert option.show("auto") == "auto" and option.show(256 * MiB) == "256MiB"
    assert Settings().memory_per_worker == DEFAULT_MEMORY_PER_WORKER
    with pytest.raises(ValueError, match="unknown unit"):
        option.parse("12XB")
