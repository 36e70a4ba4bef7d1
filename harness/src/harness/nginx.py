"""A real nginx in front of servers under test, configured by `microsvc nginx`.

nginx runs as `nginx -p PREFIX/ -c CONF -g 'daemon off; pid PREFIX/nginx.pid;'` in a
process group of its own, with its stderr (the error log: Debian's nginx logs to stderr
by default, and the generated config names no log file) in PREFIX/nginx.log. The
`--full` output of `microsvc nginx` names no file path, so the pid file is given with
`-g`; `wrapper_conf` puts the conf.d output inside a minimal nginx.conf with its own
paths (temporary directories under PREFIX).

    port = free_port()
    conf = render("--full", *upstream_args([server.port]), "--listen", f"127.0.0.1:{port}")
    nginx = Nginx.start(prefix, conf, "127.0.0.1", port)
    nginx.wait_listening()
    ...
    nginx.kill()
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.servers import Server, clean_env, microsvc_command, start_server

#: Where nginx is looked for when it is not on PATH (Debian puts it in /usr/sbin).
NGINX_FALLBACKS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")

#: Why a test that needs nginx is skipped where it is missing.
NGINX_MISSING = "nginx is not installed (Debian package `nginx`, see scripts/system-deps)"

#: How long nginx may take to listen after it starts.
NGINX_START_DEADLINE = 15.0


def find_nginx() -> str | None:
    """The nginx binary: on PATH, else in a fallback place; None where there is none."""
    return shutil.which("nginx") or next(
        (path for path in NGINX_FALLBACKS if Path(path).is_file()), None
    )


#: The nginx binary of this machine, or None.
NGINX = find_nginx()


def wrapper_conf(
    prefix: Path,
    include: Path,
    *,
    worker_connections: int = 256,
    http_lines: Sequence[str] = ("access_log off;",),
) -> str:
    """A minimal nginx.conf that includes the conf.d output of `microsvc nginx` (the file
    `include`), its temporary directories under `prefix`, `http_lines` added to its
    http block (by default: no access log)."""
    extra = "".join(f"    {line}\n" for line in http_lines)
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix}/{name};\n"
        for kind, name in (
            ("client_body", "body"),
            ("proxy", "proxy"),
            ("fastcgi", "fastcgi"),
            ("uwsgi", "uwsgi"),
            ("scgi", "scgi"),
        )
    )
    return (
        "# A minimal nginx.conf around the conf.d output of `microsvc nginx`.\n"
        "worker_processes 1;\n"
        f"events {{\n    worker_connections {worker_connections};\n}}\n"
        f"http {{\n{extra}{temp_paths}    include {include};\n}}\n"
    )


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`argv` to its end, its output as text; HarnessError if it takes over `timeout` s."""
    try:
        return subprocess.run(
            list(argv),
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{' '.join(argv)} took over {timeout:.0f} s") from None
    except OSError as exc:
        raise HarnessError(f"cannot run {argv[0]}: {exc}") from None


def render(*args: str, timeout: float = 60.0) -> str:
    """The output of `python -m microsvc nginx ARGS`, run in a subprocess; HarnessError
    with its stderr if it fails."""
    done = _run(microsvc_command("nginx", *args), timeout)
    if done.returncode != 0:
        raise HarnessError(f"microsvc nginx failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def upstream_args(ports: Sequence[int]) -> list[str]:
    """`--upstream 127.0.0.1:PORT` for each port, for `render`."""
    return [arg for port in ports for arg in ("--upstream", f"127.0.0.1:{port}")]


def _argv(prefix: Path, conf: Path, *extra: str, globals_: str = "") -> list[str]:
    """nginx with its prefix, its config and the pid file under the prefix."""
    if NGINX is None:
        raise HarnessError(NGINX_MISSING)
    directives = f"{globals_} pid {prefix}/nginx.pid;".strip()
    return [NGINX, *extra, "-p", f"{prefix}/", "-c", str(conf), "-g", directives]


def nginx_test(prefix: Path, conf: Path, timeout: float = 30.0) -> None:
    """`nginx -t` on `conf`; HarnessError with nginx's words and the config if it is
    rejected."""
    done = _run(_argv(prefix, conf, "-t"), timeout)
    if done.returncode != 0 or "test is successful" not in done.stderr:
        raise HarnessError(
            f"nginx -t rejected {conf} ({done.returncode}):\n{done.stderr}\n{conf.read_text()}"
        )


class Nginx(Server):
    """One nginx master (and its worker) in a process group of its own, its error log
    in PREFIX/nginx.log: a `Server` listening on host:port, with `wait_listening()` and
    `kill()`."""

    def __init__(
        self, proc: subprocess.Popen[bytes], prefix: Path, conf: Path, host: str, port: int
    ) -> None:
        super().__init__(proc, port, prefix / "nginx.log")
        self.prefix, self.conf, self.host = prefix, conf, host
        self.url = f"http://{host}:{port}"

    @classmethod
    def start(cls, prefix: Path, conf_text: str, host: str, port: int) -> Nginx:
        """Write `conf_text` to PREFIX/nginx.conf (PREFIX is made) and start nginx on it,
        to listen on host:port; it does not wait (see `wait_listening`)."""
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(conf_text)
        server = start_server(
            _argv(prefix, conf, globals_="daemon off;"),
            port=port,
            log_path=prefix / "nginx.log",
            env=clean_env(),
            cwd=prefix,
        )
        return cls(server.proc, prefix, conf, host, port)

    def wait_listening(self, deadline: float = NGINX_START_DEADLINE) -> None:
        """Wait until host:port accepts a connection; HarnessError with the log if nginx
        exits first or takes longer than `deadline` seconds."""
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"nginx exited at start: {self.describe()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1),
            ):
                return
            if time.monotonic() > end:
                raise HarnessError(
                    f"nginx does not listen after {deadline:.0f} s: {self.describe()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGTERM to the group (nginx's fast shutdown), SIGKILL to what is left 5 s on."""
        self.kill_leftovers(timeout=5.0)
