"""Fragment-aware aggregation: a per-fragment weighted average; fragments nobody trained keep their global values.

Every reply is validated before it counts: a reply with an unknown fragment, a missing or extra tensor, a
wrong shape or a non-finite value is rejected (and reported) and never touches the global student. The
aggregate itself is validated too (:func:`check_aggregate`) before it replaces anything: under secure
aggregation it is the only thing the coordinator sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.errors import UpdateRejected
from protocols.fragments import FragmentSpec
from protocols.messages import check_fragment_update

log = logging.getLogger("fedistill.coordinator")


@dataclass(frozen=True)
class SiteReply:
    site: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    privacy: dict[str, Any] = field(default_factory=dict)


@dataclass
class AggregationResult:
    state: dict[str, np.ndarray]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    updated_fragments: tuple[str, ...] = ()
    aggregate_rejected: str | None = None


def check_aggregate(aggregate: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], spec: FragmentSpec,
                    fragments: tuple[str, ...], server_round: int, max_update_norm: float) -> None:
    """Shapes, dtype, finite values and an L2 bound on each fragment's change, or UpdateRejected naming it."""
    for fragment in fragments:
        squared = 0.0
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
            squared += float(np.sum((value.astype(np.float64) - current.astype(np.float64)) ** 2))
        if np.sqrt(squared) > max_update_norm:
            raise UpdateRejected(f"aggregate of round {server_round}, fragment '{fragment}': its change has L2 norm "
                                 f"{np.sqrt(squared):.4g}, above the bound max_update_norm={max_update_norm:g}.")


def aggregate_fragments(global_state: Mapping[str, np.ndarray], spec: FragmentSpec, fragments: tuple[str, ...],
                        replies: Sequence[SiteReply], server_round: int,
                        max_update_norm: float = math.inf) -> AggregationResult:
    shapes = {name: tuple(value.shape) for name, value in global_state.items()}
    valid: list[SiteReply] = []
    rejected: dict[str, str] = {}
    for reply in sorted(replies, key=lambda r: r.site):
        try:
            check_fragment_update(reply.arrays, spec, fragments, shapes, f"round {server_round} update from {reply.site}")
            if reply.num_examples <= 0:
                raise UpdateRejected(f"round {server_round} update from {reply.site}: num-examples must be positive, "
                                     f"got {reply.num_examples}.")
        except UpdateRejected as err:
            rejected[reply.site] = str(err)
            continue
        valid.append(reply)
    new_state = {name: value.copy() for name, value in global_state.items()}
    if not valid:
        return AggregationResult(new_state, [], rejected, ())
    weights = np.array([r.num_examples for r in valid], dtype=np.float64)
    weights /= weights.sum()
    aggregate = {}
    for name in spec.parameters_of_all(fragments):
        mean = sum(w * r.arrays[name].astype(np.float64) for w, r in zip(weights, valid))
        aggregate[name] = mean.astype(global_state[name].dtype)
    try:
        check_aggregate(aggregate, global_state, spec, fragments, server_round, max_update_norm)
    except UpdateRejected as err:
        log.error("%s The global student is unchanged.", err)
        return AggregationResult(new_state, [], rejected, (), aggregate_rejected=str(err))
    return AggregationResult(new_state | aggregate, [r.site for r in valid], rejected, fragments)
