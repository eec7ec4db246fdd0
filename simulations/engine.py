"""The harness over Flower's simulation engine: the same ClientApp and ServerApp as deployment, virtual sites.

Each virtual SuperNode's ``partition-id`` selects its site state directory, exactly the directory a real
site would keep; the apps run unchanged. Each client gets one CPU, so both cores train sites in parallel.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

from flwr.app import Context

from client.app import build_client_app
from coordinator.app import build_server_app
from coordinator.rounds import Coordinator


def _state_dir_of_partition(state_dirs: tuple[str, ...], context: Context) -> Path:
    return Path(state_dirs[int(context.node_config["partition-id"])])


def run_federation(state_dirs: list[Path], make_coordinator: Callable[[], Coordinator], cpus_per_site: float = 1.0,
                   verbose: bool = False) -> Coordinator:
    """Run every round of one federation in Flower's simulation engine and return the coordinator."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    holder: dict[str, Coordinator] = {}

    def coordinator_for(_: Context) -> tuple[Coordinator, int]:
        holder["coordinator"] = make_coordinator()
        return holder["coordinator"], len(state_dirs)

    client_app = build_client_app(partial(_state_dir_of_partition, tuple(str(p.resolve()) for p in state_dirs)))
    server_app = build_server_app(coordinator_for)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(state_dirs),
                       backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": verbose}},
                       verbose_logging=verbose)
    if "coordinator" not in holder:
        raise RuntimeError("the simulation ended before the coordinator started; see the log above.")
    return holder["coordinator"]
