"""The site's Flower ClientApp: unpack the message, call :func:`client.train.train_round`, pack the reply."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site
from client.train import train_round
from protocols.messages import TrainInstruction

SiteResolver = Callable[[Context], Path]


def state_dir_from_node_config(context: Context) -> Path:
    """Deployment: the SuperNode is started with ``--node-config 'state-dir="..."'``."""
    return Path(str(context.node_config["state-dir"]))


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def build_client_app(resolve_state_dir: SiteResolver) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = Site.load(resolve_state_dir(context))
        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        update = train_round(site, instruction, from_array_record(msg.content["arrays"]))
        return Message(RecordDict({
            "arrays": to_array_record(update.arrays),
            "metrics": MetricRecord({"num-examples": update.num_examples, "train-loss": update.train_loss,
                                     "steps": update.steps}),
            "site": ConfigRecord({"name": site.name}),
        }), reply_to=msg)

    return app


app = build_client_app(state_dir_from_node_config)
