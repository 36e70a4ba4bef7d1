"""Generators that never serve: the nginx site (`nginx`) and the Kubernetes manifests
(`manifest`) for a microsvc service."""
