"""One hostile site in a real simulated federation (Flower's simulation engine): the run goes on without it.

A ClientApp mod rewrites what one site sends: a tensor of the wrong dtype in round 1, NaN metrics in round 2, and
in round 3 its round-1 reply again. Every round still aggregates the honest sites, and the hostile site is named
in the coordinator's log, its ledger, metrics.jsonl and the compliance report.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, Message
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from compliance.report import build_report
from protocols.ledger import read_events
from simulations.runner import SimulationOptions, simulate

HOSTILE_PARTITION = 0


def hostile_mod(stolen: Path) -> Callable:
    """Partition 0 turns hostile on its training replies, in both aggregation modes.

    Sites run in Ray worker processes, so the round-1 reply it replays later is kept in a file (``stolen``).
    """

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != HOSTILE_PARTITION or reply.has_error():
            return reply
        server_round = int(msg.metadata.group_id)
        configs = reply.content.config_records
        secure = RECORD_KEY_CONFIGS in configs and Key.MASKED_PARAMETERS in configs[RECORD_KEY_CONFIGS]
        plain = "arrays" in reply.content.array_records
        if not (secure or plain):
            return reply
        if server_round == 1:
            stolen.write_bytes(pickle.dumps(reply.content))
            if secure:  # masked integers sent as floats
                masked = configs[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                configs[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [
                    ndarray_to_bytes(bytes_to_ndarray(b).astype(np.float64)) for b in masked]
            else:
                arrays = reply.content["arrays"]
                name = next(iter(arrays.keys()))
                arrays[name] = Array(arrays[name].numpy().astype(np.float64))
        elif server_round == 2:
            if secure:
                configs["fitres.metrics"]["epsilon-run"] = math.nan
            else:
                reply.content["metrics"]["train-loss"] = math.nan
        elif server_round == 3:
            return Message(pickle.loads(stolen.read_bytes()), reply_to=msg)
        return reply

    return mod


@pytest.mark.slow
@pytest.mark.parametrize("secure", [True, False], ids=["secagg+", "plain"])
def test_a_hostile_site_is_rejected_by_name_and_the_run_completes(tmp_path, caplog, secure):
    caplog.set_level(logging.WARNING, logger="fedistill.coordinator")
    stolen = tmp_path / "stolen-reply.pickle"
    options = SimulationOptions(sites=4, rounds=3, subsample=0.25, local_steps=5, seed=4, out=tmp_path,
                                secure_aggregation=secure, stages=("federated",))
    summary = simulate(options, client_mods=[hostile_mod(stolen)])
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    config = json.loads((run_dir / "config.json").read_text())
    hostile, honest = config["sites"][HOSTILE_PARTITION], sorted(config["sites"][1:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    expected = {1: "dtype", 2: "epsilon-run" if secure else "train-loss", 3: "replayed or stale"}
    for record in records:
        assert record["status"] == "aggregated", record
        assert record["participants"] == honest
        assert hostile in record["rejected"] and expected[record["round"]] in record["rejected"][hostile], record
    ledger_rounds = [e["payload"] for e in read_events(run_dir / "ledger.jsonl") if e["kind"] == "round"]
    assert all(hostile in r["rejected"] for r in ledger_rounds) and len(ledger_rounds) == 3
    assert any(e["kind"] == "run-finished" for e in read_events(run_dir / "ledger.jsonl"))
    logged = [r.getMessage() for r in caplog.records if hostile in r.getMessage() and "rejected" in r.getMessage()]
    assert len(logged) >= 3
    report = build_report(run_dir)
    per_round = report["secure_aggregation"]["per_round"]
    assert all(hostile in r["rejected"] for r in per_round)
    assert summary["failed_rounds"] == []
