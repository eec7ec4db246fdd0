"""Every byte that arrives at a site and every byte that leaves it, per message, in the site's own ledger.

:func:`traffic_mod` is a Flower ClientApp mod. It sits outermost, outside SecAgg+'s ``secaggplus_mod``, so it
sees each message as it arrived and each reply as it leaves: SecAgg+'s public keys, encrypted shares,
masked vectors and unmasking shares included. For every message it appends one ledger event of kind
``transfer`` with ``{"run_id", "round", "stage", "message_type", "bytes_in", "bytes_out", "error"}``: sizes
only, never content. The stage is ``query``, ``train`` (a plain round), or one of SecAgg+'s four stages
``setup``, ``share-keys``, ``collect-masked-vectors`` and ``unmask``; any other message is named by its
Flower message type.

What a byte is here: Flower 1.42's Fleet API moves a message as a header and a tree of objects. The header
(the message's metadata, or its error, without content) travels in ``PullMessages``/``PushMessages`` with
the message's object tree (the object ids); every object (the message, its RecordDict, each record, each
array, each array chunk of at most 5 MiB) travels as its deflated bytes in ``PullObject``/``PushObject``,
identical objects once. :func:`wire_bytes` is the sum of those three parts, computed with Flower's own
serialization (``message_to_proto``, ``get_object_tree``, ``InflatableObject.deflate``): the arrays' raw
bytes, every ConfigRecord value (keys, ciphertexts, shares, node ids, the instruction) and the protobuf
field tags and lengths around them. Not counted: the per-request envelope of those calls (node id, run id,
session id, and the 64-character object id that names each object in its own request, about 90 B per
object), HTTP/2 or gRPC framing, compression, TLS records, retries, and the calls that carry no message
(node registration, heartbeats, ``GetRun``, ``GetFab``, ``ConfirmMessageReceived``).

The incoming message is measured before the app sees it (``secaggplus_mod`` rewrites its content in place),
the reply once the app returns it. After a round's last stage (``train``, ``unmask``) a signed checkpoint
follows the transfer event, so the round's traffic is covered by a signature like its update.

A reply that is an error counts too: when the ClientApp raises, the event records the incoming bytes and
the size of the error reply Flower's runner sends instead (same code and reason format), with
``"error": true``. A message the site never answers (it crashed, or the process was killed) leaves no event.

The fedistill run id travels only in some messages: the query and a plain training message carry it in
their ``config`` record, SecAgg+'s collect stage in its FitIns ``instruction`` JSON; setup, share-keys and
unmask carry none. The mod keeps a small map from Flower's run id to the fedistill run id in the state
directory (:data:`RUN_MAP_FILE`), filled whenever a message carries one: the query comes first every round.

Bookkeeping never fails a message, with one exception: a ledger that cannot be written (a site that cannot
keep its record of what left it must not go on sending). Everything else (measuring, naming the stage, the
run-id map) is logged and recorded as ``null``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType
from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from client.site import Site
from protocols.canonical import atomic_write_json
from protocols.ledger import ledger_in

log = logging.getLogger("fedistill.site")

TRANSFER = "transfer"
RUN_MAP_FILE = "flower_runs.json"
SECAGG_STAGES = {Stage.SETUP: "setup", Stage.SHARE_KEYS: "share-keys",
                 Stage.COLLECT_MASKED_VECTORS: "collect-masked-vectors", Stage.UNMASK: "unmask"}
# The last message a site answers in a round: after it, a signed checkpoint covers the round's transfers.
ROUND_END_STAGES = frozenset({"train", "unmask"})
INSTRUCTION_KEY = "instruction"  # the FitIns config key of the SecAgg+ collect stage (coordinator/secure_round.py)

ModFunction = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
# Set while a traffic mod handles a message: a second one inside it (the mod added twice) passes the message on.
_RECORDING: ContextVar[bool] = ContextVar("fedistill_traffic_recording", default=False)


def wire_bytes(message: Message) -> int:
    """The bytes of ``message`` on Flower's Fleet API: header and object tree, plus every distinct object's content.

    See the module docstring for what is and is not counted.
    """
    header = message_to_proto(remove_content_from_message(message)).ByteSize()
    tree = get_object_tree(message).ByteSize()
    objects = sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    return header + tree + objects


def stage_of(msg: Message) -> str:
    """``query``, ``train``, a SecAgg+ stage, or the message type of anything else."""
    message_type = msg.metadata.message_type
    if message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        return SECAGG_STAGES.get(stage, stage)
    return message_type


def _carried_config(msg: Message) -> dict[str, Any] | None:
    """The fedistill instruction a message carries, if any: plain ``config`` or SecAgg+'s FitIns JSON."""
    records = msg.content.config_records
    if "config" in records and "run-id" in records["config"]:
        return dict(records["config"])
    fit_config = records.get("fitins.config")
    if fit_config is not None and INSTRUCTION_KEY in fit_config:
        return json.loads(str(fit_config[INSTRUCTION_KEY]))
    return None


def _round_of(msg: Message, carried: dict[str, Any] | None) -> int | None:
    group = msg.metadata.group_id
    if group.isdigit():
        return int(group)
    if carried and "server-round" in carried:
        return int(carried["server-round"])
    return None


def fedistill_run_id(state_dir: Path, flower_run_id: int, carried: dict[str, Any] | None) -> str | None:
    """The fedistill run of a Flower run: from the message when it carries one (and remembered), else the map.

    An unreadable map is logged and rewritten from what the next message carries.
    """
    path = Path(state_dir) / RUN_MAP_FILE
    runs: dict[str, str] = {}
    if path.is_file():
        try:
            runs = dict(json.loads(path.read_text())["runs"])
        except (ValueError, KeyError, TypeError):
            log.warning("transfer ledger: %s is unreadable; it is rewritten from the next run id a message carries",
                        path)
    key = str(flower_run_id)
    if carried and carried.get("run-id"):
        run_id = str(carried["run-id"])
        if runs.get(key) != run_id:
            atomic_write_json(path, {"schema_version": 1, "runs": {**runs, key: run_id}})
        return run_id
    return runs.get(key)


def _error_reply(msg: Message, exc: BaseException) -> Message:
    """The reply Flower's ClientApp runner sends when the app raises (flwr/supernode/runtime/run_clientapp.py)."""
    reason = str(type(exc)) + ":<'" + str(exc) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _attempt(what: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, or None when it fails: bookkeeping is logged, never allowed to fail the message."""
    try:
        return compute()
    except Exception:  # noqa: BLE001 - bookkeeping must not fail the message
        log.exception("transfer ledger: could not determine the %s; recorded as null", what)
        return None


def _describe(msg: Message, state_dir: Path) -> dict[str, Any]:
    """Everything about the incoming message the event needs; each part that fails is logged and left null."""
    carried = _attempt("instruction the message carries", lambda: _carried_config(msg))
    return {"run_id": _attempt("fedistill run id", lambda: fedistill_run_id(state_dir, msg.metadata.run_id, carried)),
            "round": _attempt("round", lambda: _round_of(msg, carried)),
            "stage": _attempt("stage", lambda: stage_of(msg)),
            "message_type": msg.metadata.message_type,
            "bytes_in": _attempt("size of the incoming message", lambda: wire_bytes(msg))}


def _record(state_dir: Path, event: dict[str, Any]) -> None:
    """Append the event (and, after a round's last stage, a signed checkpoint) to the site's ledger."""
    site = Site.load(state_dir)
    ledger = ledger_in(site.state_dir, site.name)
    ledger.append(TRANSFER, event)
    if event["stage"] in ROUND_END_STAGES:
        ledger.checkpoint({"run_id": event["run_id"], "round": event["round"]})


def _handle(resolve_state_dir: Callable[[Context], Path], msg: Message, context: Context,
            call_next: Callable[[Message, Context], Message]) -> Message:
    """One message through a traffic mod; a traffic mod nested inside another passes the message on."""
    if _RECORDING.get():
        return call_next(msg, context)
    token = _RECORDING.set(True)
    try:
        return _recorded(resolve_state_dir, msg, context, call_next)
    finally:
        _RECORDING.reset(token)


def _recorded(resolve_state_dir: Callable[[Context], Path], msg: Message, context: Context,
              call_next: Callable[[Message, Context], Message]) -> Message:
    try:
        state_dir = Path(resolve_state_dir(context))
    except Exception:  # without its state directory the site has no ledger to write: the message fails
        log.exception("transfer ledger: cannot resolve the site's state directory")
        raise
    described = _describe(msg, state_dir)
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        error_bytes = _attempt("size of the error reply", lambda: wire_bytes(_error_reply(msg, exc)))
        event = {**described, "bytes_out": error_bytes, "error": True}
        try:
            _record(state_dir, event)
        except Exception:  # noqa: BLE001 - the message fails with its own error, logged with this one
            log.exception("transfer ledger: could not write the transfer event of a failed %s message",
                          described["stage"])
        raise
    event = {**described, "bytes_out": _attempt("size of the reply", lambda: wire_bytes(reply)),
             "error": reply.has_error()}
    try:
        _record(state_dir, event)
    except Exception:
        log.exception("transfer ledger: the site's ledger cannot be written; the %s reply is not sent",
                      described["stage"])
        raise
    return reply


def traffic_mod(resolve_state_dir: Callable[[Context], Path]) -> ModFunction:
    """A ClientApp mod recording, per message, the bytes in and out in the site's ledger (module docstring).

    Put it outermost (first in ``mods``), outside ``secaggplus_mod``: inside it would see the unmasked
    update instead of what leaves. Added twice, only the outer one records.
    """

    def record_traffic(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        # Module-level work only: Ray pickles this closure by value, the module's functions by reference.
        return _handle(resolve_state_dir, msg, context, call_next)

    return record_traffic
