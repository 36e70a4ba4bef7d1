"""scripts/bench end to end, tiny: two sweep points of 2 s each, the engine section with
2 s points, the metrics section pinned with 1 s points, and bad command lines."""

from __future__ import annotations

import json
import os
import re
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from harness import find_wrk

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench"
WRK = find_wrk()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, "the PNG does not start with IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_two_point_sweep_writes_markdown_json_and_png(tmp_path: Path) -> None:
    if WRK is None:
        pytest.skip("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    done = run_bench(
        "--classes",
        "sync",
        "--sections",
        "sweep",
        "--sweep",
        "1,2",
        "--endpoints",
        "data",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--label",
        "smoke",
        "--out",
        str(tmp_path),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output

    data = json.loads((tmp_path / "smoke.json").read_text())
    points = data["points"]
    assert [(p["section"], p["worker_class"], p["workers"]) for p in points] == [
        ("sweep", "sync", 1),
        ("sweep", "sync", 2),
    ]
    for point in points:
        assert len(point["runs"]) == 1 and point["runs"][0]["ok"], point
        result = point["runs"][0]["result"]
        assert result["rps"] > 0 and result["responses"] > 0, result
        assert result["p50_us"] > 0 and result["p99_us"] >= result["p50_us"], result
        assert result["errors"] == 0, result

    markdown = (tmp_path / "smoke.md").read_text()
    assert "## Machine and method" in markdown and "## Targets" in markdown
    rows = {}
    for line in markdown.splitlines():
        match = re.match(r"\| microsvc --workers (\d+) +\| sync +\|", line)
        if match and "`/data`" in line:
            rows[int(match.group(1))] = line
    assert set(rows) == {1, 2}, markdown
    for line in rows.values():
        rps = int(line.split("|")[6].strip().replace(",", ""))
        assert rps > 0, line
    assert "![" in markdown and "smoke.png" in markdown

    image = (tmp_path / "smoke.png").read_bytes()
    width, height = png_size(image)
    assert width >= 400 and height >= 200, (width, height)
    assert len(image) > 10_000, "the plot is suspiciously small (nothing drawn?)"


def test_bad_classes_value_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    done = run_bench("--classes", "sync,tornado", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and "tornado" in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written on a usage error"


@pytest.mark.timeout(300)
def test_engine_section_compares_both_engines_and_writes_the_files(tmp_path: Path) -> None:
    if WRK is None:
        pytest.skip("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    done = run_bench(
        "--sections",
        "engine",
        "--classes",
        "sync,gevent",
        "--connections-io",
        "50",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--label",
        "engine",
        "--out",
        str(tmp_path),
        timeout=280,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output

    data = json.loads((tmp_path / "engine.json").read_text())
    points = {(p["config"], p["worker_class"], p["path"]): p for p in data["points"]}
    expected = {
        (f"{engine} engine", cls, path)
        for engine in ("microsvc", "gunicorn")
        for cls in ("sync", "gevent")
        for path in ("/data", "/bare")
    } | {("microsvc engine", "gevent", "/io?ms=50")}
    assert set(points) == expected, sorted(points)
    for point in points.values():
        assert point["section"] == "engine" and point["workers"] == 1, point
        run = point["runs"][0]
        assert run["ok"], run
        assert run["result"]["rps"] > 0 and run["result"]["errors"] == 0, run
        assert run["result"]["idle_uss_bytes"] > 1_000_000, run
        if len(os.sched_getaffinity(0)) >= 2:
            assert len(point["pinning"]["server_cpus"]) == 1, point["pinning"]
    shown = {key: point["command"]["display"] for key, point in points.items()}
    assert "--http-engine gunicorn" in shown[("gunicorn engine", "sync", "/bare")]
    assert "microsvc.demo:bare" in shown[("microsvc engine", "sync", "/bare")]
    assert any("Granian skipped" in line for line in data["skipped"]), data["skipped"]

    ratios = {(r["kind"], r["subject"]): r for r in data["ratios"]}
    for key in (
        ("engine / gunicorn engine, Flask", "sync /data"),
        ("engine / gunicorn engine, bare", "gevent bare callable"),
        ("engine /io / ideal", "gevent /io?ms=50"),
        ("p99 engine / gunicorn engine", "gevent /data"),
        ("idle worker memory, engine - gunicorn engine (MB)", "sync /data"),
    ):
        assert ratios[key]["status"] in ("PASS", "MISS"), ratios.get(key, sorted(ratios))
        assert isinstance(ratios[key]["value"], float), ratios[key]

    markdown = (tmp_path / "engine.md").read_text()
    assert "## HTTP engine" in markdown and "## Targets" in markdown
    section = markdown.split("## HTTP engine", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| microsvc engine ")]
    assert len(rows) == 5 and all(line.count("|") == 12 for line in rows), rows
    assert "engine.png" in markdown

    width, height = png_size((tmp_path / "engine.png").read_bytes())
    assert width >= 400 and height >= 200, (width, height)


def test_peers_without_the_engine_section_is_a_usage_error(tmp_path: Path) -> None:
    done = run_bench("--sections", "auto", "--peers", "granian", "--out", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "engine" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_engine_and_overload_sections_run_only_when_named() -> None:
    done = run_bench("--help", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert (
        "parts to run: auto,plain,guide,sweep,metrics,engine,overload "
        "(default auto,plain,guide,sweep,metrics)"
    ) in text, text


@pytest.mark.timeout(120)
def test_metrics_section_alternates_on_and_off_with_one_pinned_worker(tmp_path: Path) -> None:
    if WRK is None:
        pytest.skip("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    args = ("--sections", "metrics", "--classes", "sync", "--duration", "1", "--warmup", "0")
    done = run_bench(*args, "--repeat", "3", "--label", "metrics", "--out", str(tmp_path))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # On and off alternate: on, off, on, off, on, off.
    order = re.findall(r"metrics (on|off) .* round (\d):", output)
    assert order == [(state, str(n)) for n in (1, 2, 3) for state in ("on", "off")], output

    data = json.loads((tmp_path / "metrics.json").read_text())
    points = {p["config"]: p for p in data["points"]}
    assert set(points) == {"metrics on", "metrics off"}, sorted(points)
    assert "--metrics" in points["metrics on"]["command"]["argv"]
    assert "--metrics" not in points["metrics off"]["command"]["argv"]
    for point in points.values():
        assert point["workers"] == 1 and len(point["runs"]) == 3, point
        assert all(run["ok"] and not run["notes"] for run in point["runs"]), point["runs"]
        if len(os.sched_getaffinity(0)) >= 2:
            assert point["pinning"]["server_cpus"] != point["pinning"]["wrk_cpus"], point
            assert len(point["pinning"]["server_cpus"]) == 1, point["pinning"]
    (ratio,) = [r for r in data["ratios"] if r["kind"] == "metrics on / off"]
    assert ratio["subject"] == "sync /data" and ratio["target"] == ">= 0.97", ratio
    assert ratio["status"] in ("PASS", "MISS") and isinstance(ratio["value"], float), ratio
    # Run in turn, they are compared round by round: the median of the rounds' ratios.
    rps = {
        name: {run["round"]: run["result"]["rps"] for run in point["runs"]}
        for name, point in points.items()
    }
    rounds = [rps["metrics on"][n] / rps["metrics off"][n] for n in (1, 2, 3)]
    assert ratio["value"] == pytest.approx(statistics.median(rounds)), (ratio, rounds)
    assert "median of 3 rounds' ratios" in ratio["detail"], ratio
    assert "## Metrics cost" in (tmp_path / "metrics.md").read_text()
