"""The parts of `scripts/bench`: options, machine, plan (the sections as data), ratios (the
targets as data), report, overload, cli. Servers, wrk and the overload measurement come
from the shared `harness` package."""
