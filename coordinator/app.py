"""The coordinator's Flower ServerApp: send each round's instruction, collect replies, hand them to :class:`Coordinator`."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file

from coordinator.curriculum import adopt_stage, keep_start, stage_state
from coordinator.replies import QueryAnswer, SiteReply, safe_text, screen_query_answers
from coordinator.rounds import Coordinator
from protocols.sampling import check_sample_size, draw, sampling_active
from coordinator.secure_round import run_secure_round
from protocols.canonical import atomic_write_bytes, atomic_write_json
from protocols.config import FederationConfig
from protocols.curriculum import START_STUDENT, stage_of
from protocols.errors import ConfigError, LedgerTampered
from protocols.evaluation import EvaluationRelease, EvaluationRequest
from protocols.governance import PartiesDeclaration
from protocols.knowledge import PROXY_FILE
from protocols.ledger import resumable_run
from protocols.messages import LocalStageRequest, TrainInstruction, ValidationRequest

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


def _reply_of(msg: Message) -> SiteReply:
    """A plain training reply as plain Python; any exception here is that reply's rejection (screened later)."""
    content = msg.content
    metrics = content["metrics"]
    return SiteReply(site=content["site"]["name"],
                     arrays={name: a.numpy() for name, a in content["arrays"].items()},
                     num_examples=metrics["num-examples"], train_loss=metrics["train-loss"],
                     privacy=dict(content["privacy"]), binding=dict(content["binding"]), source=_source(msg))


def _answer_of(msg: Message) -> QueryAnswer:
    content = msg.content
    kind = "refusal" if "refusal" in content else "accept" if "accept" in content else "unknown"
    return QueryAnswer(source=_source(msg), site=content["site"]["name"], kind=kind, binding=dict(content["binding"]),
                       reason=content["refusal"]["reason"] if kind == "refusal" else "")


def _source(msg: Message) -> str:
    return f"node-{msg.metadata.src_node_id}"


def _exchange(grid: Grid, node_ids: list[int], content: RecordDict, message_type: str, server_round: int,
              timeout: float) -> tuple[list[Message], dict[str, str]]:
    """Send one message per node; returns (the replies that are not errors, failures by node)."""
    messages = [Message(RecordDict(dict(content.items())), message_type=message_type, dst_node_id=node_id,
                        group_id=str(server_round)) for node_id in node_ids]
    replies, failures = [], {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failures[_source(reply)] = safe_text(reply.error.reason)
            log.warning("round %d: %s failed: %s", server_round, _source(reply), failures[_source(reply)])
        else:
            replies.append(reply)
    return replies, failures


def _decoded(replies: list[Message], decode: Callable[[Message], Any], server_round: int
             ) -> tuple[list[Any], dict[str, str]]:
    """Decode each reply on its own: one that cannot be read is rejected by its node, the others go on."""
    decoded, rejected = [], {}
    for reply in replies:
        try:
            decoded.append(decode(reply))
        except Exception as err:  # a hostile or broken reply of any shape must not end the round
            rejected[_source(reply)] = safe_text(f"round {server_round}: the reply could not be read "
                                                 f"({type(err).__name__}: {err})")
            log.warning("round %d: rejected the reply of %s: %s", server_round, _source(reply),
                        rejected[_source(reply)])
    return decoded, rejected


def run_rounds(grid: Grid, context: Context, coordinator: Coordinator, min_nodes: int,
               timeout: float = 600.0) -> None:
    """Each round: ask every site whether it will train (its budget decides), then train those that accept.

    With secure aggregation (the default) the training goes through Flower's SecAgg+; otherwise each
    site's update arrives on its own and is screened before the average. The run ends with a signed
    run-finished event.
    """
    fewest = coordinator.config.fewest_sites_per_round
    if coordinator.config.secure_aggregation and min_nodes < coordinator.config.min_cohort:
        raise ConfigError(f"secure aggregation needs at least min_cohort={coordinator.config.min_cohort} sites per "
                          f"round, but the federation has {min_nodes}; add sites or lower min_cohort.")
    for server_round in range(coordinator.completed_round + 1, coordinator.config.rounds + 1):
        started = time.perf_counter()
        connected = wait_for_nodes(grid, min_nodes, timeout)
        check_sample_size(coordinator.config, len(connected))
        node_ids, not_asked = draw(connected, coordinator.config, server_round)
        if sampling_active(coordinator.config):
            coordinator.note_sampling(server_round, connected, not_asked)
        instruction = coordinator.instruction(server_round)
        config = ConfigRecord(instruction.to_config())
        answers, failures = _exchange(grid, node_ids, RecordDict({"config": config}), MessageType.QUERY,
                                      server_round, timeout)
        answers, unreadable = _decoded(answers, _answer_of, server_round)
        accepted, refusals, rejected = screen_query_answers(answers, instruction)
        coordinator.learn_sites(accepted)
        rejected |= unreadable
        if len(accepted) < fewest:
            coordinator.stop(server_round, refusals, failures, started, rejected)
            log.warning("round %d: only %d site(s) accepted, %d needed; the run ends here", server_round,
                        len(accepted), fewest)
            break
        nodes = sorted(int(source.removeprefix("node-")) for source in accepted)
        if coordinator.config.secure_aggregation:
            node_sites = {int(source.removeprefix("node-")): site for source, site in accepted.items()}
            outcome = run_secure_round(grid, context, nodes, node_sites, instruction, coordinator.state,
                                       coordinator.config,
                                       [tuple(a.shape) for a in coordinator.secure_payload(instruction).values()],
                                       coordinator.reported_ledger_seqs, timeout)
            coordinator.complete_secure_round(server_round, outcome.vectors, outcome.participants, outcome.privacy,
                                              failures | outcome.failures, refusals, started,
                                              rejected | outcome.rejected, outcome.halted)
        else:
            _plain_round(grid, coordinator, server_round, instruction, nodes, accepted, failures, refusals, rejected,
                         started, timeout)
        if coordinator.keeps_best:
            run_validation(grid, coordinator, server_round, min_nodes, timeout)
        if server_round != coordinator.config.rounds:
            run_site_evaluation(grid, coordinator, coordinator.evaluation_request(server_round), min_nodes, timeout)
    coordinator.keep_best_round()
    # The schedule's last slot is the student the run ends with: the last round's, a stopped run's, or the kept one.
    run_site_evaluation(grid, coordinator, coordinator.evaluation_request(), min_nodes, timeout)
    request = coordinator.site_local_request()
    if request is not None:
        run_site_local_stage(grid, coordinator, request, min_nodes, timeout)
    coordinator.finish()


def _plain_round(grid: Grid, coordinator: Coordinator, server_round: int, instruction: TrainInstruction,
                 nodes: list[int], accepted: dict[str, str], failures: dict[str, str], refusals: dict[str, str],
                 rejected: dict[str, str], started: float, timeout: float) -> None:
    """Each accepting site's update arrives on its own and is screened before the average."""
    config = ConfigRecord(instruction.to_config())
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in coordinator.state.items()})
    trained, train_failures = _exchange(grid, nodes, RecordDict({"arrays": arrays, "config": config}),
                                        MessageType.TRAIN, server_round, timeout)
    late_answers, trained = _split_refusals(trained)
    late_answers, late_unreadable = _decoded(late_answers, _answer_of, server_round)
    _, late_refusals, late_rejected = screen_query_answers(late_answers, instruction)
    replies, unreadable = _decoded(trained, _reply_of, server_round)
    coordinator.complete_round(server_round, replies, failures | train_failures, started,
                               refusals | late_refusals, rejected | late_unreadable | late_rejected | unreadable,
                               expected_sites=accepted)


VALIDATION_KEYS = frozenset({"released", "roc_auc", "n"})


def _validation_report_of(msg: Message, request: ValidationRequest) -> tuple[str, dict[str, Any]]:
    """A site's validation answer: bound to the request, and a released score that is a number in [0, 1]."""
    content = msg.content
    if dict(content["binding"]) != request.binding():
        raise ValueError("the reply does not echo the validation request's run id, round and nonce")
    report = json.loads(str(content["validation"]["report"]))
    if not isinstance(report, dict) or not set(report) <= VALIDATION_KEYS or not isinstance(report.get("released"),
                                                                                           bool):
        raise ValueError("the validation report holds something other than 'released', 'roc_auc' and 'n'")
    if report["released"]:
        roc, n = report.get("roc_auc"), report.get("n")
        if not (roc is None or (isinstance(roc, float) and math.isfinite(roc) and 0.0 <= roc <= 1.0)):
            raise ValueError(f"the released ROC-AUC {roc!r} is not a number in [0, 1]")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 10**9:
            raise ValueError(f"the released validation count {n!r} is not a count")
    return str(content["site"]["name"]), report


def run_validation(grid: Grid, coordinator: Coordinator, server_round: int, min_nodes: int, timeout: float) -> None:
    """A run that keeps its best round: every site scores the round's student on its validation split."""
    for request, state in coordinator.validation_requests(server_round):
        node_ids = coordinator.took_part(wait_for_nodes(grid, min_nodes, timeout))
        arrays = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in state.items()})
        replies, failures = _exchange(grid, node_ids, RecordDict({"arrays": arrays,
                                                                  "config": ConfigRecord(request.to_config())}),
                                      MessageType.EVALUATE, server_round, timeout)
        reports, rejected = _one_report_per_site(
            replies, lambda reply: _validation_report_of(reply, request), server_round, "validation")
        coordinator.record_validation(request, state, reports, failures, rejected)


def _evaluation_release_of(msg: Message, request: EvaluationRequest) -> tuple[str, EvaluationRelease]:
    """A site's test evaluation: bound to the request, and a release of the request's histogram shape."""
    content = msg.content
    if dict(content["binding"]) != request.binding():
        raise ValueError("the reply does not echo the evaluation request's run id, round and nonce")
    return (str(content["site"]["name"]),
            EvaluationRelease.from_dict(json.loads(str(content["evaluation"]["release"])), request))


def run_site_evaluation(grid: Grid, coordinator: Coordinator, request: EvaluationRequest | None, min_nodes: int,
                        timeout: float) -> None:
    """Every site evaluates the current student on its test split; what each released is signed, with the pooled
    metrics. A site that fails or answers badly is named; the run goes on without its figures."""
    if request is None:
        return
    node_ids = coordinator.took_part(wait_for_nodes(grid, min_nodes, timeout))
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in coordinator.state.items()})
    replies, failures = _exchange(grid, node_ids, RecordDict({"arrays": arrays,
                                                              "config": ConfigRecord(request.to_config())}),
                                  MessageType.EVALUATE, request.round, timeout)
    releases, rejected = _one_report_per_site(replies, lambda reply: _evaluation_release_of(reply, request),
                                              request.round, "evaluation", coordinator)
    coordinator.record_site_evaluation(request, releases, failures, rejected)


LOCAL_METRIC_KEYS = frozenset({"threshold", "roc_auc", "accuracy", "macro_f1", "kappa", "n"})


def _local_report_of(msg: Message, request: LocalStageRequest) -> tuple[str, dict[str, Any]]:
    """A site's site-local answer: bound to the request, and released metrics that are only numbers."""
    content = msg.content
    if dict(content["binding"]) != request.binding():
        raise ValueError("the reply does not echo the site-local request's run id and nonce")
    site, released = str(content["site"]["name"]), content["local"]["released"]
    if not isinstance(released, bool):
        raise ValueError("'released' is not true or false")
    if not released:
        return site, {"released": False}
    metrics = json.loads(str(content["local"]["metrics"]))
    if not isinstance(metrics, dict) or set(metrics) != {"federated_student", "local_student"}:
        raise ValueError("the released metrics must be those of the federated and the local student")
    for model, values in metrics.items():
        if not isinstance(values, dict) or not set(values) <= LOCAL_METRIC_KEYS or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              and -1.0 <= v <= 1e9) for v in values.values()):
            raise ValueError(f"the {model} metrics hold something other than the known finite metrics")
    return site, {"released": True, **metrics}


def run_site_local_stage(grid: Grid, coordinator: Coordinator, request: LocalStageRequest, min_nodes: int,
                         timeout: float) -> None:
    """Every site fine-tunes its own copy of the final student; what each released is signed into the ledger."""
    group = request.final_round + 1
    node_ids = coordinator.took_part(wait_for_nodes(grid, min_nodes, timeout))
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in coordinator.state.items()})
    replies, failures = _exchange(grid, node_ids, RecordDict({"arrays": arrays,
                                                              "config": ConfigRecord(request.to_config())}),
                                  MessageType.EVALUATE, group, timeout)
    reports, rejected = _one_report_per_site(replies, lambda reply: _local_report_of(reply, request), group,
                                             "site-local")
    coordinator.record_site_local(request, reports, failures, rejected)


def _one_report_per_site(replies: list[Message], decode: Callable[[Message], tuple[str, dict[str, Any]]], group: int,
                         what: str, coordinator: Coordinator | None = None
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(each site's screened report, rejections by node): an unreadable reply or a second answer from the same
    site is rejected by name; the others stand. With ``coordinator``, it learns which node each site answered
    from."""
    decoded, rejected = _decoded(replies, lambda reply: (_source(reply), decode(reply)), group)
    reports: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for source, (site, report) in decoded:
        if site in reports:
            rejected[source] = f"site {safe_text(site)} answered the {what} request twice"
            continue
        reports[site], sources[source] = report, site
    if coordinator is not None:
        coordinator.learn_sites(sources)
    return reports, rejected


def _split_refusals(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """(late refusals, training replies): a site may still refuse when the training message arrives."""
    def is_refusal(reply: Message) -> bool:
        try:
            return "refusal" in reply.content
        except Exception:  # unreadable content: the training decoder rejects it by name
            return False

    return [r for r in replies if is_refusal(r)], [r for r in replies if not is_refusal(r)]


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
    in the same run directory, with the same ledger and the same sites' budgets. ``coordinator-stage`` is the folder
    of the curriculum's coordinator stage, which ``fedistill run`` ran before submitting.
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
    record, state = _coordinator_stage(str(run_config.get("coordinator-stage", "")), config, run_id, run_dir, resume)
    if config.continues is not None:
        state = _start_student(str(run_config.get("start-student", "")), run_dir, resume)
    proxy = _proxy_set(str(run_config.get("proxy-set", "")), config, run_dir, resume)
    # run.toml's parties.toml, as `fedistill run` parsed it: checked again here, then recorded in the run ledger.
    declared = json.loads(str(run_config.get("parties") or "null"))
    parties = None if declared is None else PartiesDeclaration.from_dict(
        declared["content"], "run config 'parties'", declared.get("source_sha256"))
    coordinator = Coordinator(config, run_id, run_dir, signing_key=Path(signing_key) if signing_key else None,
                              transport=transport, coordinator_stage=record, initial_state=state, proxy_path=proxy,
                              parties=parties)
    if resume:
        coordinator.resume()
    else:
        atomic_write_json(run_dir / "config.json", {
            "schema_version": 1, "run_id": run_id, "deployment": {"flower_run_id": context.run_id,
                                                                  "wait_for_sites": int(run_config["min-sites"])},
            "federation": config.to_dict(), "config_hash": config.config_hash()})
    return coordinator, int(run_config["min-sites"])


def _coordinator_stage(directory: str, config: FederationConfig, run_id: str, run_dir: Path, resume: str
                       ) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """(record, student) of the curriculum's coordinator stage, or (None, None) when it has none.

    A new run copies the stage's student into its run directory (where ``fedistill verify`` hashes it); a resumed run
    starts from that copy again, with the record its signed run-started event holds (Coordinator.resume then keeps a
    later round's checkpoint, if there is one). The Coordinator refuses a student whose digest is not the record's.
    """
    if stage_of(config.curriculum, "coordinator") is None:
        if directory:
            raise ConfigError(f"run config key 'coordinator-stage' names {directory}, but the curriculum has no "
                              "coordinator stage; launch runs with `fedistill run run.toml`.")
        return None, None
    if resume:
        events = resumable_run(run_dir / "ledger.jsonl", run_id, config.config_hash())
        started = next(e["payload"] for e in events if e["kind"] == "run-started")
        if "coordinator_stage" not in started:
            raise LedgerTampered(f"cannot resume run {run_id}: its config names a coordinator stage, but the signed "
                                 "run-started event records none.")
        return started["coordinator_stage"], stage_state(run_dir, config)
    if not directory:
        raise ConfigError("run config: the curriculum names a coordinator stage, but key 'coordinator-stage' is empty; "
                          "launch the run with `fedistill run run.toml` and its [coordinator_stage] table, which runs "
                          "the stage before submitting.")
    return adopt_stage(Path(directory), run_dir, config)


def _proxy_set(named: str, config: FederationConfig, run_dir: Path, resume: str) -> Path | None:
    """A knowledge run's proxy set: a new run keeps a copy of run.toml's file in its run directory (where
    ``fedistill verify`` checks its digest); a resumed run uses that copy. The Coordinator checks the digest."""
    if config.knowledge is None:
        return None
    kept = run_dir / PROXY_FILE
    if resume:
        if not kept.is_file():
            raise LedgerTampered(f"cannot resume run {run_dir.name}: {kept} is missing (missing evidence); the run is a "
                                 "knowledge run and kept its proxy set there.")
        return kept
    if not named:
        raise ConfigError("run config: the federation is a knowledge run, but key 'proxy-set' is empty; launch the "
                          "run with `fedistill run run.toml` and its proxy_set field.")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(kept, Path(named).read_bytes())
    return kept


def _start_student(student_file: str, run_dir: Path, resume: str) -> dict[str, np.ndarray]:
    """A continuing run's starting student: ``fedistill run --from`` names the earlier run's student file, which a
    new run keeps in its run directory; a resumed run starts from that copy again. The Coordinator refuses one whose
    digest is not the one the config's ``continues`` names."""
    if resume:
        kept = run_dir / START_STUDENT
        if not kept.is_file():
            raise LedgerTampered(f"cannot resume run {run_dir.name}: {kept} is missing (missing evidence); the run "
                                 "continues an earlier run and kept its starting student there.")
        return load_file(str(kept))
    if not student_file:
        raise ConfigError("run config: the federation continues an earlier run, but key 'start-student' is empty; "
                          "launch the run with `fedistill run run.toml --from RUN_DIR`.")
    return keep_start(run_dir, Path(student_file))


app = build_server_app(coordinator_from_run_config)
