"""What a site puts into Flower's SecAgg+ and how the coordinator reads the secure sum back.

SecAgg+ sums fixed-layout float vectors after clipping each value to ``[-clipping_range, clipping_range]``
and quantizing it; it carries one scalar weight per client, in the clear. So the weight travels inside
the masked vector instead, and the scalar weight is 1 for every site:

    site i sends   [w_i * (theta_i - theta) for each planned tensor] + [w_i] + [w_i * loss_i / LOSS_SCALE]
    SecAgg+ gives  the mean of those vectors over the k surviving sites
    coordinator    delta = mean(w * (theta_i - theta)) / mean(w),   loss = LOSS_SCALE * mean(w * loss) / mean(w)

with ``w_i = min(n_i, weight_scale) / weight_scale`` in (0, 1]: the coordinator never sees an example
count or a single site's update. Flower rounds stochastically, so each value of a site's vector is off by
less than one quantization step ``e = 2 * clipping_range / quantization_range``, and so is the mean over
sites. The decoded change of every element then satisfies

    |delta_secure - delta_exact| <= e * (1 + |delta_exact|) / (mean(w) - e)

which :func:`error_bound` computes and a test checks against the exact weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from protocols.errors import UpdateRejected

LOSS_SCALE = 10.0


@dataclass(frozen=True)
class SecureAggregationSettings:
    num_shares: float | int
    reconstruction_threshold: float
    clipping_range: float
    quantization_range: int
    weight_scale: int

    def shares_for(self, cohort: int) -> float | int:
        """What Flower's SecAggPlusWorkflow is given for a round of ``cohort`` sites: a count of neighbours when it
        is smaller than the cohort, else 1.0 (every site; Flower refuses a count above the cohort)."""
        if isinstance(self.num_shares, int) and self.num_shares < cohort:
            return self.num_shares
        return 1.0 if isinstance(self.num_shares, int) else self.num_shares

    @property
    def quantization_step(self) -> float:
        return 2.0 * self.clipping_range / self.quantization_range


@dataclass(frozen=True)
class EncodedUpdate:
    vectors: list[np.ndarray]
    clipped_values: int


def site_weight(records: int, weight_scale: int) -> float:
    return min(records, weight_scale) / weight_scale


def encode_update(update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], names: Sequence[str],
                  records: int, train_loss: float, clipping_range: float, weight_scale: int) -> EncodedUpdate:
    """The vectors a site hands to SecAgg+, and how many of their values SecAgg+ will clip."""
    weight = site_weight(records, weight_scale)
    vectors = [weight * (update[name].astype(np.float64) - global_state[name].astype(np.float64)) for name in names]
    vectors += [np.array([weight]), np.array([weight * train_loss / LOSS_SCALE])]
    clipped = int(sum(np.count_nonzero(np.abs(v) > clipping_range) for v in vectors))
    for vector in vectors:
        if not np.all(np.isfinite(vector)):
            raise UpdateRejected("the site's own secure-aggregation payload has non-finite values; nothing was sent.")
    return EncodedUpdate(vectors, clipped)


@dataclass(frozen=True)
class DecodedAggregate:
    state: dict[str, np.ndarray]
    train_loss: float
    mean_weight: float
    error_bound: float


def error_bound(settings: SecureAggregationSettings, mean_weight: float, largest_change: float) -> float:
    step = settings.quantization_step
    if mean_weight <= step:
        return float("inf")
    return step * (1.0 + largest_change) / (mean_weight - step)


def decode_aggregate(vectors: Sequence[np.ndarray], names: Sequence[str], global_state: Mapping[str, np.ndarray],
                     settings: SecureAggregationSettings, server_round: int) -> DecodedAggregate:
    """The new values of the planned tensors from SecAgg+'s mean vector (UpdateRejected if it is unusable)."""
    if len(vectors) != len(names) + 2:
        raise UpdateRejected(f"round {server_round}: the secure aggregate has {len(vectors)} tensors, expected "
                             f"{len(names) + 2}.")
    if any(np.asarray(v).size != 1 for v in vectors[-2:]):
        raise UpdateRejected(f"round {server_round}: the secure aggregate's weight and loss must be one value each.")
    mean_weight = float(np.asarray(vectors[-2]).reshape(-1)[0])
    if not np.isfinite(mean_weight) or mean_weight <= settings.quantization_step:
        raise UpdateRejected(f"round {server_round}: the secure aggregate's mean weight is {mean_weight}; "
                             "it cannot be divided by.")
    state = {}
    largest = 0.0
    for name, vector in zip(names, vectors):
        vector = np.asarray(vector, dtype=np.float64)
        if vector.size != global_state[name].size:
            raise UpdateRejected(f"round {server_round}: the secure aggregate's vector for tensor '{name}' has "
                                 f"{vector.size} values, expected {global_state[name].size}.")
        change = vector.reshape(global_state[name].shape) / mean_weight
        largest = max(largest, float(np.max(np.abs(change))) if change.size else 0.0)
        state[name] = (global_state[name].astype(np.float64) + change).astype(global_state[name].dtype)
    loss = LOSS_SCALE * float(np.asarray(vectors[-1]).reshape(-1)[0]) / mean_weight
    return DecodedAggregate(state, loss, mean_weight, error_bound(settings, mean_weight, largest))
