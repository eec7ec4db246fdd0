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

from dataclasses import dataclass, field

from flwr.app import Context, Message, MessageType

from client.app import build_client_app
from client.site import Site
from client.train import derived_seed
from coordinator.app import build_server_app
from coordinator.rounds import Coordinator
from protocols.errors import ConfigError


class InjectedSiteFailure(RuntimeError):
    """A failure the simulation harness injected on purpose (fault-injection runs only)."""


@dataclass(frozen=True)
class FaultPlan:
    """Which sites fail in which rounds: each site independently with ``drop_rate``, plus chosen (site, round)s.

    A failing site trains (and spends its budget), then crashes before its reply leaves: the worst moment
    for the coordinator, which has already counted on it.
    """

    drop_rate: float = 0.0
    failures: frozenset[tuple[str, int]] = field(default_factory=frozenset)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ConfigError(f"--drop-rate must be in [0, 1], got {self.drop_rate}.")

    def fails(self, site: str, server_round: int) -> bool:
        if (site, server_round) in self.failures:
            return True
        return derived_seed(self.seed, "drop", site, server_round) / 2**32 < self.drop_rate

    def mod(self, site_of: Callable[[Context], str]) -> Callable:
        def inject_failures(msg: Message, context: Context, call_next: Callable) -> Message:
            # The training message: plain ("config"), or SecAgg+'s masked-vector stage (it carries the FitIns).
            training = msg.metadata.message_type == MessageType.TRAIN and (
                "config" in msg.content.config_records or "fitins.parameters" in msg.content.array_records)
            reply = call_next(msg, context)
            if training:
                site, server_round = site_of(context), int(msg.metadata.group_id)
                if self.fails(site, server_round):
                    raise InjectedSiteFailure(f"injected failure: site {site} crashed in round {server_round} "
                                              "after training, before replying")
            return reply

        return inject_failures


def _state_dir_of_partition(state_dirs: tuple[str, ...], context: Context) -> Path:
    return Path(state_dirs[int(context.node_config["partition-id"])])


def run_federation(state_dirs: list[Path], make_coordinator: Callable[[], Coordinator], cpus_per_site: float = 1.0,
                   verbose: bool = False, faults: FaultPlan | None = None,
                   client_mods: list[Callable] | None = None) -> Coordinator:
    """Run every round of one federation in Flower's simulation engine and return the coordinator.

    ``client_mods`` (e.g. a benchmark's byte counter) wrap each site's ClientApp inside the fault injector and
    outside SecAgg+, so they see the replies as they leave the site.
    """
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    holder: dict[str, Coordinator] = {}

    def coordinator_for(_: Context) -> tuple[Coordinator, int]:
        holder["coordinator"] = make_coordinator()
        return holder["coordinator"], len(state_dirs)

    resolve = partial(_state_dir_of_partition, tuple(str(p.resolve()) for p in state_dirs))
    mods = [faults.mod(lambda context: Site.load(resolve(context)).name)] if faults else []
    mods += client_mods or []
    client_app = build_client_app(resolve, mods)
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
