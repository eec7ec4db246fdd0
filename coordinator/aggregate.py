"""Fragment-aware aggregation: a per-fragment weighted average; fragments nobody trained keep their global values.

Only replies that passed :func:`coordinator.replies.screen_replies` are averaged. The aggregate itself is
validated too (:func:`check_aggregate`) before it replaces anything: under secure aggregation it is the only thing
the coordinator sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from coordinator.replies import SiteReply
from protocols.errors import UpdateRejected
from protocols.fragments import FragmentSpec
from protocols.messages import fragment_change_norms
from protocols.secagg import site_weight

log = logging.getLogger("fedistill.coordinator")


@dataclass
class AggregationResult:
    state: dict[str, np.ndarray]
    accepted: list[str] = field(default_factory=list)
    updated_fragments: tuple[str, ...] = ()
    aggregate_rejected: str | None = None


def check_aggregate(aggregate: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], spec: FragmentSpec,
                    fragments: tuple[str, ...], server_round: int, max_update_norm: float) -> None:
    """Shapes, dtype, finite values and an L2 bound on each fragment's change, or UpdateRejected naming it."""
    for fragment in fragments:
        for name in spec.parameters_of(fragment):
            where = f"round {server_round}, fragment '{fragment}', tensor '{name}'"
            if name not in aggregate:
                raise UpdateRejected(f"aggregate of {where}: missing.")
            value, current = np.asarray(aggregate[name]), global_state[name]
            if value.shape != current.shape:
                raise UpdateRejected(f"aggregate of {where}: shape {value.shape}, expected {current.shape}.")
            if value.dtype != current.dtype:
                raise UpdateRejected(f"aggregate of {where}: dtype {value.dtype}, expected {current.dtype}.")
            if not np.all(np.isfinite(value)):
                raise UpdateRejected(f"aggregate of {where}: contains non-finite values.")
    for fragment, norm in fragment_change_norms(aggregate, global_state, spec, fragments).items():
        if not norm <= max_update_norm:
            raise UpdateRejected(f"aggregate of round {server_round}, fragment '{fragment}': its change has L2 norm "
                                 f"{norm:.4g}, above the bound max_update_norm={max_update_norm:g}.")


def aggregate_fragments(global_state: Mapping[str, np.ndarray], spec: FragmentSpec, fragments: tuple[str, ...],
                        replies: Sequence[SiteReply], server_round: int, max_update_norm: float = math.inf,
                        weight_scale: int = 10_000) -> AggregationResult:
    """The example-weighted mean of screened replies, checked before it is returned as the new state.

    A site's weight is its example count capped at ``weight_scale``, as under SecAgg+ (:func:`site_weight`): a site
    that claims a billion examples pulls the average no harder than one with ``weight_scale``.
    """
    new_state = {name: value.copy() for name, value in global_state.items()}
    if not replies:
        return AggregationResult(new_state)
    weights = np.array([site_weight(r.num_examples, weight_scale) for r in replies], dtype=np.float64)
    weights /= weights.sum()
    aggregate = {}
    for name in spec.parameters_of_all(fragments):
        mean = sum(w * r.arrays[name].astype(np.float64) for w, r in zip(weights, replies))
        aggregate[name] = mean.astype(global_state[name].dtype)
    try:
        check_aggregate(aggregate, global_state, spec, fragments, server_round, max_update_norm)
    except UpdateRejected as err:
        log.error("%s The global student is unchanged.", err)
        return AggregationResult(new_state, aggregate_rejected=str(err))
    return AggregationResult(new_state | aggregate, [r.site for r in replies], fragments)
