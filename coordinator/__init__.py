"""The coordinator: fragment plans per round, fragment-aware aggregation, evaluation, checkpoints, the thin ServerApp."""
