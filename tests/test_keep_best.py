"""Keeping the best round: sites score each round's student on their validation split, under their policy, and the
coordinator keeps the round with the best pooled score; verify recomputes the choice from the signed reports."""

import json
import time

import pytest
from safetensors.numpy import load_file

from client.validation import validate_student
from compliance.verify import AuditReport, _verify_rounds
from coordinator.app import _validation_report_of
from coordinator.rounds import Coordinator, best_validated_round
from protocols.accounting import SitePolicy
from protocols.canonical import atomic_write_json, canonical_json, digest_arrays
from protocols.errors import ConfigError, LedgerTampered, UpdateRejected
from protocols.ledger import ledger_in, load_signing_key, read_events
from protocols.messages import ValidationRequest
from tests.helpers import federation, make_site, plain_reply
from tests.test_verify import _resign

KEEP_BEST = [{"where": "federated", "keep_best": True}]


def test_the_best_round_is_the_best_score_and_the_earliest_on_a_tie():
    assert best_validated_round({0: 0.6, 1: 0.7, 2: None, 3: 0.7}) == 1
    assert best_validated_round({0: None, 1: None}) is None
    assert best_validated_round({}) is None


def _coordinator(tmp_path) -> Coordinator:
    config = federation(secure_aggregation=False, curriculum=KEEP_BEST, rounds=2)
    coordinator = Coordinator(config, "run", tmp_path / "run")
    atomic_write_json(tmp_path / "run" / "config.json", {"schema_version": 1, "run_id": "run",
                                                          "federation": config.to_dict(),
                                                          "config_hash": config.config_hash()})
    return coordinator


def _round(coordinator: Coordinator, server_round: int, shift: float) -> None:
    arrays = {name: value + shift for name, value in coordinator.state.items()}
    coordinator.complete_round(server_round, [plain_reply(coordinator, server_round, "site-a", arrays,
                                                          ledger_seq=server_round)], {}, time.perf_counter())


def _validate(coordinator: Coordinator, server_round: int, scores: dict[int, float]) -> None:
    for request, state in coordinator.validation_requests(server_round):
        coordinator.record_validation(request, state, {"site-a": {"released": True, "roc_auc": scores[request.round],
                                                                  "n": 40},
                                                       "site-b": {"released": False}}, {}, {})


def test_the_coordinator_keeps_the_best_round_and_verify_recomputes_it(tmp_path):
    coordinator = _coordinator(tmp_path)
    start = digest_arrays(coordinator.state)
    scores = {0: 0.61, 1: 0.74, 2: 0.70}
    _round(coordinator, 1, 0.01)
    round_one = digest_arrays(coordinator.state)
    _validate(coordinator, 1, scores)
    _round(coordinator, 2, 0.5)
    _validate(coordinator, 2, scores)
    assert coordinator.validation_scores == scores
    assert coordinator.keep_best_round() == 1
    finished = coordinator.finish()["payload"]
    assert finished["kept_round"] == 1 and finished["final_round"] == 2
    assert finished["student_digest"] == round_one != start
    assert digest_arrays(load_file(str(tmp_path / "run" / "student" / "model.safetensors"))) == round_one
    validations = [e["payload"] for e in read_events(tmp_path / "run" / "ledger.jsonl") if e["kind"] == "validation"]
    assert [v["round"] for v in validations] == [0, 1, 2] and validations[0]["student_digest"] == start
    # Only what the sites released is pooled; a site that withheld its score is recorded as such.
    assert validations[1]["sites"]["site-b"] == {"released": False} and validations[1]["score"] == 0.74
    report = AuditReport(str(tmp_path / "run"), "")
    # The rounds' part of verify (the full walk also wants the sites' ledgers, which this run has none of).
    assert _verify_rounds(tmp_path / "run", read_events(tmp_path / "run" / "ledger.jsonl"), report) == round_one
    assert any(check.startswith("keep-best: round 1") for check in report.checks)

    # The coordinator re-signs its own ledger claiming another round was best: the scores contradict it.
    ledger = tmp_path / "run" / "ledger.jsonl"
    events = read_events(ledger)
    for event in events:
        if event["kind"] == "validation" and event["payload"]["round"] == 2:
            event["payload"]["score"] = 0.9
    ledger.write_text("".join(canonical_json(e) + "\n" for e in events))
    _resign(ledger, load_signing_key(tmp_path / "run" / "ledger_key.pem"))
    with pytest.raises(LedgerTampered, match="does not recompute"):
        _verify_rounds(tmp_path / "run", read_events(ledger), report)


def test_with_no_released_score_the_last_round_is_kept(tmp_path):
    coordinator = _coordinator(tmp_path)
    _round(coordinator, 1, 0.01)
    for request, state in coordinator.validation_requests(1):
        coordinator.record_validation(request, state, {"site-a": {"released": False}}, {}, {})
    assert coordinator.keep_best_round() == 1 and coordinator.validation_scores == {0: None, 1: None}


def test_a_site_scores_only_runs_it_accepted_each_round_once_and_withholds_by_default(tmp_path):
    site = make_site(tmp_path / "site")
    config = federation(curriculum=KEEP_BEST)
    coordinator = Coordinator(config, "run", tmp_path / "run")
    request = ValidationRequest("run", config.config_hash(), config.student, 1, digest_arrays(coordinator.state), "n1")
    with pytest.raises(UpdateRejected, match="never accepted"):
        validate_student(site, request, coordinator.state)
    ledger_in(site.state_dir, site.name).append("run-accepted", {"run_id": "run", "config_hash": config.config_hash()})
    with pytest.raises(UpdateRejected, match="does not hash"):
        validate_student(site, request, {k: v + 1 for k, v in coordinator.state.items()})
    assert validate_student(site, request, coordinator.state) == {"released": False}
    with pytest.raises(UpdateRejected, match="answers each round once"):
        validate_student(site, request, coordinator.state)
    SitePolicy(release_validation_metrics=True).save(site.state_dir)
    released = validate_student(site, ValidationRequest(*[*request.__dict__.values()][:3], 2,
                                                        request.student_digest, "n2"), coordinator.state)
    assert released["released"] and 0.0 <= released["roc_auc"] <= 1.0 and released["n"] > 0
    recorded = [e["payload"] for e in read_events(site.state_dir / "ledger.jsonl") if e["kind"] == "validation"]
    assert [(r["round"], r["released"]) for r in recorded] == [(1, False), (2, True)]


class _Reply:
    def __init__(self, content):
        self.content = content


@pytest.mark.parametrize("report, message", [
    ({"released": True, "roc_auc": 1.5, "n": 3}, "not a number in"),
    ({"released": True, "roc_auc": 0.5, "n": -1}, "not a count"),
    ({"released": True, "roc_auc": 0.5, "n": 3, "labels": [1, 0]}, "something other"),
    ({"released": "yes"}, "something other"),
])
def test_a_hostile_validation_report_is_rejected_by_name(report, message):
    request = ValidationRequest("run", "h", federation().student, 1, "d", "nonce")
    content = {"binding": request.binding(), "site": {"name": "site-a"}, "validation": {"report": json.dumps(report)}}
    with pytest.raises(ValueError, match=message):
        _validation_report_of(_Reply(content), request)
    with pytest.raises(ValueError, match="does not echo"):
        _validation_report_of(_Reply(content | {"binding": {"run-id": "run", "round": 1, "nonce": "x"}}), request)


def test_keep_best_is_refused_for_a_causal_lm_and_must_be_a_boolean():
    with pytest.raises(ConfigError, match="keep_best"):
        federation(curriculum=[{"where": "federated", "keep_best": "yes"}])
