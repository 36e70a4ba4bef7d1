"""The documentation: the option reference is current, and the site builds strictly."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from microsvc.config.options import OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> ModuleType:
    path = ROOT / "scripts" / "docs-reference"
    loader = importlib.machinery.SourceFileLoader("docs_reference", str(path))
    spec = importlib.util.spec_from_loader("docs_reference", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_reference_page_is_current() -> None:
    fresh = load_generator().render()
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == fresh, (
        "docs/reference.md is stale: run `.venv/bin/python scripts/docs-reference`"
    )


def test_reference_lists_every_option_and_its_environment_variable() -> None:
    text = (ROOT / "docs" / "reference.md").read_text()
    for spec in OPTIONS:
        assert f"### `{spec.flag}`" in text
        assert f"`{spec.envvar}`" in text
    for other in ("### `APP`", "### `--config`", "### `--set`", "`WEB_CONCURRENCY`", "`PORT`"):
        assert other in text


def test_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install mkdocs)")
    config = str(ROOT / "mkdocs.yml")
    site = str(tmp_path / "site")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--config-file", config, "--site-dir", site],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()
