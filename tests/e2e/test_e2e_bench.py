"""scripts/bench end to end, tiny: two sweep points of 2 s each, and a bad command line."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench"
WRK = shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").is_file() else None)
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


def test_two_point_sweep_writes_markdown_json_and_png(tmp_path):
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
        match = re.match(r"\| microsvc --workers (\d+) \| microsvc \| sync \|", line)
        if match and "`/data`" in line:
            rows[int(match.group(1))] = line
    assert set(rows) == {1, 2}, markdown
    for line in rows.values():
        rps = int(line.split("|")[8].strip().replace(",", ""))
        assert rps > 0, line
    assert "![" in markdown and "smoke.png" in markdown

    image = (tmp_path / "smoke.png").read_bytes()
    width, height = png_size(image)
    assert width >= 400 and height >= 200, (width, height)
    assert len(image) > 10_000, "the plot is suspiciously small (nothing drawn?)"


def test_bad_classes_value_is_one_error_line_and_exit_2(tmp_path):
    done = run_bench("--classes", "sync,tornado", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and "tornado" in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written on a usage error"
