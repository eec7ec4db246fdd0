"""Partial participation: which of the connected sites the coordinator asks in a round.

With ``sites_per_round`` or ``fraction_per_round`` set, each round asks a fresh uniform sample of the connected
sites (by node), drawn from the run's seed and the round, so an auditor can redraw it from the ledger: the round
record keeps every connected node and the ones not asked. A site that is not asked gets no message and spends
nothing. Sites do not count this sampling towards their privacy: each accounts only the rounds it trained, so the
coordinator's randomness is never trusted for an amplification.
"""

from __future__ import annotations

import math

import numpy as np

from protocols.config import FederationConfig
from protocols.errors import ConfigError

# Mixed into the seed so that the draw does not repeat another use of the run's seed.
_SAMPLING_STREAM = 0x5A4D


def sampling_active(config: FederationConfig) -> bool:
    return bool(config.sites_per_round) or config.fraction_per_round < 1.0


def sample_size(config: FederationConfig, available: int) -> int:
    """How many of ``available`` connected sites a round asks (all of them without partial participation)."""
    if config.sites_per_round:
        return min(config.sites_per_round, available)
    return min(available, max(1, math.ceil(config.fraction_per_round * available)))


def check_sample_size(config: FederationConfig, available: int) -> None:
    """A sample smaller than the sites a round needs (min_sites, SecAgg+'s min_cohort) would stop every round."""
    size, fewest = sample_size(config, available), config.fewest_sites_per_round
    if sampling_active(config) and size < fewest:
        setting = (f"sites_per_round={config.sites_per_round}" if config.sites_per_round
                   else f"fraction_per_round={config.fraction_per_round:g}")
        raise ConfigError(f"{setting} asks {size} of {available} site(s) a round, fewer than the {fewest} a round "
                          "needs (min_sites, or SecAgg+'s min_cohort); ask more sites each round.")


def draw(node_ids: list[int], config: FederationConfig, server_round: int) -> tuple[list[int], list[int]]:
    """(asked, not asked): a uniform sample without replacement of the sorted ``node_ids``, seeded by the run's
    seed and the round, so the same seed, round and connected nodes always give the same sample."""
    ordered = sorted(node_ids)
    size = sample_size(config, len(ordered))
    if not sampling_active(config) or size >= len(ordered):
        return ordered, []
    rng = np.random.default_rng([config.seed, server_round, _SAMPLING_STREAM])
    # Positions, not the ids themselves: Flower's node ids are unsigned 64-bit and do not fit numpy's int64.
    asked = sorted(ordered[int(i)] for i in rng.choice(len(ordered), size, replace=False))
    return asked, sorted(set(ordered) - set(asked))
