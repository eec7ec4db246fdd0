"""Scenarios on real data, the harness over Flower's simulation engine, and the baselines."""
