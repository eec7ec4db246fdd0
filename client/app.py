"""The site's Flower ClientApp: unpack the message, call plain functions in :mod:`client.train`, pack the reply.

Two message kinds reach a site each round: a query ("will you train this round?"), answered from the
site's own budget, and the training instruction. A site that refuses answers with a typed ``refusal``
record, never an error: refusal is a normal outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site
from client.train import check_budget, train_round
from protocols.errors import BudgetExhausted
from protocols.messages import TrainInstruction

SiteResolver = Callable[[Context], Path]


def state_dir_from_node_config(context: Context) -> Path:
    """Deployment: the SuperNode is started with ``--node-config 'state-dir="..."'``."""
    return Path(str(context.node_config["state-dir"]))


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _refusal(site: Site, refusal: BudgetExhausted) -> RecordDict:
    return RecordDict({"refusal": ConfigRecord({"reason": str(refusal), **{
        key.replace("_", "-"): value for key, value in refusal.details.items() if value is not None}}),
        "site": ConfigRecord({"name": site.name})})


def build_client_app(resolve_state_dir: SiteResolver) -> ClientApp:
    app = ClientApp()

    @app.query()
    def consider(msg: Message, context: Context) -> Message:
        site = Site.load(resolve_state_dir(context))
        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        try:
            check_budget(site, instruction, len(site.splits()["train"]))
        except BudgetExhausted as refusal:
            return Message(_refusal(site, refusal), reply_to=msg)
        return Message(RecordDict({"accept": ConfigRecord({"round": instruction.server_round}),
                                   "site": ConfigRecord({"name": site.name})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = Site.load(resolve_state_dir(context))
        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        try:
            update = train_round(site, instruction, from_array_record(msg.content["arrays"]))
        except BudgetExhausted as refusal:
            return Message(_refusal(site, refusal), reply_to=msg)
        return Message(RecordDict({
            "arrays": to_array_record(update.arrays),
            "metrics": MetricRecord({"num-examples": update.num_examples, "train-loss": update.train_loss,
                                     "steps": update.steps}),
            "privacy": ConfigRecord(update.privacy),
            "site": ConfigRecord({"name": site.name}),
        }), reply_to=msg)

    return app


app = build_client_app(state_dir_from_node_config)
