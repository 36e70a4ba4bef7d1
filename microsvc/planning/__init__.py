"""How many workers and threads: what the machine and the container allow (`system`
reads CPUs, cgroup limits and memory into `SystemFacts`) and the pure plan made from
them (`plan`, with `explain()` saying why)."""
