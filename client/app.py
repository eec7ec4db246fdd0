"""The site's Flower ClientApp: unpack the message, call plain functions in :mod:`client.train`, pack the reply.

Two message kinds reach a site each round: a query ("will you train this round?"), answered from the
site's own budget, and the training instruction. A site that refuses answers with a typed ``refusal``
record, never an error: refusal is a normal outcome. After the last round, a curriculum's site-local stage arrives
as an ``evaluate`` message (client/local_stage.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from client.site import Site
from client.traffic import traffic_mod
from protocols.errors import BudgetExhausted
from protocols.messages import PUBLIC_PRIVACY_FIELDS, TrainInstruction

SiteResolver = Callable[[Context], Path]


def state_dir_from_node_config(context: Context) -> Path:
    """Deployment: the SuperNode is started with ``--node-config 'state-dir="..."'``."""
    return Path(str(context.node_config["state-dir"]))


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _refusal(site: Site, refusal: BudgetExhausted, instruction: TrainInstruction) -> RecordDict:
    # Only the reason leaves the site: the decision's delta (at most 1/(10 n)) would tell the coordinator its record
    # count; the full decision stays in the site's own ledger.
    return RecordDict({"refusal": ConfigRecord({"reason": str(refusal)}),
                       "site": ConfigRecord({"name": site.name}), "binding": ConfigRecord(instruction.binding())})


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's secaggplus_mod for the SecAgg+ stages; every other message (queries) passes straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _secure_train(site: Site, msg: Message) -> RecordDict:
    """The SecAgg+ path: the reply's only vectors are the masked payload; its scalar weight is always 1."""
    from client.train import secure_train_round

    fit_ins = recorddict_to_fitins(msg.content, keep_input=True)
    instruction = TrainInstruction.from_config(json.loads(str(fit_ins.config["instruction"])))
    encoded, update = secure_train_round(site, instruction, parameters_to_ndarrays(fit_ins.parameters))
    report = {key: value for key, value in update.privacy.items() if key in PUBLIC_PRIVACY_FIELDS}
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(encoded.vectors), 1,
                    {"site": site.name, **instruction.binding(), **report})
    return fitres_to_recorddict(result, keep_input=False)


def _validation_reply(site: Site, msg: Message) -> RecordDict:
    from client.validation import ValidationRequest, validate_student

    request = ValidationRequest.from_config(dict(msg.content["config"]))
    report = validate_student(site, request, from_array_record(msg.content["arrays"]))
    return RecordDict({"validation": ConfigRecord({"report": json.dumps(report)}),
                       "site": ConfigRecord({"name": site.name}), "binding": ConfigRecord(request.binding())})


def _evaluation_reply(site: Site, msg: Message) -> RecordDict:
    from client.evaluation import evaluate_student
    from protocols.evaluation import EvaluationRequest

    request = EvaluationRequest.from_config(dict(msg.content["config"]))
    release = evaluate_student(site, request, from_array_record(msg.content["arrays"]))
    return RecordDict({"evaluation": ConfigRecord({"release": json.dumps(release.to_dict())}),
                       "site": ConfigRecord({"name": site.name}), "binding": ConfigRecord(request.binding())})


def build_client_app(resolve_state_dir: SiteResolver, mods: list[Callable] | None = None) -> ClientApp:
    # Outermost: the traffic record sees every message as it arrives and every reply as it leaves, masked.
    app = ClientApp(mods=[traffic_mod(resolve_state_dir), *(mods or []), secure_aggregation_mod])

    # Deployment runs every message in a fresh process: the training stack (torch, Opacus) is imported only by
    # the messages that use it, not by SecAgg+'s key-exchange and unmasking stages.
    @app.query()
    def consider(msg: Message, context: Context) -> Message:
        from client.train import consider_round

        site = Site.load(resolve_state_dir(context))
        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        try:
            consider_round(site, instruction)
        except BudgetExhausted as refusal:
            return Message(_refusal(site, refusal, instruction), reply_to=msg)
        return Message(RecordDict({"accept": ConfigRecord({"round": instruction.server_round}),
                                   "site": ConfigRecord({"name": site.name}),
                                   "binding": ConfigRecord(instruction.binding())}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = Site.load(resolve_state_dir(context))
        if "fitins.parameters" in msg.content.array_records:
            return Message(_secure_train(site, msg), reply_to=msg)
        from client.train import plain_train_round

        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        try:
            update = plain_train_round(site, instruction, from_array_record(msg.content["arrays"]))
        except BudgetExhausted as refusal:
            return Message(_refusal(site, refusal, instruction), reply_to=msg)
        return Message(RecordDict({
            "arrays": to_array_record(update.arrays),
            "metrics": MetricRecord({"num-examples": update.num_examples, "train-loss": update.train_loss,
                                     "steps": update.steps}),
            "privacy": ConfigRecord(update.privacy),
            "site": ConfigRecord({"name": site.name}),
            "binding": ConfigRecord(instruction.binding()),
        }), reply_to=msg)

    @app.evaluate()
    def site_local(msg: Message, context: Context) -> Message:
        """A curriculum's site-local stage: fine-tune a local copy that stays here; only metrics may leave. Or, for a
        run that keeps its best round, a validation report on one round's student; or the test evaluation of a
        round's student, released as the site's policy says."""
        from client.local_stage import LocalStageRequest, run_site_local_stage
        from protocols.evaluation import EVALUATION_KEY

        site = Site.load(resolve_state_dir(context))
        if "validate" in msg.content["config"]:
            return Message(_validation_reply(site, msg), reply_to=msg)
        if EVALUATION_KEY in msg.content["config"]:
            return Message(_evaluation_reply(site, msg), reply_to=msg)
        request = LocalStageRequest.from_config(dict(msg.content["config"]))
        outcome = run_site_local_stage(site, request, from_array_record(msg.content["arrays"]))
        return Message(RecordDict({"local": ConfigRecord({"released": outcome["released"],
                                                          "metrics": json.dumps(outcome["metrics"])}),
                                   "site": ConfigRecord({"name": site.name}),
                                   "binding": ConfigRecord(request.binding())}), reply_to=msg)

    return app


app = build_client_app(state_dir_from_node_config)
