"""The coordinator's Flower ServerApp: send each round's instruction, collect replies, hand them to :class:`Coordinator`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.aggregate import SiteReply
from coordinator.rounds import Coordinator
from coordinator.secure_round import run_secure_round
from protocols.canonical import atomic_write_json
from protocols.config import FederationConfig
from protocols.errors import ConfigError

log = logging.getLogger("fedistill.coordinator")
CoordinatorFactory = Callable[[Context], tuple[Coordinator, int]]


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(node_ids)} site(s) connected after {timeout:.0f} s; {minimum} are needed.")
        time.sleep(0.5)


def _unpack_reply(msg: Message) -> SiteReply:
    metrics = msg.content["metrics"]
    return SiteReply(site=str(msg.content["site"]["name"]),
                     arrays={name: a.numpy() for name, a in msg.content["arrays"].items()},
                     num_examples=int(metrics["num-examples"]), train_loss=float(metrics["train-loss"]),
                     privacy=dict(msg.content["privacy"]))


def _exchange(grid: Grid, node_ids: list[int], content: RecordDict, message_type: str, server_round: int,
              timeout: float) -> tuple[dict[int, Message], dict[str, str], dict[str, str]]:
    """Send one message per node; returns (replies by node, refusals by site, failures by node)."""
    messages = [Message(RecordDict(dict(content.items())), message_type=message_type, dst_node_id=node_id,
                        group_id=str(server_round)) for node_id in node_ids]
    replies, refusals, failures = {}, {}, {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures[f"node-{node}"] = reply.error.reason
            log.warning("round %d: node-%d failed: %s", server_round, node, reply.error.reason)
        elif "refusal" in reply.content:
            site = str(reply.content["site"]["name"])
            refusals[site] = str(reply.content["refusal"]["reason"])
            log.warning("round %d: %s refused: %s", server_round, site, refusals[site])
        else:
            replies[node] = reply
    return replies, refusals, failures


def run_rounds(grid: Grid, context: Context, coordinator: Coordinator, min_nodes: int,
               timeout: float = 600.0) -> None:
    """Each round: ask every site whether it will train (its budget decides), then train those that accept.

    With secure aggregation (the default) the training goes through Flower's SecAgg+; otherwise each
    site's update arrives on its own and is validated before the average.
    """
    fewest = coordinator.config.fewest_sites_per_round
    if coordinator.config.secure_aggregation and min_nodes < coordinator.config.min_cohort:
        raise ConfigError(f"secure aggregation needs at least min_cohort={coordinator.config.min_cohort} sites per "
                          f"round, but the federation has {min_nodes}; add sites or lower min_cohort.")
    for server_round in range(coordinator.completed_round + 1, coordinator.config.rounds + 1):
        started = time.perf_counter()
        node_ids = wait_for_nodes(grid, min_nodes, timeout)
        instruction = coordinator.instruction(server_round)
        config = ConfigRecord(instruction.to_config())
        accepted, refusals, failures = _exchange(grid, node_ids, RecordDict({"config": config}), MessageType.QUERY,
                                                 server_round, timeout)
        if len(accepted) < fewest:
            coordinator.stop(server_round, refusals, failures, started)
            log.warning("round %d: only %d site(s) accepted, %d needed; the run ends here", server_round,
                        len(accepted), fewest)
            return
        if coordinator.config.secure_aggregation:
            outcome = run_secure_round(grid, context, sorted(accepted), instruction, coordinator.state,
                                       coordinator.config, timeout)
            coordinator.complete_secure_round(server_round, outcome.vectors, outcome.participants, outcome.privacy,
                                              failures | outcome.failures, refusals, started)
            continue
        arrays = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in coordinator.state.items()})
        trained, late_refusals, train_failures = _exchange(
            grid, sorted(accepted), RecordDict({"arrays": arrays, "config": config}), MessageType.TRAIN,
            server_round, timeout)
        coordinator.complete_round(server_round, [_unpack_reply(r) for r in trained.values()],
                                   failures | train_failures, started, refusals | late_refusals)


def build_server_app(make_coordinator: CoordinatorFactory) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        coordinator, min_sites = make_coordinator(context)
        run_rounds(grid, context, coordinator, min_sites)

    return app


def coordinator_from_run_config(context: Context) -> tuple[Coordinator, int]:
    """Deployment: ``fedistill run`` passes the whole federation config (JSON) in the Flower run config.

    A new run takes Flower's run id as its own; ``resume-run`` names an earlier run to continue instead,
    in the same run directory, with the same ledger and the same sites' budgets.
    """
    run_config = context.run_config
    for key in ("federation", "out-dir", "min-sites"):
        if not run_config.get(key):
            raise ConfigError(f"run config key '{key}' is missing; launch runs with `fedistill run run.toml`.")
    config = FederationConfig.from_dict(json.loads(str(run_config["federation"])), where="run config 'federation'")
    resume = str(run_config.get("resume-run", ""))
    run_id = resume or str(context.run_id)
    signing_key = str(run_config.get("signing-key", ""))
    # The transport the coordinator enforces (TLS certificates, SuperNode authentication, registered site keys),
    # attested by `fedistill run` from the coordinator directory; it goes into the signed run ledger.
    transport = json.loads(str(run_config.get("transport") or "{}"))
    run_dir = Path(str(run_config["out-dir"])) / run_id
    coordinator = Coordinator(config, run_id, run_dir, signing_key=Path(signing_key) if signing_key else None,
                              transport=transport)
    if resume:
        coordinator.resume()
    else:
        atomic_write_json(run_dir / "config.json", {
            "schema_version": 1, "run_id": run_id, "deployment": {"flower_run_id": context.run_id,
                                                                  "wait_for_sites": int(run_config["min-sites"])},
            "federation": config.to_dict(), "config_hash": config.config_hash()})
    return coordinator, int(run_config["min-sites"])


app = build_server_app(coordinator_from_run_config)
