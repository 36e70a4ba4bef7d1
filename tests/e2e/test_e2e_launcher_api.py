"""`Launcher(...).run()` from a script of the user's: the script is the master."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

APP_MODULE = """\
import os

from flask import Flask

app = Flask(__name__)


@app.get("/health")
def health():
    return {"status": "ok", "pid": os.getpid()}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_launcher_serves_an_app_object(serve: ServeFactory, tmp_path: Path) -> None:
    script = write(
        tmp_path / "serve_object.py",
        APP_MODULE
        + """
if __name__ == "__main__":
    import sys

    from microsvc import Launcher

    Launcher(app, bind=f"127.0.0.1:{sys.argv[1]}", workers=2).run()
""",
    )
    server = serve(command=[sys.executable, str(script), "{port}"], name="launcher-object")
    with requests.get(server.url + "/health", timeout=10) as response:
        assert response.status_code == 200, server.describe()
        assert response.json()["status"] == "ok"
    assert server.wait_workers(2) == 2, server.describe()

    assert server.stop() == 0, server.describe()
    assert server.orphans == [], server.describe()
    assert "2 sync workers" in server.log_text()


def test_launcher_serves_an_import_string_on_gevent(serve: ServeFactory, tmp_path: Path) -> None:
    write(tmp_path / "mymod.py", APP_MODULE)
    script = write(
        tmp_path / "serve_string.py",
        """\
        import sys

        from microsvc import Launcher

        Launcher("mymod:app", worker_class="gevent", workers=1,
                 bind=f"127.0.0.1:{sys.argv[1]}").run()
        """,
    )
    server = serve(command=[sys.executable, str(script), "{port}"], name="launcher-string")
    with requests.get(server.url + "/health", timeout=10) as response:
        assert response.status_code == 200, server.describe()
        assert response.json()["status"] == "ok"

    assert server.stop() == 0, server.describe()
    log = server.log_text()
    assert "1 gevent workers" in log, log
    assert "Traceback" not in log, log
    assert "MonkeyPatchWarning" not in log, log
