"""The site's transfer ledger: every message in and every reply out, sized as Flower's Fleet API carries them."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from client.site import Site
from compliance import render
from compliance.report import LedgerFile, RunEvidence, SiteFiles, _data_flows
from client.traffic import RUN_MAP_FILE, TRANSFER, traffic_mod, wire_bytes
from coordinator.rounds import Coordinator
from protocols.errors import LedgerTampered
from protocols.ledger import ledger_in, read_events, verify_ledger
from simulations.engine import run_federation
from tests.helpers import federation, make_site
from tests.test_secure_aggregation import three_sites

SECAGG_STAGES = ["setup", "share-keys", "collect-masked-vectors", "unmask"]


def fleet_bytes(message: Message) -> int:
    """What the SuperNode pushes or pulls for ``message``, rebuilt from the Fleet API's own request messages.

    The header and the object tree as ``PushMessagesRequest`` carries them, then one ``PushObjectRequest``
    content per distinct object id of the tree (identical chunks travel once). Each content must hash to its
    object id, and the message is rebuilt from the contents alone: the count is a complete wire form.
    """
    objects: dict[str, object] = {}

    def walk(obj) -> None:
        for child in (obj.children or {}).values():
            walk(child)
        objects[obj.object_id] = obj

    walk(message)
    tree = get_object_tree(message)
    request = PushMessagesRequest(messages_list=[message_to_proto(remove_content_from_message(message))],
                                  message_object_trees=[tree])
    contents = {node.object_id: PushObjectRequest(object_id=node.object_id,
                                                  object_content=objects[node.object_id].deflate()).object_content
                for node in iterate_object_tree(tree)}
    assert all(hashlib.sha256(content).hexdigest() == object_id for object_id, content in contents.items())
    rebuilt = inflate_object_from_contents(tree.object_id, dict(contents))
    assert isinstance(rebuilt, Message) and rebuilt.has_content() == message.has_content()
    if message.has_content():
        assert rebuilt.content.object_id == message.content.object_id
    return (request.messages_list[0].ByteSize() + request.message_object_trees[0].ByteSize()
            + sum(len(content) for content in contents.values()))


def counting_mod(log_path: Path):
    """An outer mod (outside traffic_mod) that counts the same messages with :func:`fleet_bytes`."""

    def count(msg: Message, context: Context, call_next) -> Message:
        bytes_in = fleet_bytes(msg)
        reply = call_next(msg, context)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"partition": int(context.node_config["partition-id"]),
                                     "round": int(msg.metadata.group_id), "message_type": msg.metadata.message_type,
                                     "bytes_in": bytes_in, "bytes_out": fleet_bytes(reply)}) + "\n")
        return reply

    return count


def test_every_secagg_stage_is_on_the_site_ledger_with_the_bytes_on_the_wire(tmp_path):
    state_dirs = three_sites(tmp_path / "sites")
    resolve_dirs = tuple(str(p.resolve()) for p in state_dirs)

    def resolve(context: Context) -> Path:
        return Path(resolve_dirs[int(context.node_config["partition-id"])])

    counted = tmp_path / "counted.jsonl"
    config = federation(rounds=2, local_steps=2, batch_size=16)
    coordinator = run_federation(state_dirs, lambda: Coordinator(config, "run-secagg", tmp_path / "run"),
                                 client_mods=[counting_mod(counted), traffic_mod(resolve)])
    assert [r["status"] for r in coordinator.records] == ["aggregated", "aggregated"]

    independent: dict[tuple[str, int], list[tuple[str, int, int]]] = defaultdict(list)
    for line in counted.read_text().splitlines():
        entry = json.loads(line)
        site = Site.load(state_dirs[entry["partition"]]).name
        independent[site, entry["round"]].append((entry["message_type"], entry["bytes_in"], entry["bytes_out"]))

    for state_dir in state_dirs:
        site = Site.load(state_dir)
        verify_ledger(state_dir / "ledger.jsonl", (state_dir / "ledger_key.pub.pem").read_text(), site.name)
        events = read_events(state_dir / "ledger.jsonl")
        transfers = [e["payload"] for e in events if e["kind"] == TRANSFER]
        sent = {e["payload"]["round"]: e["payload"]["bytes"] for e in events if e["kind"] == "update-sent"}
        for server_round in (1, 2):
            this_round = [t for t in transfers if t["round"] == server_round]
            # After the last round the sites evaluate the final student (protocols/evaluation.py).
            assert [t["stage"] for t in this_round] == ["query", *SECAGG_STAGES] + (["evaluate"] if server_round == 2
                                                                                    else [])
            assert {t["run_id"] for t in this_round} == {"run-secagg"}
            assert not any(t["error"] for t in this_round)
            # The ledger's numbers are those of the outer count, message by message, in order.
            assert [(t["message_type"], t["bytes_in"], t["bytes_out"]) for t in this_round] == \
                independent[site.name, server_round]
            by_stage = {t["stage"]: t for t in this_round}
            # What leaves in the collect stage is the masked payload plus framing; the update-sent event
            # counts only the payload vectors.
            assert by_stage["collect-masked-vectors"]["bytes_out"] > sent[server_round]
            # Key material: the setup reply carries two public keys, the share-keys reply the encrypted shares.
            assert by_stage["setup"]["bytes_out"] > 64 and by_stage["share-keys"]["bytes_out"] > 200
        assert json.loads((state_dir / RUN_MAP_FILE).read_text())["runs"]

    # Section 4 of the report: per site, round and stage, the ledger's numbers, with totals beside the payload.
    evidence = run_evidence(tmp_path, state_dirs, rounds=2)
    flows = _data_flows(evidence)
    for state_dir in state_dirs:
        site = Site.load(state_dir)
        wire = flows["sites"][site.name]["wire"]
        events = read_events(state_dir / "ledger.jsonl")
        transfers = [e["payload"] for e in events if e["kind"] == TRANSFER]
        assert [(c["round"], c["stage"], c["bytes_in"], c["bytes_out"]) for c in wire["per_round_stage"]] == [
            (t["round"], t["stage"], t["bytes_in"], t["bytes_out"]) for t in transfers]
        assert wire["total_bytes_in"] == sum(t["bytes_in"] for t in transfers)
        assert wire["total_bytes_out"] == sum(t["bytes_out"] for t in transfers)
        assert wire["total_payload_bytes"] == flows["sites"][site.name]["total_bytes"] < wire["total_bytes_out"]
        assert [row["stage"] for row in wire["per_stage"]] == ["query", *SECAGG_STAGES, "evaluate"]
        assert flows["wire_bytes_per_round"]["out"][site.name] == [
            sum(t["bytes_out"] for t in transfers if t["round"] == r) for r in (1, 2)]
    html = render._data_flows(flows, {})
    assert "Bytes on the wire per round, by site: sent" in html and "collect-masked-vectors out" in html
    assert f"{wire['total_bytes_out']:,} out" in html


def run_evidence(run_dir: Path, state_dirs: list[Path], rounds: int) -> RunEvidence:
    """Just what section 4 reads: the config's run id and rounds, and each site's ledger."""
    sites = {}
    for state_dir in state_dirs:
        name = Site.load(state_dir).name
        events = tuple(read_events(state_dir / "ledger.jsonl"))
        sites[name] = SiteFiles(name, state_dir, LedgerFile(name, state_dir / "ledger.jsonl", None, events, None),
                                None, None)
    config = {"run_id": "run-secagg", "federation": {"rounds": rounds, "secure_aggregation": True}}
    return RunEvidence(run_dir, config, None, [], None, sites, {})


def test_a_site_ledger_without_transfer_events_shows_not_recorded(tmp_path):
    site = make_site(tmp_path)
    # An older run's ledger: the update is described, its traffic is not.
    ledger_in(site.state_dir, site.name).append("update-sent", {
        "run_id": "run-secagg", "round": 1, "payload_kind": "plain fragment update", "bytes": 96, "digest": "0" * 64,
        "tensors": [{"name": "w", "shape": [24], "dtype": "float32"}]})
    evidence = run_evidence(tmp_path, [site.state_dir], rounds=1)
    flows = _data_flows(evidence)
    assert flows["sites"][site.name]["wire"].startswith("not recorded")
    assert flows["sites"][site.name]["total_bytes"] == 96 and flows["wire_bytes_per_round"] == {"in": {}, "out": {}}
    html = render._data_flows(flows, {})
    assert "Bytes on the wire: not recorded" in html and "on the wire per round" not in html


def incoming(message_type: str, content: RecordDict, flower_run: int = 7, group: str = "1") -> Message:
    metadata = Metadata(run_id=flower_run, message_id="m-1", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                        group_id=group, created_at=time.time(), ttl=3600.0, message_type=message_type)
    return make_message(metadata, content)


def secagg_stage(stage: str, flower_run: int = 7) -> Message:
    return incoming(MessageType.TRAIN, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})}), flower_run)


def query(run_id: str = "run-1", flower_run: int = 7) -> Message:
    return incoming(MessageType.QUERY, RecordDict({"config": ConfigRecord({"run-id": run_id, "server-round": 1})}),
                    flower_run)


def accept(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"accept": ConfigRecord({"round": 1})}), reply_to=msg)


def transfers(site) -> list[dict]:
    return [e["payload"] for e in read_events(site.state_dir / "ledger.jsonl") if e["kind"] == TRANSFER]


def test_stages_without_a_run_id_take_it_from_the_query_of_the_same_flower_run(tmp_path):
    site = make_site(tmp_path)
    mod = traffic_mod(lambda context: site.state_dir)
    context = Context(run_id=7, node_id=2, node_config={}, state=RecordDict(), run_config={})
    first, setup, other_run = query(), secagg_stage(Stage.SETUP), secagg_stage(Stage.SETUP, flower_run=8)
    # Added twice (e.g. by the app and by a test), the mod records each message once.
    replies = [mod(m, context, lambda msg, ctx: mod(msg, ctx, accept)) for m in (first, setup, other_run)]
    events = transfers(site)
    assert [(e["stage"], e["run_id"], e["round"]) for e in events] == [
        ("query", "run-1", 1), ("setup", "run-1", 1), ("setup", None, 1)]
    assert [e["bytes_in"] for e in events] == [wire_bytes(m) for m in (first, setup, other_run)]
    assert [e["bytes_out"] for e in events] == [wire_bytes(r) for r in replies]
    # Sizes only: nothing of the content reaches the ledger.
    assert "accept" not in (site.state_dir / "ledger.jsonl").read_text()


def test_a_failing_message_still_records_its_incoming_bytes_and_the_error_reply(tmp_path):
    site = make_site(tmp_path)
    mod = traffic_mod(lambda context: site.state_dir)
    context = Context(run_id=7, node_id=2, node_config={}, state=RecordDict(), run_config={})

    def crash(msg: Message, context: Context) -> Message:
        raise RuntimeError("training failed")

    msg = secagg_stage(Stage.COLLECT_MASKED_VECTORS)
    with pytest.raises(RuntimeError, match="training failed"):
        mod(msg, context, crash)
    [event] = transfers(site)
    assert event["stage"] == "collect-masked-vectors" and event["error"] is True
    assert event["bytes_in"] == wire_bytes(msg) and event["bytes_out"] > 0


def test_bookkeeping_errors_do_not_fail_the_message_but_an_unwritable_ledger_does(tmp_path):
    site = make_site(tmp_path)
    mod = traffic_mod(lambda context: site.state_dir)
    context = Context(run_id=7, node_id=2, node_config={}, state=RecordDict(), run_config={})
    (site.state_dir / RUN_MAP_FILE).write_text("not json")
    mod(query(), context, accept)
    assert json.loads((site.state_dir / RUN_MAP_FILE).read_text())["runs"] == {"7": "run-1"}
    broken = incoming(MessageType.TRAIN, RecordDict({"fitins.config": ConfigRecord({"instruction": "{not json"})}),
                      group="")
    assert mod(broken, context, accept).content["accept"]["round"] == 1
    event = transfers(site)[-1]
    # The run id still comes from the map; the round (neither in the group id nor in the message) is null.
    assert event["run_id"] == "run-1" and event["round"] is None and event["stage"] == "train"
    assert event["bytes_in"] == wire_bytes(broken)

    (site.state_dir / "ledger.jsonl").write_text("torn line")
    with pytest.raises(LedgerTampered):
        mod(query(), context, accept)
