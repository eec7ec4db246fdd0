"""One federated round through Flower's own SecAgg+ (``SecAggPlusWorkflow``), driven round by round.

Flower's SecAgg+ workflow speaks the legacy strategy API: it asks a ``Strategy`` which clients to train
(``configure_fit``) and hands it the unmasked aggregate (``aggregate_fit``). :class:`_OneRoundStrategy`
is that strategy for exactly one round: it sends the round's instruction to the sites that accepted it and
keeps what comes back, so the coordinator's own round loop (ask, train, validate, record) stays in charge.
When SecAgg+ halts (fewer live sites than its threshold) it returns without calling ``aggregate_fit`` and
without an error; here that becomes an explicit ``vectors=None`` that the coordinator records as a failed
round.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from protocols.config import FederationConfig
from protocols.messages import TrainInstruction

log = logging.getLogger("fedistill.coordinator")
INSTRUCTION_KEY = "instruction"


@dataclass
class SecureRoundOutcome:
    vectors: list[np.ndarray] | None
    participants: list[str] = field(default_factory=list)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


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


def run_secure_round(grid: Grid, context: Context, node_ids: list[int], instruction: TrainInstruction,
                     global_arrays: Mapping[str, np.ndarray], config: FederationConfig,
                     timeout: float) -> SecureRoundOutcome:
    """Train ``node_ids`` on ``instruction`` and return the mean of their masked vectors (None if halted)."""
    strategy = _OneRoundStrategy(grid, node_ids, instruction)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=instruction.total_rounds),
                           strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: instruction.server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.ascontiguousarray(a) for a in global_arrays.values()]), keep_input=True)
    settings = config.secagg_settings()
    workflow = SecAggPlusWorkflow(num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
                                  max_weight=1.0, clipping_range=settings.clipping_range,
                                  quantization_range=settings.quantization_range, timeout=timeout)
    workflow(grid, legacy)
    survivors = set(strategy.reports)
    failures = {f"node-{node_id}": "dropped out during SecAgg+" for node_id in node_ids if node_id not in survivors}
    if strategy.errors and failures:
        detail = "; ".join(strategy.errors)
        failures = {node: f"{reason}: {detail}" for node, reason in failures.items()}
    for node, reason in failures.items():
        log.warning("round %d: %s %s", instruction.server_round, node, reason)
    reports = {str(report.pop("site")): report for report in strategy.reports.values()}
    return SecureRoundOutcome(strategy.aggregate, sorted(reports), reports, failures)

