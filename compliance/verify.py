"""Independent verification of a run directory: every check an auditor can make without trusting anyone.

``fedistill verify RUN_DIR`` walks, in this order, and stops at the first failure with an error that
names the file and what failed:

1. the run configuration: ``config.json``'s ``config_hash`` is the hash of its ``federation`` section;
2. the coordinator's ledger: chain, hashes and every checkpoint signature (``ledger_key.pub.pem``); its
   run-started event names the same config hash; a curriculum's coordinator stage is recorded there with the
   config's settings, no site record read and epsilon 0, and ``stages/coordinator/`` hashes to its digest; a run
   that continues an earlier one (``--from``) started from ``stages/start/``, which hashes to the final student
   the config names, and the earlier run's ledger, when it is beside this run, still holds the recorded head; a
   parties declaration (``parties-declared``) is recorded once, before the first signed checkpoint, parses as a
   parties.toml and its digest recomputes from its content;
3. every site's ledger (``sites/<site>/``): chain and signatures with the site's own public key;
4. cross-signatures: every site head a coordinator checkpoint recorded is in that site's ledger;
5. the sites anchor the coordinator: every site pinned the fingerprint of the coordinator's key in its
   run-accepted event, and it is the key of ``ledger_key.pub.pem``; every coordinator checkpoint a site recorded
   (``coordinator_anchor``) is in the coordinator's ledger with that hash and a signature by the pinned key; and
   the coordinator's ledger records every round in which a site recorded an update. A ledger cut back at a line
   boundary or rewritten and re-signed with another key fails here;
6. rounds: ``metrics.jsonl`` holds exactly the rounds the ledger records, each as recorded; the signed
   ``run-finished`` event names the last round, the rounds and the final student's digest; and ``student/``
   hashes to that digest. A run without ``run-finished`` (still running, or crashed) verifies as *incomplete*; a
   site-local stage's metrics, as the coordinator signed them, are what each site's own ledger released, and each
   site's kept copy hashes to the digest its ledger records;
7. every site's privacy: the calibration in its ``privacy.json`` is the one its ledger recorded when it accepted
   the run; the DP parameters its ledger recorded for each update it sent are the spends in ``privacy.json``;
   its epsilon is replayed from them with Google's dp-accounting (PLD) and must match the epsilon the site
   recorded (Opacus PRV) within 2 %, and every update it sent names the run's config hash;
8. a report found in the run (``report/report.json``) is signed by the coordinator's key, its report_id
   recomputes, and every file it rests on still has the SHA-256 it states.

Missing evidence (a ledger, a key, a site directory, the student) is a failure, never a pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from compliance.report_signature import verify_report
from protocols.accounting import PrivacyState, Spend, pld_epsilon
from protocols.canonical import digest_arrays, digest_json, file_sha256
from protocols.curriculum import START_STUDENT
from protocols.errors import ConfigError, LedgerTampered
from protocols.evaluation import TEST_EVALUATION_EVENT
from protocols.governance import PARTIES_EVENT, PartiesDeclaration
from protocols.knowledge import PROXY_FILE
from protocols.ledger import key_fingerprint, read_events, signed_up_to, verify_ledger, verify_signature

EPSILON_TOLERANCE = 0.02


VERIFIED, INCOMPLETE = "verified", "incomplete"


@dataclass
class AuditReport:
    """Every check passed; ``incomplete`` lists what is missing for the run to verify as finished."""

    run_dir: str
    config_hash: str
    checks: list[str] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return INCOMPLETE if self.incomplete else VERIFIED

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "verified": self.status == VERIFIED, "status": self.status,
                "incomplete": self.incomplete, "run_dir": self.run_dir, "config_hash": self.config_hash,
                "checks": self.checks, "sites": self.sites, "report": self.report}


def _public_key(directory: Path) -> str:
    path = directory / "ledger_key.pub.pem"
    if not path.is_file():
        raise LedgerTampered(f"{path} is missing: without the public key the ledger's signatures cannot be checked "
                             "(missing evidence).")
    return path.read_text()


def _config_hash(run_dir: Path) -> str:
    path = run_dir / "config.json"
    if not path.is_file():
        raise LedgerTampered(f"{path} is missing (missing evidence).")
    config = json.loads(path.read_text())
    if digest_json(config["federation"]) != config["config_hash"]:
        raise LedgerTampered(f"{path}: config_hash {config['config_hash']} is not the hash of its 'federation' "
                             "section; the configuration was altered after the run.")
    return str(config["config_hash"])


# The ledger events that record a privacy spend, and the mechanism each one is.
SPENDING_EVENTS = {"update-sent": "dp-sgd", "pate-release": "pate", TEST_EVALUATION_EVENT: "evaluation"}


def _site_spends(events: list[dict[str, Any]], run_id: str) -> list[Spend]:
    """Every privacy event of the run in the site's ledger, in order: each update's DP-SGD steps, each PATE release
    and each noised test evaluation (one Gaussian mechanism each, charged when it was made)."""
    return [Spend(run_id, e["payload"]["round"], float(e["payload"]["dp"]["noise-multiplier"]),
                  float(e["payload"]["dp"]["sample-rate"]), int(e["payload"]["dp"]["steps"]),
                  int(e["payload"]["dp"].get("empty-batches", 0)), SPENDING_EVENTS[e["kind"]])
            for e in events if e["kind"] in SPENDING_EVENTS and e["payload"]["run_id"] == run_id
            and "dp" in e["payload"]]


def _verify_calibration(site_dir: Path, events: list[dict[str, Any]], run_id: str) -> None:
    """privacy.json's calibration of this run (its target epsilon, sigma, q, delta) is the one the ledger signed."""
    accepted = [e for e in events if e["kind"] == "run-accepted" and e["payload"]["run_id"] == run_id]
    stored = PrivacyState.load(site_dir).calibrations.get(run_id)
    signed = accepted[0]["payload"].get("calibration") if accepted else None
    if (asdict(stored) if stored else None) != signed:
        raise LedgerTampered(f"{site_dir / 'privacy.json'}: the calibration of run {run_id} (target epsilon, noise "
                             "multiplier, sampling rate, delta) is not the one the site's ledger recorded when it "
                             "accepted the run.")


def _verify_site_privacy(site_dir: Path, events: list[dict[str, Any]], run_id: str, config_hash: str) -> dict[str, Any]:
    _verify_calibration(site_dir, events, run_id)
    sent = [e for e in events if e["kind"] == "update-sent" and e["payload"]["run_id"] == run_id]
    for event in sent:
        if event["payload"]["config_hash"] != config_hash:
            raise LedgerTampered(f"{site_dir / 'ledger.jsonl'}, seq {event['seq']}: the update names config hash "
                                 f"{event['payload']['config_hash']}, not the run's {config_hash}.")
    spends = _site_spends(events, run_id)
    stored = [s for s in PrivacyState.load(site_dir).run_spends(run_id)]
    if [(s.round, s.noise_multiplier, s.sample_rate, s.steps, s.mechanism) for s in stored] != \
            [(s.round, s.noise_multiplier, s.sample_rate, s.steps, s.mechanism) for s in spends]:
        raise LedgerTampered(f"{site_dir / 'privacy.json'}: the spends of run {run_id} differ from the DP parameters "
                             "the site's ledger recorded for the updates it sent.")
    summary: dict[str, Any] = {"updates_sent": len(sent), "refusals": sum(
        1 for e in events if e["kind"] == "refusal" and e["payload"]["run_id"] == run_id)}
    if not sent:
        return summary
    # The last event that states the run's epsilon (an update, or a noised test evaluation after it): every spend
    # recorded up to it must replay to that epsilon.
    last = max((e for e in events if e["kind"] in SPENDING_EVENTS and e["payload"]["run_id"] == run_id
                and "epsilon_run" in e["payload"]), key=lambda e: e["seq"])
    recorded = last["payload"]["epsilon_run"]
    delta = float(last["payload"]["dp"]["delta"])
    replayed = pld_epsilon(_site_spends([e for e in events if e["seq"] <= last["seq"]], run_id), delta)
    if recorded == "inf" or math.isinf(replayed):
        if not (recorded == "inf" and math.isinf(replayed)):
            raise LedgerTampered(f"{site_dir / 'ledger.jsonl'}, seq {last['seq']}: recorded epsilon {recorded} "
                                 f"but the DP parameters replay to {replayed}.")
    elif abs(replayed - float(recorded)) > EPSILON_TOLERANCE * max(float(recorded), 1e-9):
        raise LedgerTampered(f"{site_dir / 'ledger.jsonl'}, seq {last['seq']}: the site recorded epsilon "
                             f"{float(recorded):.4f} at delta {delta:g}, but its recorded DP parameters replay to "
                             f"{replayed:.4f} with dp-accounting; a noise multiplier, sampling rate or step count was "
                             "altered.")
    summary |= {"epsilon_recorded": recorded, "epsilon_replayed": replayed if math.isfinite(replayed) else "inf",
                "delta": delta}
    return summary


def _verify_anchors(run_dir: Path, events: list[dict[str, Any]], site_events: dict[str, list[dict[str, Any]]],
                    run_id: str, coordinator_pem: str) -> int:
    """The sites' records of the coordinator's ledger must all be in it, signed with the key they pinned."""
    ledger = run_dir / "ledger.jsonl"
    fingerprint = key_fingerprint(coordinator_pem)
    recorded_rounds = {e["payload"]["round"] for e in events if e["kind"] == "round"}
    anchors = 0
    for site, site_log in site_events.items():
        own = [e for e in site_log if e["payload"].get("run_id") == run_id]
        where = run_dir / "sites" / site / "ledger.jsonl"
        for event in (e for e in own if e["kind"] == "run-accepted"):
            pinned = event["payload"].get("coordinator_key_fingerprint")
            if pinned != fingerprint:
                raise LedgerTampered(f"{ledger}: signed with key {fingerprint}, but site {site} pinned the coordinator's "
                                     f"key {pinned} when it accepted the run ({where}, seq {event['seq']}); the "
                                     "coordinator's ledger was rewritten and re-signed with another key.")
        for event in own:
            anchor = event["payload"].get("coordinator_anchor")
            if anchor is None:
                continue
            seq, head = anchor["seq"], anchor["hash"]
            if not (0 <= seq < len(events) and events[seq]["hash"] == head) or not verify_signature(
                    coordinator_pem, head, anchor["signature"]):
                raise LedgerTampered(f"{ledger}: site {site} recorded the coordinator's signed checkpoint of seq {seq} "
                                     f"(hash {head[:12]}...) in {where}, seq {event['seq']}, and this ledger does not "
                                     "contain it; the coordinator's ledger was cut back or rewritten.")
            anchors += 1
        for event in (e for e in own if e["kind"] == "update-sent"):
            if event["payload"]["round"] not in recorded_rounds:
                raise LedgerTampered(f"{ledger}: site {site} recorded an update for round {event['payload']['round']} "
                                     f"({where}, seq {event['seq']}), a round this ledger does not record; the "
                                     "coordinator's ledger was cut back.")
    return anchors


ROUND_FIELDS_NOT_IN_LEDGER = ("evaluation",)


def _verify_rounds(run_dir: Path, events: list[dict[str, Any]], report: AuditReport) -> str | None:
    """metrics.jsonl against the ledger's rounds, then run-finished; returns the digest student/ must have."""
    ledger, metrics_path = run_dir / "ledger.jsonl", run_dir / "metrics.jsonl"
    final: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["kind"] == "round":
            final[event["payload"]["round"]] = event["payload"]  # a resumed run's redone round supersedes
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    if final and not metrics_path.is_file():
        raise LedgerTampered(f"{metrics_path} is missing (missing evidence): the ledger records rounds "
                             f"{sorted(final)}.")
    metrics = [json.loads(line) for line in lines if line.strip()]
    if [m.get("round") for m in metrics] != sorted(final):
        raise LedgerTampered(f"{metrics_path}: holds rounds {[m.get('round') for m in metrics]}, but the signed "
                             f"ledger records rounds {sorted(final)}; rounds were deleted, added or reordered.")
    for record in metrics:
        signed = final[record["round"]]
        shown = {k: v for k, v in record.items() if k not in ROUND_FIELDS_NOT_IN_LEDGER}
        shown["evaluation"] = (record.get("evaluation") or {}).get("overall")
        if shown != signed:
            changed = sorted(k for k in set(shown) | set(signed) if shown.get(k) != signed.get(k))
            raise LedgerTampered(f"{metrics_path}: round {record['round']} differs from the ledger's record of it in "
                                 f"{', '.join(changed)}.")
    report.checks.append(f"metrics.jsonl: {len(metrics)} round(s), each as the ledger recorded it")
    signed = signed_up_to(events)
    finished = [e for e in events if e["kind"] == "run-finished" and e["seq"] <= signed]
    last_digest = final[max(final)]["student_digest"] if final else None
    if not finished:
        report.incomplete.append(f"{ledger} has no signed run-finished event: the run is still running or ended "
                                 "without finishing; nothing vouches that its last recorded round is its last")
        return last_digest
    done = finished[-1]["payload"]
    kept_digest = _verify_kept_round(ledger, events, done, final, last_digest, report)
    if done["final_round"] != (max(final) if final else 0) or done["rounds"] != [m["round"] for m in metrics] \
            or done["student_digest"] != (kept_digest or done["student_digest"]):
        raise LedgerTampered(f"{ledger}, seq {finished[-1]['seq']}: run-finished names round {done['final_round']} "
                             "and a student that are not the last round the ledger records (or the round it kept).")
    if any(e["kind"] == "round" and e["seq"] > finished[-1]["seq"] for e in events):
        raise LedgerTampered(f"{ledger}: rounds are recorded after run-finished.")
    report.checks.append(f"run-finished: round {done['final_round']} is the last, student {done['student_digest'][:12]}...")
    return done["student_digest"]


def _verify_kept_round(ledger: Path, events: list[dict[str, Any]], done: dict[str, Any],
                       rounds: dict[int, dict[str, Any]], last_digest: str | None, report: AuditReport) -> str | None:
    """A run that keeps its best round: the kept round is the one with the best signed pooled validation score
    (the earliest on a tie; the last round when none was scored), and the final student is that round's.
    Returns the digest the final student must have (the last round's for a run that keeps the last)."""
    started = next(e["payload"] for e in events if e["kind"] == "run-started")
    federated = next((s for s in started["config"].get("curriculum", []) if s["where"] == "federated"), {})
    validations = {e["payload"]["round"]: e["payload"] for e in events if e["kind"] == "validation"}
    if not federated.get("keep_best"):
        if "kept_round" in done or validations:
            raise LedgerTampered(f"{ledger}: the run config keeps the last round, but the ledger records a kept round "
                                 "or validation reports.")
        return last_digest
    scored = [(v["score"], -round_) for round_, v in validations.items() if v["score"] is not None]
    for round_, v in validations.items():
        if round_ >= 1 and (round_ not in rounds or rounds[round_]["student_digest"] != v["student_digest"]):
            raise LedgerTampered(f"{ledger}: the validation report of round {round_} scores a student that is not the "
                                 "one the ledger records for that round.")
        released = [r for r in v["sites"].values() if r.get("released") and r.get("roc_auc") is not None
                    and r["n"] > 0]
        pooled = (sum(r["roc_auc"] * r["n"] for r in released) / sum(r["n"] for r in released)) if released else None
        if (pooled is None) != (v["score"] is None) or (pooled is not None and abs(pooled - v["score"]) > 1e-9):
            raise LedgerTampered(f"{ledger}: the pooled validation score of round {round_} does not recompute from "
                                 "the sites' released reports.")
    expected = -max(scored)[1] if scored else done["final_round"]
    if done.get("kept_round") != expected:
        raise LedgerTampered(f"{ledger}: run-finished keeps round {done.get('kept_round')}, but the signed validation "
                             f"scores make round {expected} the best.")
    digest = validations[expected]["student_digest"] if expected in validations else last_digest
    report.checks.append(f"keep-best: round {expected} has the best pooled validation ROC-AUC of "
                         f"{len(validations)} signed validation report(s) (each recomputes from what the sites "
                         "released), and the final student is that round's")
    return digest


def _arrays_of(path: Path) -> dict[str, Any]:
    """A student's tensors; a file that is not a safetensors file is evidence that fails, not a crash."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise LedgerTampered(f"{path} cannot be read as a safetensors file ({type(err).__name__}); the student "
                             "there is not the one the ledger records.") from None


def _verify_student(run_dir: Path, digest: str | None, report: AuditReport) -> None:
    path = run_dir / "student" / "model.safetensors"
    if digest is None:
        return
    if not path.is_file():
        raise LedgerTampered(f"{path} is missing (missing evidence): the ledger records a final student "
                             f"{digest[:12]}....")
    actual = digest_arrays(_arrays_of(path))
    if actual != digest:
        raise LedgerTampered(f"{path}: the student's weights hash to {actual[:12]}..., not {digest[:12]}..., the "
                             "digest the signed ledger records for the final round; the student was swapped.")
    report.checks.append("student/ hashes to the final round's signed digest")


def _verify_coordinator_stage(run_dir: Path, started: dict[str, Any], report: AuditReport) -> None:
    """A curriculum's coordinator stage: its signed record matches the config, read no site record, spent nothing,
    and the student it produced (stages/coordinator/) hashes to the digest the record names."""
    configured = next((s for s in started["config"].get("curriculum", []) if s["where"] == "coordinator"), None)
    record = started.get("coordinator_stage")
    ledger = run_dir / "ledger.jsonl"
    if configured is None and record is None:
        return
    if configured is None or record is None:
        raise LedgerTampered(f"{ledger}: the run config " + ("names a coordinator stage but the run-started event "
                                                             "records none" if record is None else
                                                             "has no coordinator stage but the run-started event "
                                                             "records one") + ".")
    if record.get("settings") != configured:
        raise LedgerTampered(f"{ledger}: the coordinator stage's recorded settings are not the run config's.")
    if record.get("site_records_read") != 0 or record.get("epsilon") != 0:
        raise LedgerTampered(f"{ledger}: the coordinator stage records {record.get('site_records_read')} site "
                             f"record(s) read and epsilon {record.get('epsilon')}; a coordinator stage reads public "
                             "records only.")
    path = run_dir / "stages" / "coordinator" / "model.safetensors"
    if not path.is_file():
        raise LedgerTampered(f"{path} is missing (missing evidence): the ledger records the coordinator stage's "
                             f"student {record['student_digest'][:12]}....")
    actual = digest_arrays(_arrays_of(path))
    if actual != record["student_digest"]:
        raise LedgerTampered(f"{path}: the coordinator stage's student hashes to {actual[:12]}..., not "
                             f"{record['student_digest'][:12]}..., the digest its signed record names.")
    report.checks.append(f"coordinator stage: {record['public_records']} public record(s) plus "
                         f"{record['synthetic_records']} synthetic, no site record, epsilon 0; stages/coordinator/ "
                         "hashes to its signed digest")


def _verify_continuation(run_dir: Path, started: dict[str, Any], report: AuditReport) -> None:
    """A continuing run (``--from``): it started from the final student of the run its config names.

    ``stages/start/`` must hash to the recorded digest. When the earlier run's directory is beside this one (the
    same runs folder), its ledger must still hold the recorded head and that final student; otherwise the check says
    so, since the head could not be compared.
    """
    recorded = started["config"].get("continues")
    if recorded is None:
        return
    path = run_dir / START_STUDENT
    if not path.is_file():
        raise LedgerTampered(f"{path} is missing (missing evidence): the run config says the run continues run "
                             f"{recorded['run_id']} from student {recorded['student_digest'][:12]}....")
    if digest_arrays(_arrays_of(path)) != recorded["student_digest"]:
        raise LedgerTampered(f"{path}: the starting student is not the one the run config names "
                             f"({recorded['student_digest'][:12]}...).")
    for sibling in sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir):
        try:
            run_id = json.loads((sibling / "config.json").read_text()).get("run_id")
        except (OSError, ValueError):
            continue
        if run_id != recorded["run_id"]:
            continue
        if not (sibling / "ledger.jsonl").is_file():
            raise LedgerTampered(f"{sibling / 'ledger.jsonl'} is missing (missing evidence): this run continues run "
                                 f"{run_id}, whose directory is beside it.")
        prior = read_events(sibling / "ledger.jsonl")
        finished = [e["payload"] for e in prior if e["kind"] == "run-finished"]
        if not any(e["hash"] == recorded["ledger_head"] for e in prior) or not finished \
                or finished[-1]["student_digest"] != recorded["student_digest"]:
            raise LedgerTampered(f"{sibling / 'ledger.jsonl'}: run {run_id}'s ledger no longer holds the head "
                                 f"{recorded['ledger_head'][:12]}... and the final student this run continued from; "
                                 "its history was rewritten.")
        report.checks.append(f"continues run {run_id} ({sibling.name}): stages/start/ is its final student, and its "
                             "ledger holds the recorded head")
        return
    report.checks.append(f"continues run {recorded['run_id']}: stages/start/ hashes to the recorded final student; "
                         "that run's directory is not beside this one, so its ledger head was not compared (verify it "
                         "on its own)")


def _verify_parties(run_dir: Path, events: list[dict[str, Any]], run_id: str, report: AuditReport) -> None:
    """The operator's parties declaration: at most one, of this run, signed by the checkpoint after run-started
    (so before any site accepted the run), a valid parties.toml whose digest is the one recorded beside it."""
    ledger = run_dir / "ledger.jsonl"
    declared = [e for e in events if e["kind"] == PARTIES_EVENT]
    if not declared:
        return
    first_checkpoint = next((e for e in events if e["kind"] == "checkpoint"), None)
    event = declared[0]
    if len(declared) > 1 or event["payload"].get("run_id") != run_id or first_checkpoint is None \
            or event["seq"] > first_checkpoint["payload"]["signed_seq"]:
        raise LedgerTampered(f"{ledger}, seq {event['seq']}: a parties declaration must be recorded once, for run "
                             f"{run_id}, before the first signed checkpoint; this ledger records {len(declared)}.")
    try:
        parties = PartiesDeclaration.from_dict(event["payload"].get("parties"), f"{ledger}, seq {event['seq']}")
    except ConfigError as err:
        raise LedgerTampered(f"the recorded parties declaration is not a valid parties.toml: {err}") from None
    if parties.digest != event["payload"].get("digest"):
        raise LedgerTampered(f"{ledger}, seq {event['seq']}: the parties declaration does not hash to the digest "
                             "recorded beside it.")
    report.checks.append(f"parties-declared: {len(parties.sites)} site(s), regimes "
                         f"{', '.join(r.name for r in parties.regimes) or 'none'}; its digest recomputes")


def _verify_site_local(run_dir: Path, events: list[dict[str, Any]], site_events: dict[str, list[dict[str, Any]]],
                       report: AuditReport) -> None:
    """A site-local stage: what the coordinator signed as released is what each site's own ledger recorded, and
    each site's kept copy hashes to the digest its ledger names; a site that withheld its metrics released none."""
    recorded = [e["payload"] for e in events if e["kind"] == "site-local-stage"]
    if not recorded:
        return
    stage = recorded[-1]
    for site, released in stage["sites"].items():
        own = [e["payload"] for e in site_events.get(site, []) if e["kind"] == "site-local-stage"
               and e["payload"]["run_id"] == stage["run_id"]]
        where = f"{run_dir / 'sites' / site / 'ledger.jsonl'}"
        if not own:
            raise LedgerTampered(f"{where}: the coordinator records a site-local stage of site {site}, but the site's "
                                 "ledger has none.")
        event = own[-1]
        if released.get("released") != event["released"]:
            raise LedgerTampered(f"{where}: the site's policy decision on releasing its site-local metrics is not the "
                                 "one the coordinator recorded.")
        if event["released"] and {k: v for k, v in released.items() if k != "released"} != event["metrics"]:
            raise LedgerTampered(f"{where}: the site-local metrics the coordinator recorded are not the ones the "
                                 "site released.")
        kept = run_dir / "sites" / site / event["kept_at"] / "model.safetensors"
        if kept.is_file() and digest_arrays(_arrays_of(kept)) != event["local_student_digest"]:
            raise LedgerTampered(f"{kept}: the site's local student does not hash to the digest its ledger records.")
    missing = sorted(set(stage.get("failures", {})) | set(stage.get("rejected", {})))
    report.checks.append(f"site-local stage: {len(stage['sites'])} site(s)' released metrics match their own "
                         "ledgers, and every kept copy its recorded digest"
                         + (f"; {len(missing)} node(s) ran no site-local stage, as the coordinator recorded "
                            f"({', '.join(missing)})" if missing else ""))


def _verify_validation(run_dir: Path, events: list[dict[str, Any]], site_events: dict[str, list[dict[str, Any]]],
                       report: AuditReport) -> None:
    """A run that keeps its best round: every validation score the coordinator signed is what that site's own
    ledger recorded releasing, for the same round and student."""
    recorded = [e["payload"] for e in events if e["kind"] == "validation"]
    for validation in recorded:
        for site, released in validation["sites"].items():
            own = [e["payload"] for e in site_events.get(site, []) if e["kind"] == "validation"
                   and e["payload"]["run_id"] == validation["run_id"] and e["payload"]["round"] == validation["round"]]
            where = run_dir / "sites" / site / "ledger.jsonl"
            if not own:
                raise LedgerTampered(f"{where}: the coordinator records site {site}'s validation of round "
                                     f"{validation['round']}, but the site's ledger has none.")
            event = own[-1]
            if event["student_digest"] != validation["student_digest"] or event["released"] != released["released"] \
                    or (event["released"] and (event["roc_auc"], event["n"]) != (released["roc_auc"], released["n"])):
                raise LedgerTampered(f"{where}: the validation of round {validation['round']} the coordinator "
                                     "recorded is not what this site scored and released.")
    if recorded:
        report.checks.append(f"keep-best: {len(recorded)} validation report(s) match what each site's own ledger "
                             "scored and released")


def _verify_knowledge(run_dir: Path, started: dict[str, Any], site_events: dict[str, list[dict[str, Any]]],
                      run_id: str, report: AuditReport) -> None:
    """A knowledge run: the proxy file is the registered one, and every site's release names the run's source, proxy
    set and layout, with the reason it is private: a public teacher the site declared public, or the DP step of the
    same round whose parameters the site's epsilon is replayed from (post-processing costs nothing further)."""
    knowledge = started["config"].get("knowledge")
    if knowledge is None:
        return
    proxy = run_dir / PROXY_FILE
    if proxy.is_file():
        if file_sha256(proxy) != knowledge["proxy_digest"]:
            raise LedgerTampered(f"{proxy}: its SHA-256 is not the proxy digest the run config registers.")
        report.checks.append(f"{PROXY_FILE}: the proxy set is the one the run config registers by SHA-256")
    private = started["config"].get("target_epsilon") is not None
    releases = 0
    for site, events in site_events.items():
        accepted = next((e["payload"] for e in events if e["kind"] == "run-accepted"
                         and e["payload"]["run_id"] == run_id), None)
        for event in (e for e in events if e["kind"] == "update-sent" and e["payload"]["run_id"] == run_id):
            where = f"{run_dir / 'sites' / site / 'ledger.jsonl'}, seq {event['seq']}"
            release = event["payload"].get("knowledge")
            if release is None:
                raise LedgerTampered(f"{where}: the run is a knowledge run, but the update records no release.")
            expected = {"source": knowledge["source"], "proxy_digest": knowledge["proxy_digest"],
                        "shape": [knowledge.get("proxy_positions") or knowledge["proxy_records"],
                                  knowledge["classes"]]}
            found = {key: release.get(key) for key in expected}
            if found != expected:
                raise LedgerTampered(f"{where}: the release records {found}, the run config names {expected}.")
            if release["source"] == "pate":
                _verify_pate_release(where, release, events, run_id, event["payload"]["round"], knowledge)
            elif release["source"] == "public-teacher":
                declared = (accepted or {}).get("teacher") or {}
                if declared.get("training_data") != "public":
                    raise LedgerTampered(f"{where}: a public-teacher release from a site whose signed run-accepted "
                                         f"event declares teacher training data {declared.get('training_data')!r}.")
            else:
                done = release.get("post_processes") or {}
                dp = event["payload"]["dp"]
                if done.get("run_id") != run_id or done.get("round") != event["payload"]["round"] or (
                        private and not (int(dp["steps"]) > 0 and float(dp["noise-multiplier"]) > 0)):
                    raise LedgerTampered(f"{where}: the local-student release does not post-process a DP step of "
                                         "this round that the ledger records.")
            releases += 1
    report.checks.append(f"knowledge ({knowledge['mode']}, source {knowledge['source']}): {releases} site releases "
                         "name the run's proxy set and layout and why each is private")


def _verify_pate_release(where: str, release: dict[str, Any], events: list[dict[str, Any]], run_id: str,
                         server_round: int, knowledge: dict[str, Any]) -> None:
    """A PATE release re-sent in a round was made (and charged, as the spends replay) in this or an earlier round,
    with the run's ensemble size and noise, and the sensitivity of the run's proxy layout."""
    made_in = release.get("released_in_round")
    made = [e["payload"] for e in events if e["kind"] == "pate-release" and e["payload"]["run_id"] == run_id
            and e["payload"]["round"] == made_in]
    if not made or not isinstance(made_in, int) or made_in > server_round:
        raise LedgerTampered(f"{where}: the PATE release names round {made_in!r}, but the site's ledger records no "
                             "PATE release of this run charged then.")
    charged = made[-1]
    expected = {"teachers": knowledge["pate_teachers"], "noise-multiplier": knowledge["pate_noise_multiplier"],
                "sample-rate": 1.0, "steps": 1, "sensitivity_l2": math.sqrt(2.0 * knowledge["proxy_records"]),
                "proxy_digest": knowledge["proxy_digest"]}
    found = {"teachers": charged.get("teachers"), **{key: charged["dp"].get(key) for key in
                                                     ("noise-multiplier", "sample-rate", "steps")},
             "sensitivity_l2": charged.get("sensitivity_l2"), "proxy_digest": charged.get("proxy_digest")}
    if found != expected or release.get("teachers") != expected["teachers"] or \
            release.get("noise_multiplier") != expected["noise-multiplier"]:
        raise LedgerTampered(f"{where}: the PATE release records {found}, the run config gives {expected}.")


def _verify_found_report(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = run_dir / "report" / "report.json"
    if not path.is_file():
        return None
    checked = verify_report(path, fingerprint)
    for subject in checked["subjects"]:
        target = run_dir / subject["path"]
        now = file_sha256(target) if target.is_file() else "missing"
        if now != subject["sha256"]:
            raise LedgerTampered(f"{path}: rests on {subject['path']} with SHA-256 {subject['sha256'][:12]}..., but "
                                 f"the file now has {now[:12]}...; the report does not describe this run as it is.")
    return {"report_id": checked["report_id"], "key_fingerprint": checked["key_fingerprint"]}


def verify_run(run_dir: Path, check_report: bool = True) -> AuditReport:
    """Every check of the module docstring; ``check_report=False`` when the report itself is being rebuilt."""
    run_dir = Path(run_dir)
    config_hash = _config_hash(run_dir)
    report = AuditReport(str(run_dir), config_hash, ["config.json: config hash recomputes"])
    coordinator_pem = _public_key(run_dir)
    coordinator = verify_ledger(run_dir / "ledger.jsonl", coordinator_pem, actor="coordinator")
    events = read_events(run_dir / "ledger.jsonl")
    started = [e for e in events if e["kind"] == "run-started"]
    if not started or started[0]["payload"]["config_hash"] != config_hash:
        raise LedgerTampered(f"{run_dir / 'ledger.jsonl'}: its run-started event does not name config hash "
                             f"{config_hash}.")
    run_id = started[0]["payload"]["run_id"]
    base = started[0]["payload"].get("student_base")
    if base is not None:
        pinned = started[0]["payload"]["config"]["student"]["settings"].get("base_digest")
        if base.get("digest") != pinned:
            raise LedgerTampered(f"{run_dir / 'ledger.jsonl'}: its run-started event describes base student "
                                 f"{base.get('digest')}, but the run config pins {pinned}.")
        report.checks.append("coordinator ledger: the base student's provenance names the config's base_digest"
                             + (" (a public stage made it)" if base.get("public_stage") else ""))
    _verify_coordinator_stage(run_dir, started[0]["payload"], report)
    _verify_continuation(run_dir, started[0]["payload"], report)
    _verify_parties(run_dir, events, run_id, report)
    report.checks.append(f"coordinator ledger: {coordinator.events} events, {coordinator.checkpoints} signed "
                         "checkpoints verify")
    site_dirs = sorted(p for p in (run_dir / "sites").iterdir() if p.is_dir()) if (run_dir / "sites").is_dir() else []
    site_events: dict[str, list[dict[str, Any]]] = {}
    for site_dir in site_dirs:
        site_report = verify_ledger(site_dir / "ledger.jsonl", _public_key(site_dir), actor=site_dir.name)
        site_events[site_dir.name] = read_events(site_dir / "ledger.jsonl")
        report.sites[site_dir.name] = {"events": site_report.events, "checkpoints": site_report.checkpoints}
    report.checks.append(f"{len(site_dirs)} site ledgers verify with their own keys")
    for event in events:
        if event["kind"] != "checkpoint":
            continue
        for site, (seq, head) in event["payload"].get("site_heads", {}).items():
            if site not in site_events:
                raise LedgerTampered(f"{run_dir / 'ledger.jsonl'}, seq {event['seq']}: the checkpoint records site "
                                     f"{site}, whose directory and ledger are missing (missing evidence).")
            recorded = site_events[site]
            if seq >= len(recorded) or recorded[seq]["hash"] != head:
                raise LedgerTampered(f"{run_dir / 'sites' / site / 'ledger.jsonl'}: the coordinator's checkpoint (seq "
                                     f"{event['seq']}) recorded head {seq}:{head[:12]}..., which this ledger does "
                                     "not contain; one side rewrote its history.")
    report.checks.append("every site head recorded by a coordinator checkpoint is in that site's ledger")
    anchors = _verify_anchors(run_dir, events, site_events, run_id, coordinator_pem)
    report.checks.append(f"the coordinator's ledger holds all {anchors} of its signed checkpoints that sites recorded, "
                         "signed by the key every site pinned, and every round a site sent an update for")
    _verify_student(run_dir, _verify_rounds(run_dir, events, report), report)
    _verify_site_local(run_dir, events, site_events, report)
    _verify_validation(run_dir, events, site_events, report)
    _verify_knowledge(run_dir, started[0]["payload"], site_events, run_id, report)
    for site_dir in site_dirs:
        report.sites[site_dir.name] |= _verify_site_privacy(site_dir, site_events[site_dir.name], run_id, config_hash)
    report.checks.append("every site's calibration is the one its ledger signed, and its epsilon replays from its "
                         f"recorded DP parameters with dp-accounting (PLD) within {EPSILON_TOLERANCE:.0%}")
    if check_report:
        report.report = _verify_found_report(run_dir, key_fingerprint(coordinator_pem))
        if report.report is not None:
            report.checks.append(f"report/report.json: signed by the coordinator, report_id "
                                 f"{report.report['report_id'][:12]}... recomputes, the files it rests on are unchanged")
    return report
