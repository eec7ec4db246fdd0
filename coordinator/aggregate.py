"""Fragment-aware aggregation: a per-fragment weighted average; fragments nobody trained keep their global values.

Every reply is validated before it counts: a reply with an unknown fragment, a missing or extra tensor, a
wrong shape or a non-finite value is rejected (and reported) and never touches the global student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.errors import UpdateRejected
from protocols.fragments import FragmentSpec
from protocols.messages import check_fragment_update


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


def aggregate_fragments(global_state: Mapping[str, np.ndarray], spec: FragmentSpec, fragments: tuple[str, ...],
                        replies: Sequence[SiteReply], server_round: int) -> AggregationResult:
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
    for name in spec.parameters_of_all(fragments):
        mean = sum(w * r.arrays[name].astype(np.float64) for w, r in zip(weights, valid))
        new_state[name] = mean.astype(global_state[name].dtype)
    return AggregationResult(new_state, [r.site for r in valid], rejected, fragments)
