"""The parts of `scripts/bench`: options, the machine, points, the engine section, the
report. Servers and wrk come from the shared `harness` package."""
