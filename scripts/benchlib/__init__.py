"""The parts of `scripts/bench`: options, the machine, wrk, servers, points, the report.

`scripts/bench` puts `scripts/` on `sys.path` and calls `benchlib.cli.main`.
"""
