"""The harness that the tests and `scripts/bench` share: real servers started in
subprocesses of their own on free loopback ports, and wrk as the load generator with a
Lua script that counts every response exactly.

    port = free_port()
    server = start_server(
        microsvc_command("run", "-b", f"127.0.0.1:{port}"),
        port=port, log_path=workdir / "server.log", env=clean_env(), cwd=workdir,
    )
    server.wait_ready("/health")
    result = Wrk(workdir).run(server.url + "/data", seconds=2, connections=8)
    server.kill_leftovers()

`harness.nginx` puts a real nginx in front of servers (configured by `microsvc nginx`);
`harness.corpus` reads gunicorn's request corpus; `harness.overload` measures a server
behind nginx under three times the load it can serve.
"""

from harness.cgroups import remove_cgroup
from harness.corpus import KINDS, STRICTER, TRUNCATED, case_paths, expectation, request_bytes
from harness.errors import HarnessError
from harness.nginx import (
    NGINX,
    NGINX_MISSING,
    NGINX_START_DEADLINE,
    Nginx,
    find_nginx,
    nginx_test,
    render,
    upstream_args,
    wrapper_conf,
)
from harness.overload import Outcome
from harness.overload import measure as measure_overload
from harness.servers import (
    DROPPED_ENV,
    START_DEADLINE,
    STOP_DEADLINE,
    Server,
    clean_env,
    free_port,
    free_port_on,
    is_running,
    microsvc_command,
    signal_group,
    start_server,
)
from harness.wrk import (
    LUA_SCRIPT,
    Wrk,
    WrkResult,
    WrkRun,
    cpu_list,
    find_wrk,
    parse_output,
    taskset,
    wrk_version,
)

__all__ = [
    "DROPPED_ENV",
    "KINDS",
    "LUA_SCRIPT",
    "NGINX",
    "NGINX_MISSING",
    "NGINX_START_DEADLINE",
    "START_DEADLINE",
    "STOP_DEADLINE",
    "STRICTER",
    "TRUNCATED",
    "HarnessError",
    "Nginx",
    "Outcome",
    "Server",
    "Wrk",
    "WrkResult",
    "WrkRun",
    "case_paths",
    "clean_env",
    "cpu_list",
    "expectation",
    "find_nginx",
    "find_wrk",
    "free_port",
    "free_port_on",
    "is_running",
    "measure_overload",
    "microsvc_command",
    "nginx_test",
    "parse_output",
    "remove_cgroup",
    "render",
    "request_bytes",
    "signal_group",
    "start_server",
    "taskset",
    "upstream_args",
    "wrapper_conf",
    "wrk_version",
]
