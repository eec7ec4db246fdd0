"""One federated round through Flower's own SecAgg+ (``SecAggPlusWorkflow``), driven round by round.

Flower's SecAgg+ workflow speaks the legacy strategy API: it asks a ``Strategy`` which clients to train
(``configure_fit``) and hands it the unmasked aggregate (``aggregate_fit``). :class:`_OneRoundStrategy`
is that strategy for exactly one round: it sends the round's instruction to the sites that accepted it and
keeps what comes back, so the coordinator's own round loop (ask, train, validate, record) stays in charge.
When SecAgg+ halts (fewer live sites than its threshold) it returns without calling ``aggregate_fit`` and
without an error; here that becomes an explicit ``vectors=None`` that the coordinator records as a failed
round, and so does any exception raised inside the protocol.

Each masked vector arrives with the site's clear metadata (site, the round's binding, its public privacy
report). :class:`_ScreeningGrid` checks both before Flower sums the vector: a reply that fails is turned into an
error, so Flower treats the site as dropped out (its pairwise masks are removed with its neighbours' shares, its
own mask never revealed) and the honest sites' vectors are still aggregated. The rejection is named.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from coordinator.replies import check_secure_report, safe_text
from protocols.config import FederationConfig
from protocols.errors import UpdateRejected
from protocols.messages import TrainInstruction

log = logging.getLogger("fedistill.coordinator")
INSTRUCTION_KEY = "instruction"
# Flower's error code for a reply the coordinator refused (any code marks the node as dropped in SecAgg+).
REJECTED_REPLY_CODE = 400


@dataclass
class SecureRoundOutcome:
    vectors: list[np.ndarray] | None
    participants: list[str] = field(default_factory=list)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    halted: str | None = None


class _ScreeningGrid:
    """The Grid as SecAgg+ sees it, except that masked-vector replies are screened before Flower sums them."""

    def __init__(self, grid: Grid, node_sites: Mapping[int, str], instruction: TrainInstruction,
                 layout: list[tuple[int, ...]], last_seq: Mapping[str, int]) -> None:
        self._grid, self._node_sites, self._instruction = grid, node_sites, instruction
        self._layout, self._last_seq = layout, last_seq
        self.rejected: dict[str, str] = {}
        self.privacy: dict[int, dict[str, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return [self._screen(reply) for reply in self._grid.send_and_receive(messages, timeout=timeout)]

    def _screen(self, reply: Message) -> Message:
        if reply.has_error():
            return reply
        try:
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is None or SecAggKey.MASKED_PARAMETERS not in configs:
                return reply
        except Exception:  # not even readable: Flower's own stage reports it
            return reply
        node = reply.metadata.src_node_id
        site = self._node_sites.get(node, f"node-{node}")
        try:
            self._check_layout(configs[SecAggKey.MASKED_PARAMETERS], site)
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            self.privacy[node] = check_secure_report(fitres.metrics, site, self._instruction, self._last_seq) | {
                "site": site}
        except Exception as err:  # one hostile reply is that site's rejection; the others are still summed
            reason = safe_text(err if isinstance(err, UpdateRejected) else
                               f"round {self._instruction.server_round} masked update from {site}: unreadable "
                               f"({type(err).__name__}: {err})")
            self.rejected[site] = reason
            log.warning("round %d: rejected the reply of %s: %s", self._instruction.server_round, site, reason)
            return Message(metadata=reply.metadata, error=Error(code=REJECTED_REPLY_CODE, reason=reason))
        return reply

    def _check_layout(self, masked: Any, site: str) -> None:
        what = f"round {self._instruction.server_round} masked update from {site}"
        if not isinstance(masked, list) or len(masked) != len(self._layout):
            raise UpdateRejected(f"{what}: {len(masked) if isinstance(masked, list) else 'no'} masked tensors, "
                                 f"expected {len(self._layout)}.")
        for index, (raw, shape) in enumerate(zip(masked, self._layout)):
            array = bytes_to_ndarray(raw) if isinstance(raw, bytes) else None
            if array is None or array.shape != shape or not np.issubdtype(array.dtype, np.integer):
                got = "not bytes" if array is None else f"shape {array.shape}, dtype {array.dtype}"
                raise UpdateRejected(f"{what}: masked tensor {index} has {got}; expected shape {shape} of integers.")


def masked_layout(payload_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes of a site's masked vector: Flower's weight factor, one per payload tensor (the planned student
    tensors, then a knowledge run's soft labels), then [w] and [w*loss]."""
    return [(1,), *(tuple(shape) for shape in payload_shapes), (1,), (1,)]


class _OneRoundStrategy(Strategy):
    def __init__(self, grid: Grid, node_ids: list[int], instruction: TrainInstruction) -> None:
        self.grid, self.node_ids, self.instruction = grid, node_ids, instruction
        self.aggregate: list[np.ndarray] | None = None
        self.reports: dict[int, dict[str, Any]] = {}
        self.errors: list[str] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        # Legacy configs hold scalars only: the instruction travels as one JSON string.
        fit_ins = FitIns(parameters, {INSTRUCTION_KEY: json.dumps(self.instruction.to_config())})
        return [(GridClientProxy(node_id=node_id, grid=self.grid, run_id=self.grid.run.run_id), fit_ins)
                for node_id in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.errors = [str(failure) for failure in failures]
        if not results:
            return None, {}
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        self.reports = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def run_secure_round(grid: Grid, context: Context, node_ids: list[int], node_sites: Mapping[int, str],
                     instruction: TrainInstruction, global_arrays: Mapping[str, np.ndarray], config: FederationConfig,
                     payload_shapes: list[tuple[int, ...]], last_seq: Mapping[str, int],
                     timeout: float) -> SecureRoundOutcome:
    """Train ``node_ids`` (which answered as ``node_sites``) on ``instruction``; the mean of the masked vectors that
    passed screening, or None if the protocol halted or failed. ``payload_shapes`` are the shapes of what each site
    puts into the sum (Coordinator.secure_payload)."""
    screening = _ScreeningGrid(grid, node_sites, instruction, masked_layout(payload_shapes), last_seq)
    strategy = _OneRoundStrategy(grid, node_ids, instruction)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=instruction.total_rounds),
                           strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: instruction.server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.ascontiguousarray(a) for a in global_arrays.values()]), keep_input=True)
    settings = config.secagg_settings()
    workflow = SecAggPlusWorkflow(num_shares=settings.shares_for(len(node_ids)),
                                  reconstruction_threshold=settings.reconstruction_threshold,
                                  max_weight=1.0, clipping_range=settings.clipping_range,
                                  quantization_range=settings.quantization_range, timeout=timeout)
    halted = None
    try:
        workflow(screening, legacy)
    except Exception as err:  # a protocol message of any shape fails this round, never the run
        halted = safe_text(f"SecAgg+ raised {type(err).__name__}: {err}")
        log.error("round %d: %s", instruction.server_round, halted)
        strategy.aggregate, strategy.reports = None, {}
    survivors = set(strategy.reports)
    rejected_nodes = {node for node, site in node_sites.items() if site in screening.rejected}
    failures = {f"node-{node_id}": "dropped out during SecAgg+" for node_id in node_ids
                if node_id not in survivors and node_id not in rejected_nodes}
    if strategy.errors and failures:
        detail = "; ".join(strategy.errors)
        failures = {node: f"{reason}: {detail}" for node, reason in failures.items()}
    for node, reason in failures.items():
        log.warning("round %d: %s %s", instruction.server_round, node, reason)
    reports = {screening.privacy[node]["site"]: {k: v for k, v in screening.privacy[node].items() if k != "site"}
               for node in strategy.reports if node in screening.privacy}
    return SecureRoundOutcome(strategy.aggregate, sorted(reports), reports, failures, screening.rejected, halted)

