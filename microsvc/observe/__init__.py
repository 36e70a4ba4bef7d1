"""Seeing inside a running server: the shared-memory worker scoreboard (`scoreboard`),
`microsvc status` (`status`) and JSON logs (`jsonlog`). Prometheus metrics live in
`microsvc.metrics`."""
