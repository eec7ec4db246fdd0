"""The compliance report of one run: ``report.json``, the source of truth that the HTML and PDF only render.

Everything here is read from the run directory; nothing is taken from the process that ran it. Two kinds
of run directory are reported by the same code:

- a simulation's (``fedistill simulate``): ``config.json``, ``metrics.jsonl``, ``summary.json``, the
  coordinator's ledger, ``student/``, ``teacher/`` and every site's whole state directory under ``sites/``;
- a deployment's (``fedistill run``, then ``fedistill site evidence`` at every site): ``config.json`` with a
  ``deployment`` block, ``metrics.jsonl``, the coordinator's ledger, ``student/`` and, under ``sites/``, only
  each site's evidence (:data:`protocols.accounting.EVIDENCE_FILES`). The coordinator never sees site data, so
  there is no summary, no evaluation and no teacher: those fields say why they are not assessed.

Epsilons are recomputed from each site's stored spends with the site's own accountant
(:mod:`protocols.accounting`), and the whole run is verified with :func:`compliance.verify.verify_run`, whose
failure is reported in the report, never hidden.

The sections follow the outline of ``docs/report.md``: section 1, the summary (derived from the other sections by
:func:`compliance.summary.summary_of`), to 15, the verification appendix, then the envelope (the files and hashes
the report rests on) as an appendix. What only people know (legal entities, intended use, the regimes that apply,
each site's lawful basis and erasure schedule) is read from the ledgers: the operator's ``parties-declared`` event
in the coordinator's and each site's ``run-accepted`` event (protocols/governance.py), never from a loose file.
Whatever the run cannot evidence (TLS in a simulation, a DPIA, what no declaration states...) is the string
:data:`NOT_ASSESSED`, or :func:`not_assessed` with the reason, never a guess. No record, label or person
id of any site is ever copied into the report: only counts, digests and the tensor layout of what left a site.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from compliance.assessed import NOT_ASSESSED, is_not_assessed, not_assessed
from compliance.crosswalk import crosswalk_of
from compliance.report_signature import report_id
from compliance.summary import summary_of
from compliance.verify import EPSILON_TOLERANCE, verify_run
from distill.data import load_splits
from protocols.accounting import (EVIDENCE_FILES, Calibration, PrivacyState, SitePolicy, epsilon_of, json_epsilon,
                                  unit_of_privacy)
from protocols.canonical import digest_arrays, digest_json, file_sha256
from protocols.errors import DataError, FedistillError, LedgerTampered
from protocols.evaluation import SITE_EVALUATION_EVENT, TEST_EVALUATION_EVENT
from protocols.governance import PARTIES_EVENT, REGIMES
from protocols.ledger import CHECKPOINT, read_events
from protocols.ledger import key_fingerprint as ledger_key_fingerprint

SCHEMA_VERSION = 1
# The privacy profile: epsilon at these deltas, from the same spends (a single (epsilon, delta) pair is incomplete).
PROFILE_DELTAS = (1e-5, 1e-6, 1e-8, 1e-10)
# (key in report.json, section number, heading): the order and the headings of every rendering.
# The summary comes first and the files and hashes last: a privacy officer reads the first screen, an auditor the end.
SECTIONS = (
    ("summary", 1, "Summary"),
    ("run", 2, "Run identity and scope"),
    ("parties", 3, "Parties"),
    ("data_inventory", 4, "Data inventory per site"),
    ("data_flows", 5, "Data flows"),
    ("privacy", 6, "Differential-privacy statement"),
    ("secure_aggregation", 7, "Secure aggregation and transport"),
    ("access_control", 8, "Access control and authentication"),
    ("audit_trail", 9, "Audit trail"),
    ("model_card", 10, "Model documentation"),
    ("evaluation", 11, "Evaluation"),
    ("risk", 12, "Risk"),
    ("lineage", 13, "Lineage"),
    ("crosswalk", 14, "Regulatory crosswalk"),
    ("verification", 15, "Verification appendix"),
    ("envelope", 16, "Appendix: files, hashes and signatures"),
)
SECTION = {key: number for key, number, _ in SECTIONS}
SIMULATION_NOTE = ("simulation: the coordinator and every site are processes of one Flower simulation on one "
                   "machine, so there are no user accounts, node registrations or network links to evidence")
DEPLOYMENT_NOTE = ("deployment: the coordinator and every site run their own Flower processes (SuperLink, "
                   "SuperNodes) and talk over the network; the run directory holds their ledgers and the sites' "
                   "evidence, not the connections, the coordinator's node-key registry or any user account, so "
                   "those are not evidenced here")
# The two tasks a summary can describe; a classification summary predates the "task" key.
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
# What one record is, per task: DP-SGD on a causal LM samples whole documents (one sequence each).
RECORD_ITEMS = {CLASSIFICATION: "record", CAUSAL_LM: "document"}
# What a causal-LM summary must hold beyond a classification one (docs/report.md, "Causal-LM runs").
CAUSAL_LM_SUMMARY_KEYS = ("metrics", "model_labels", "models", "comparison", "size", "causal_lm")
SITE_FILE_LABELS = {"ledger.jsonl": "ledger", "ledger_key.pub.pem": "ledger public key",
                    "privacy.json": "privacy history", "policy.json": "privacy policy",
                    "secagg_clipping.json": "SecAgg+ clipping counts", "site.json": "site description"}
# The site files a report rests on: a simulation keeps each site's whole state directory; a deployed site hands
# over only its evidence. Either list is shown whole in the envelope, so a missing file reads "missing".
SIMULATED_SITE_FILES = ("ledger.jsonl", "ledger_key.pub.pem", "privacy.json", "policy.json", "secagg_clipping.json")


# What a deployed run cannot evidence, and why (the coordinator never sees a site's data or teacher).
KEPT_AT_SITE = not_assessed("kept at the site (a deployed site hands over only its ledger, spends and policy, not "
                            "its records nor a description of them)")
NO_EVALUATION = not_assessed("a deployed run has no coordinator-side evaluation (the sites' validation and test "
                             "records never leave them; no teacher or baseline is evaluated)")
NODE_KEYS_ABSENT = not_assessed("the coordinator admits only SuperNodes whose key the operator registered, but "
                                "its registry (sites.json) is not part of the run directory")
NO_TEACHER = not_assessed("each site keeps its own teacher; a deployed run directory holds no teacher file")
# What people must state (protocols/governance.py), when they did not.
NO_PARTIES = not_assessed("no parties declaration: the coordinator's ledger records no parties-declared event (give "
                          "the run a parties.toml: fedistill simulate --parties, or run.toml parties)")
NOT_STATED = not_assessed("parties.toml does not state it")
NO_GOVERNANCE = not_assessed("the site's run-accepted event states no governance (site.toml [governance], or "
                             "fedistill simulate --site-governance)")
GOVERNANCE_SILENT = not_assessed("the site's [governance] table does not state it")


# ------------------------------------------------------------------------------------------------ evidence
@dataclass(frozen=True)
class LedgerFile:
    """One actor's ledger as read (not verified: :func:`verify_run` does that); ``error`` says why it is unreadable."""

    actor: str
    path: Path
    public_key_pem: str | None
    events: tuple[dict[str, Any], ...]
    error: str | None

    def of_run(self, run_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind and e["payload"].get("run_id") == run_id]


@dataclass(frozen=True)
class SiteFiles:
    name: str
    directory: Path
    ledger: LedgerFile
    policy: SitePolicy | None
    privacy: PrivacyState


@dataclass(frozen=True)
class RunEvidence:
    run_dir: Path
    config: dict[str, Any]
    # None in a deployment: the coordinator never evaluates the student nor sees a site's data.
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    coordinator: LedgerFile
    sites: dict[str, SiteFiles]
    audit: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.config["run_id"])

    @property
    def federation(self) -> dict[str, Any]:
        return self.config["federation"]

    @property
    def deployment(self) -> dict[str, Any] | None:
        """``config.json``'s ``deployment`` block (Flower run id, sites waited for); None in a simulation."""
        return self.config.get("deployment")

    @property
    def transport(self) -> dict[str, Any] | None:
        """The transport a deployed coordinator enforced (TLS, SuperNode authentication, registered site keys), as
        its signed run-started event attests it; None in a simulation or when the ledger does not record it."""
        started = [e for e in self.coordinator.events if e["kind"] == "run-started"]
        return started[0]["payload"].get("transport") if started and self.deployment is not None else None

    @property
    def student_base(self) -> dict[str, Any] | None:
        """How a causal-LM run's base student was made (its layers, vocabulary, public stage), as the coordinator's
        signed run-started event records it from the digest-pinned base folder; None for other runs."""
        started = [e for e in self.coordinator.events if e["kind"] == "run-started"]
        return started[0]["payload"].get("student_base") if started else None

    @property
    def coordinator_stage(self) -> dict[str, Any] | None:
        """A classification run's coordinator stage (public records only), as the signed run-started event records
        it; None when the run has none."""
        started = [e for e in self.coordinator.events if e["kind"] == "run-started"]
        return started[0]["payload"].get("coordinator_stage") if started else None

    @property
    def parties(self) -> dict[str, Any] | None:
        """The operator's parties declaration as the coordinator's signed ledger records it (``parties-declared``:
        content, digest, the file's SHA-256, and the event's seq); None when the run has none."""
        declared = [e for e in self.coordinator.events if e["kind"] == PARTIES_EVENT
                    and e["payload"].get("run_id") == self.run_id]
        return {**declared[0]["payload"], "seq": declared[0]["seq"]} if declared else None

    def accepted(self, site: SiteFiles) -> dict[str, Any] | None:
        """The site's signed run-accepted event of this run (payload and seq); None when it never accepted it."""
        events = site.ledger.of_run(self.run_id, "run-accepted")
        return {**events[0]["payload"], "seq": events[0]["seq"]} if events else None

    @property
    def scope_note(self) -> str:
        return SIMULATION_NOTE if self.deployment is None else DEPLOYMENT_NOTE

    @property
    def task(self) -> str:
        """``classification`` or ``causal-lm``: the summary says (a classification summary has no ``task`` key); a
        deployed run has no summary, so its student's family says."""
        if self.summary is not None:
            return str(self.summary.get("task", CLASSIFICATION))
        return CAUSAL_LM if self.federation.get("student", {}).get("family") == "causal_lm" else CLASSIFICATION


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} is missing: a report needs {what}. Point fedistill report at a run directory "
                        "that fedistill simulate finished, or at a deployment's run directory (docs/deploy.md).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); the file was damaged after the run.") from exc


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path} is missing: a report needs the per-round record the coordinator wrote.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc}).") from exc
    return records


def _ledger_file(directory: Path, actor: str) -> LedgerFile:
    key_path = directory / "ledger_key.pub.pem"
    try:
        events, error = tuple(read_events(directory / "ledger.jsonl")), None
    except LedgerTampered as err:
        events, error = (), str(err)
    return LedgerFile(actor, directory / "ledger.jsonl", key_path.read_text() if key_path.is_file() else None,
                      events, error)


def _audit(run_dir: Path) -> dict[str, Any]:
    """The verifier's verdict; a failure becomes part of the report (an altered run must still be reportable)."""
    try:
        # The report being rebuilt is not itself evidence of the run.
        return verify_run(run_dir, check_report=False).to_dict()
    except (FedistillError, OSError, ValueError, KeyError, TypeError) as err:
        return {"schema_version": 1, "verified": False, "run_dir": str(run_dir), "failure": str(err), "checks": [],
                "sites": {}}


def _deployed_sites(run_dir: Path, metrics: list[dict[str, Any]]) -> list[str]:
    """A deployment's configuration names no sites: they are those that handed over evidence and those the
    coordinator recorded in a round, so a site that took part but handed nothing over is reported with its
    evidence missing, not left out."""
    sites_dir = run_dir / "sites"
    handed_over = {p.name for p in sites_dir.iterdir() if p.is_dir()} if sites_dir.is_dir() else set()
    recorded = {site for r in metrics for key in ("participants", "refusals", "failures", "rejected")
                for site in r.get(key) or ()}
    return sorted(handed_over | recorded)


def load_evidence(run_dir: Path) -> RunEvidence:
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json", "the run's resolved configuration")
    deployed = "deployment" in config
    required = ("run_id", "federation", "config_hash") + (() if deployed else ("sites",))
    missing = [key for key in required if key not in config]
    if missing:
        raise DataError(f"{run_dir / 'config.json'}: field(s) {', '.join(missing)} missing; it was not written by "
                        "fedistill simulate or fedistill run, or was altered after the run.")
    summary = None if deployed else _read_json(run_dir / "summary.json",
                                               "the run's summary (written when the simulation finished)")
    if summary is not None and summary.get("task") == CAUSAL_LM:
        absent = [key for key in CAUSAL_LM_SUMMARY_KEYS if key not in summary]
        if absent:
            raise DataError(f"{run_dir / 'summary.json'}: a causal-LM summary needs field(s) {', '.join(absent)}; it "
                            "was written by an older fedistill or altered after the run.")
    metrics = _read_metrics(run_dir / "metrics.jsonl")
    sites = {}
    for name in _deployed_sites(run_dir, metrics) if deployed else config["sites"]:
        directory = run_dir / "sites" / name
        policy = SitePolicy.load(directory) if (directory / "policy.json").is_file() else None
        sites[name] = SiteFiles(name, directory, _ledger_file(directory, name), policy, PrivacyState.load(directory))
    return RunEvidence(run_dir, config, summary, metrics, _ledger_file(run_dir, "coordinator"), sites,
                       _audit(run_dir))


# ------------------------------------------------------------------------------------------------ helpers
def key_fingerprint(pem: str | None) -> str:
    """The key's fingerprint (:func:`protocols.ledger.key_fingerprint`), or why there is none: a report still shows
    a run whose key is missing or unusable."""
    if pem is None:
        return "missing"
    try:
        return ledger_key_fingerprint(pem)
    except FedistillError as err:
        return f"invalid: {err}"


def _version_of(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """The commit of the code that generates this report (which may differ from the one that ran the run)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return NOT_ASSESSED
    return result.stdout.strip() if result.returncode == 0 else NOT_ASSESSED


def _finite(value: float | str | None) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


VOCABULARY_KEYS = ("subset", "student_tokens", "teacher_tokens", "kept_teacher_tokens", "dropped_teacher_tokens",
                   "chosen_from", "held_out_token_coverage", "oov_rule")


def _pick(mapping: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: (mapping or {}).get(key) for key in keys}


def causal_lm_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's ``causal_lm`` block, field by field: settings, counts, sizes and digests. A key the report
    does not name is left out, so nothing a later summary adds (a sample text, say) can reach the report."""
    block = summary["causal_lm"]
    lora, vocabulary = block.get("lora"), block.get("vocabulary")
    return {
        "teacher": _pick(block.get("teacher"), ("kind", "source", "digest", "description")),
        "fragments": block.get("fragments"),
        "lora": None if lora is None else _pick(lora, ("r", "alpha", "targets")),
        "top_k": block.get("top_k"), "temperatures": block.get("temperatures"), "divergence": block.get("divergence"),
        "tail": block.get("tail"), "max_length": block.get("max_length"),
        "alignment": _pick(block.get("alignment"), ("pairs", "weight")) if block.get("alignment") else None,
        # A student on a subset of the teacher's vocabulary: how perplexity still counts every teacher token.
        "vocabulary": None if vocabulary is None else _pick(vocabulary, VOCABULARY_KEYS),
        "cache": {site: _pick(cache, ("positions", "bytes", "teacher_forward_passes", "digest"))
                  for site, cache in (block.get("cache") or {}).items()},
        "sent_per_round": {site: _pick(sent, ("bytes", "tensors", "rounds"))
                           for site, sent in (block.get("sent_per_round") or {}).items()},
        # Sequence-level KD: how many tokens the teacher wrote after each document, and each site's cache of them.
        "continuation_tokens": block.get("continuation_tokens", 0),
        "continuations": {site: _pick(cache, ("sequences", "new_tokens_total", "bytes", "digest"))
                          for site, cache in (block.get("continuations") or {}).items()},
    }


# ------------------------------------------------------------------------------------------------ section 16 (appendix)
def _subjects(ev: RunEvidence) -> list[dict[str, Any]]:
    run = ev.run_dir
    entries = [(f"student {p.name}", p) for p in sorted((run / "student").glob("*")) if p.is_file()]
    entries += [("run configuration", run / "config.json"), ("per-round metrics", run / "metrics.jsonl")]
    if ev.summary is not None:
        entries.append(("run summary", run / "summary.json"))
    entries += [("coordinator ledger", run / "ledger.jsonl"),
                ("coordinator ledger public key", run / "ledger_key.pub.pem")]
    entries += [(f"teacher {p.relative_to(run / 'teacher')}", p) for p in sorted((run / "teacher").rglob("*"))
                if p.is_file()]
    site_files = SIMULATED_SITE_FILES if ev.deployment is None else EVIDENCE_FILES
    entries += [(f"site {site.name} {SITE_FILE_LABELS.get(filename, filename)}", site.directory / filename)
                for site in ev.sites.values() for filename in site_files]
    return [{"name": name, "path": str(path.relative_to(run)),
             "sha256": file_sha256(path) if path.is_file() else "missing"} for name, path in entries]


def _signature(ledger: LedgerFile, role: str) -> dict[str, Any]:
    checkpoints = [e for e in ledger.events if e["kind"] == CHECKPOINT]
    last = checkpoints[-1] if checkpoints else None
    return {"signer_role": role, "signer": ledger.actor, "algorithm": "Ed25519",
            "key_fingerprint": key_fingerprint(ledger.public_key_pem),
            "head_seq": ledger.events[-1]["seq"] if ledger.events else None,
            "head_hash": ledger.events[-1]["hash"] if ledger.events else None,
            "checkpoints": len(checkpoints),
            "last_checkpoint": None if last is None else {
                "seq": last["seq"], "signed_seq": last["payload"]["signed_seq"],
                "signed_hash": last["payload"]["signed_hash"], "signature": last["payload"]["signature"]},
            "readable": ledger.error is None}


def _envelope(ev: RunEvidence, generated_at: datetime) -> dict[str, Any]:
    return {
        # Filled in last: the SHA-256 of the canonical JSON of the whole report without this field.
        "report_id": None,
        "generated_at": generated_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        "generator": {"name": "fedistill report", "version": _version_of("fedistill"), "git_commit": _git_commit()},
        "subjects": _subjects(ev),
        "signatures": [_signature(ev.coordinator, "coordinator")]
                      + [_signature(site.ledger, "site") for site in ev.sites.values()],
        "tsa_token": NOT_ASSESSED,
        "dsse_envelope": NOT_ASSESSED,
    }


# ------------------------------------------------------------------------------------------------ sections 2-4
def _run(ev: RunEvidence) -> dict[str, Any]:
    started = [e for e in ev.coordinator.events if e["kind"] == "run-started"]
    config, deployment = ev.config, ev.deployment
    return {
        "run_id": ev.run_id, "scenario": config.get("scenario"), "task": ev.task,
        "description": ev.summary.get("description") if ev.summary is not None else None,
        "mode": ("simulation: Flower's simulation engine, one virtual node per site" if deployment is None else
                 "deployment: Flower's deployment engine, a SuperLink at the coordinator and a SuperNode at every "
                 "site, launched by fedistill run"),
        "federation_name": NOT_ASSESSED,
        "flower_run_id": NOT_ASSESSED if deployment is None else str(deployment.get("flower_run_id")),
        "fab_hash": NOT_ASSESSED,
        "started_at": ev.coordinator.events[0]["time"] if ev.coordinator.events else None,
        "ended_at": ev.coordinator.events[-1]["time"] if ev.coordinator.events else None,
        "code_version": started[0]["payload"].get("code_version") if started else None,
        # A deployment records only the coordinator's code version (run-started), not the sites' packages.
        "versions": config.get("versions", {}) if deployment is None else not_assessed(
            "a deployed run records the coordinator's code version only; each site's package versions stay with "
            "the site"),
        # dp-accounting and cryptography are not recorded with the run: these are the verifier's own.
        "verifier_versions": {name: _version_of(name) for name in ("dp-accounting", "cryptography", "opacus")},
        "lockfile_hash": NOT_ASSESSED,
        "config_hash": config["config_hash"],
        "config_hash_recomputes": digest_json(ev.federation) == config["config_hash"],
        "config": ev.federation,
        **({"simulation": {key: config.get(key) for key in ("seed", "subsample", "site_caps", "accountant",
                                                            "fault_injection", "max_records_per_person")}}
           if deployment is None else {"deployment": deployment}),
        **_intended_use(ev.parties),
    }


def _declared(value: Any) -> Any:
    """A stated value as the ledger holds it, or why it is not assessed."""
    return NOT_STATED if value is None else value


def _intended_use(parties: dict[str, Any] | None) -> dict[str, Any]:
    """Section 2's fields that only the operator can state, from its signed parties declaration."""
    if parties is None:
        return {"parties_declaration": NO_PARTIES, "intended_purpose": NO_PARTIES, "intended_users": NO_PARTIES,
                "out_of_scope_uses": NO_PARTIES, "regimes_asserted": NO_PARTIES}
    content, use = parties["parties"], parties["parties"].get("intended_use", {})
    return {"parties_declaration": {"declared_in": "the coordinator's signed ledger (parties-declared)",
                                    "seq": parties["seq"], "digest": parties["digest"],
                                    "source_sha256": parties.get("source_sha256")},
            "intended_purpose": _declared(use.get("purpose")), "intended_users": _declared(use.get("users")),
            "out_of_scope_uses": _declared(use.get("out_of_scope")),
            "regimes_asserted": [{"key": key, "regime": REGIMES[key], **details}
                                 for key, details in content.get("regimes", {}).items()]}


PARTY_FIELDS = ("legal_entity", "role", "privacy_officer", "jurisdiction")


def _parties(ev: RunEvidence) -> dict[str, Any]:
    parties = ev.parties
    content = parties["parties"] if parties is not None else {}
    declared_sites = content.get("sites", {})

    def party(name: str, function: str, ledger: LedgerFile, declared: dict[str, Any] | None) -> dict[str, Any]:
        if parties is None:
            stated = dict.fromkeys(PARTY_FIELDS, NO_PARTIES)
        elif declared is None:
            stated = dict.fromkeys(PARTY_FIELDS, not_assessed(
                "parties.toml declares no [coordinator]" if name == "coordinator" else
                f"parties.toml declares no [sites.{name}]"))
        else:
            stated = {key: _declared(declared.get(key)) for key in PARTY_FIELDS}
        return {"name": name, "function": function, "key_fingerprint": key_fingerprint(ledger.public_key_pem),
                **stated}

    agreements = content.get("agreements")
    return {"declared_in": (f"the coordinator's signed ledger (parties-declared, seq {parties['seq']})"
                            if parties is not None else NO_PARTIES),
            "coordinator": party("coordinator", "aggregates the sites' updates; never holds a record",
                                 ev.coordinator, content.get("coordinator")),
            "sites": [party(s.name, "holds its records and its teacher; trains locally under DP-SGD", s.ledger,
                            declared_sites.get(s.name)) for s in ev.sites.values()],
            "agreements": NO_PARTIES if parties is None else agreements or not_assessed(
                "parties.toml cites no agreement"),
            # A consortium may declare more sites than take part in one run: named, so none is silently dropped.
            **({"declared_sites_not_in_run": sorted(set(declared_sites) - set(ev.sites))}
               if set(declared_sites) - set(ev.sites) else {})}


def _governance(accepted: dict[str, Any] | None) -> dict[str, Any]:
    """A site's records of processing, as its signed run-accepted event states them (site.toml [governance])."""
    governance = (accepted or {}).get("governance")
    if governance is None:
        return {"governance_declared_in": None, "categories_of_subjects_and_data": NO_GOVERNANCE,
                "lawful_basis": NO_GOVERNANCE, "deidentification": NO_GOVERNANCE, "erasure_schedule": NO_GOVERNANCE}

    def stated(key: str) -> Any:
        return GOVERNANCE_SILENT if governance.get(key) is None else governance[key]

    categories = ("data_subjects", "data_categories", "special_categories")
    method, reference = governance.get("deidentification"), governance.get("deidentification_reference")
    return {"governance_declared_in": f"the site's signed run-accepted event (seq {accepted['seq']})",
            "categories_of_subjects_and_data": {key: stated(key) for key in categories}
            if any(key in governance for key in categories) else GOVERNANCE_SILENT,
            "lawful_basis": stated("lawful_basis"),
            "deidentification": GOVERNANCE_SILENT if method is None else (f"{method} ({reference})" if reference
                                                                          else method),
            "erasure_schedule": stated("erasure")}


def _schema(splits: dict[str, Any], class_names: list[str], features: list[str] | None) -> dict[str, Any]:
    train = splits["train"]
    return {"inputs": {key: {"dtype": str(array.dtype), "shape_per_record": list(array.shape[1:])}
                       for key, array in sorted(train.inputs.items())},
            "labels": str(train.labels.dtype), "classes": class_names, "features": features}


def _person_bound(ev: RunEvidence, site: str) -> dict[str, Any]:
    """How many records one person has at a site: a simulation's summary says; a deployed site keeps it."""
    if ev.summary is None:
        return {"max_records_per_person": KEPT_AT_SITE, "bounded": KEPT_AT_SITE, "person_level": None}
    privacy = ev.summary["privacy"]["sites"].get(site, {})
    return {"max_records_per_person": privacy.get("max_records_per_person"),
            "bounded": bool(privacy.get("records_per_person_bounded")), "person_level": privacy.get("person_level")}


def _data_inventory(ev: RunEvidence) -> dict[str, Any]:
    # A deployment has no summary: what it would say about a site's data stays at the site.
    summary = ev.summary or {}
    provenance = summary.get("provenance", {})
    sites = {}
    for name, site in ev.sites.items():
        bound = _person_bound(ev, name)
        if is_not_assessed(bound["bounded"]):
            enforced = bound["bounded"]
        else:
            enforced = (f"at most {ev.config.get('max_records_per_person')} per person, enforced when the site's "
                        "training split was built" if bound["bounded"] else "not bounded")
        entry: dict[str, Any] = {
            "splits": summary["sites"].get(name, {}) if ev.summary is not None else KEPT_AT_SITE,
            "max_records_per_person": bound["max_records_per_person"],
            "records_per_person_enforced": enforced,
            **_governance(ev.accepted(site)),
            "data_dependent_preprocessing": NOT_ASSESSED,
        }
        data_path = site.directory / "data.npz"
        if data_path.is_file():
            splits = load_splits(data_path)
            schema = _schema(splits, summary.get("class_names", []), provenance.get("features"))
            entry |= {"data_digest": {split: data.digest() for split, data in splits.items()},
                      "schema": schema, "schema_digest": digest_json(schema),
                      "digests_computed": "by the report generator from the site's state directory (simulation); "
                                          "a deployed site computes them itself"}
        else:
            absent = NOT_ASSESSED if ev.deployment is None else KEPT_AT_SITE
            entry |= {"data_digest": absent, "schema_digest": absent}
        sites[name] = entry
    return {"sites": sites, "provenance": provenance if ev.summary is not None else KEPT_AT_SITE,
            "never_in_report": "records, labels and person ids: only counts and digests are reported"}


# ------------------------------------------------------------------------------------------------ section 5
def _data_flows(ev: RunEvidence) -> dict[str, Any]:
    rounds = list(range(1, int(ev.federation["rounds"]) + 1))
    sites: dict[str, Any] = {}
    bytes_per_round: dict[str, list[int]] = {}
    # Bytes on the wire (client/traffic.py): one "transfer" event per message a site answered, sizes only.
    stages = ("query", "train", "setup", "share-keys", "collect-masked-vectors", "unmask")
    wire_per_round: dict[str, dict[str, list[int]]] = {"in": {}, "out": {}}
    for name, site in ev.sites.items():
        updates = [{"round": e["payload"]["round"], "seq": e["seq"], "time": e["time"],
                    "payload_kind": e["payload"]["payload_kind"], "tensors": e["payload"]["tensors"],
                    "bytes": e["payload"]["bytes"], "digest": e["payload"]["digest"]}
                   for e in site.ledger.of_run(ev.run_id, "update-sent")]
        layouts = {json.dumps(u["tensors"], sort_keys=True) for u in updates}
        sent = {u["round"]: u["bytes"] for u in updates}
        cells: dict[tuple[Any, str], dict[str, Any]] = {}
        for event in site.ledger.of_run(ev.run_id, "transfer"):
            payload = event["payload"]
            cell = cells.setdefault((payload.get("round"), str(payload.get("stage"))), {
                "round": payload.get("round"), "stage": str(payload.get("stage")), "messages": 0, "bytes_in": 0,
                "bytes_out": 0, "errors": 0, "unmeasured": 0})
            cell["messages"] += 1
            cell["errors"] += int(bool(payload.get("error")))
            for key in ("bytes_in", "bytes_out"):
                if isinstance(payload.get(key), int):
                    cell[key] += payload[key]
                else:
                    cell["unmeasured"] += 1
        order = {stage: index for index, stage in enumerate(stages)}
        per_round_stage = sorted(cells.values(), key=lambda c: (c["round"] if isinstance(c["round"], int) else -1,
                                                                order.get(c["stage"], len(stages)), c["stage"]))
        for cell in per_round_stage:
            # The update leaves in the plain train reply or in SecAgg+'s collect stage: its payload bytes beside.
            carries_update = cell["stage"] in ("train", "collect-masked-vectors")
            cell["payload_bytes"] = sent.get(cell["round"]) if carries_update else None
        if per_round_stage:
            stage_names = sorted({c["stage"] for c in per_round_stage}, key=lambda s: (order.get(s, len(stages)), s))
            per_stage = [{"stage": stage, **{key: sum(c[key] for c in per_round_stage if c["stage"] == stage)
                                             for key in ("messages", "bytes_in", "bytes_out", "errors")}}
                         for stage in stage_names]
            per_round = [{"round": r, **{key: sum(c[key] for c in per_round_stage if c["round"] == r)
                                         for key in ("messages", "bytes_in", "bytes_out")},
                          "payload_bytes": sent.get(r, 0)} for r in rounds]
            wire: dict[str, Any] | str = {
                "per_round_stage": per_round_stage, "per_stage": per_stage, "per_round": per_round,
                "total_bytes_in": sum(c["bytes_in"] for c in per_round_stage),
                "total_bytes_out": sum(c["bytes_out"] for c in per_round_stage),
                "total_payload_bytes": sum(u["bytes"] for u in updates),
                "errors": sum(c["errors"] for c in per_round_stage),
                "unmeasured": sum(c["unmeasured"] for c in per_round_stage)}
            for direction in ("in", "out"):
                wire_per_round[direction][name] = [row[f"bytes_{direction}"] for row in per_round]
        else:
            wire = ("not recorded: the site's ledger has no transfer events for this run (they are written by "
                    "client.traffic.traffic_mod; older runs have none)")
        sites[name] = {
            "ledger": str(site.ledger.path.relative_to(ev.run_dir)),
            "ledger_error": site.ledger.error,
            "updates": updates,
            "refusals": [{"round": e["payload"]["round"], "seq": e["seq"], "reason": e["payload"]["reason"]}
                         for e in site.ledger.of_run(ev.run_id, "refusal")],
            # Every update of a run has one tensor layout (SecAgg+ needs it); listed once when it holds.
            "tensor_layout": updates[0]["tensors"] if len(layouts) == 1 else None,
            "total_bytes": sum(u["bytes"] for u in updates),
            "wire": wire,
            # The site's test evaluations of the student: a histogram each (noised, clear) or nothing (none).
            "test_evaluations": [{"round": e["payload"]["round"], "seq": e["seq"], "released": e["payload"]["released"],
                                  "noise_std": e["payload"]["noise_std"], "digest": e["payload"]["digest"]}
                                 for e in site.ledger.of_run(ev.run_id, TEST_EVALUATION_EVENT)],
        }
        bytes_per_round[name] = [sent.get(r, 0) for r in rounds]
    secure = bool(ev.federation.get("secure_aggregation"))
    causal = ev.task == CAUSAL_LM
    knowledge = _knowledge_flow(ev)
    return {
        "sites": sites, "rounds": rounds, "bytes_per_round": bytes_per_round,
        **({"knowledge": knowledge} if knowledge is not None else {}),
        **({"teacher_cache": _teacher_cache(ev, sites)} if causal else {}),
        "wire_bytes_per_round": wire_per_round,
        "wire_bytes_counted": "per message, as Flower's Fleet API carries it: the header and object tree, and every "
                              "distinct object's content (arrays, SecAgg+ public keys, encrypted shares, masked "
                              "vectors, unmasking shares, node ids, the instruction, metadata); not counted: the "
                              "per-request envelope (about 90 B per object), HTTP/2 or gRPC framing, TLS, "
                              "heartbeats, and messages a site never answered",
        "recipient": "the coordinator" + (" (only the SecAgg+ sum of the masked vectors)" if secure else ""),
        "came_back": "each round every accepting site receives the whole global student and the round's instruction "
                     "(plan, temperature, steps, run id, config hash)",
        "never_leaves": ["records, labels and person ids", "the teacher and its outputs",
                         "per-example gradients and the unmasked update" if secure else "per-example gradients",
                         "the site's DP noise secret (noise.key) and its ledger signing key"]
                        + (["the site's record count (it travels masked, as a weight)"] if secure else [])
                        + (["the teacher's top-k cache of the site's training texts (teacher_topk.npz)"] if causal
                           else [])
                        + (["the teacher's continuations of the site's training texts for sequence-level KD "
                            "(teacher_continuations.npz)"]
                           if causal and ev.federation["student"]["settings"].get("continuation_tokens") else []),
        "clear_metadata": ["whether the site took part in a round or refused it", "the site's own epsilon report",
                           "the site's ledger head (seq and hash), recorded in the coordinator's checkpoint"],
        "necessity_rationale": NOT_ASSESSED,
    }


def _knowledge_flow(ev: RunEvidence) -> dict[str, Any] | None:
    """A knowledge run's releases: soft labels on the registered proxy set, per site and round, and why each is
    private (each site's own ledger says; the values themselves are recorded nowhere, only their digest)."""
    knowledge = ev.federation.get("knowledge")
    if knowledge is None:
        return None
    releases = []
    for name, site in ev.sites.items():
        for event in site.ledger.of_run(ev.run_id, "update-sent"):
            release = event["payload"].get("knowledge") or {}
            own = release.get("own_student")
            student = ("the run's" if own is None else f"its own {own['spec']['family']} "
                       f"{own['spec']['settings'].get('hidden')} ({own['parameters']:,} parameters)")
            releases.append({"site": name, "round": event["payload"]["round"], "source": release.get("source"),
                             "student": student, "shape": release.get("shape"),
                             "temperature": release.get("temperature"), "digest": release.get("digest"),
                             "why_private": release.get("why_private")})
    travels = ("only the soft labels (no weights)" if knowledge["mode"] == "knowledge"
               else "the fragment update and the soft labels, in one masked vector")
    return {"mode": knowledge["mode"], "source": knowledge["source"], "proxy_digest": knowledge["proxy_digest"],
            "proxy_records": knowledge["proxy_records"], "classes": knowledge["classes"],
            "what_travels": f"each round each site sends {travels}: its temperature-{knowledge['temperature']:g} "
                            + (f"next-token probabilities of its {knowledge['classes'] - 1} shared tokens and one "
                               f"bucket for every other token at the {knowledge['proxy_positions']} real token "
                               f"positions of the {knowledge['proxy_records']} public proxy prompts"
                               if knowledge.get("proxy_positions") else
                               f"class probabilities on the {knowledge['proxy_records']} public proxy inputs")
                            + " (registered by SHA-256, checked by every site), summed under SecAgg+; the coordinator "
                            "distils the mean into the global student on the proxy inputs",
            "releases": releases}


TOPK_CACHE_STAYS = ("each site's teacher ran once on its own training texts, and its top-k targets (per real token "
                    "position: the k most likely token ids, their logit offsets and the tail bucket's logits) are "
                    "cached in the site's state directory and never sent; only their size and digest are reported")
CACHE_EVENT = "teacher-targets-cached"
CONTINUATIONS_EVENT = "teacher-continuations-cached"


def _teacher_cache(ev: RunEvidence, flows: dict[str, Any]) -> dict[str, Any] | str:
    """A causal-LM run's top-k caches, which stay at the sites: sizes and digests as the summary states them, the
    site's own ledger event that recorded the same digest, and what left the site per round beside them."""
    if ev.summary is None:
        return not_assessed(f"a deployed run has no summary.json; each site's ledger records its own cache's size and "
                            f"digest ({CACHE_EVENT})")
    facts = causal_lm_facts(ev.summary)
    sites = {}
    for name, site in ev.sites.items():
        cache, sent = facts["cache"].get(name, {}), facts["sent_per_round"].get(name, {})
        # The cache may have been computed in an earlier run (then reused): any event with its digest evidences it.
        recorded = [e for e in site.ledger.events if e["kind"] == CACHE_EVENT
                    and e["payload"].get("sha256") == cache.get("digest")]
        updates = [u["bytes"] for u in flows[name]["updates"]]
        continuation = (facts.get("continuations") or {}).get(name)
        generated = [e for e in site.ledger.events if e["kind"] == CONTINUATIONS_EVENT
                     and continuation and e["payload"].get("sha256") == continuation.get("digest")]
        sites[name] = {
            **cache,
            "ledger_event": ({"seq": recorded[-1]["seq"], "run_id": recorded[-1]["payload"].get("run_id"),
                              "sent": recorded[-1]["payload"].get("sent")} if recorded else
                             not_assessed(f"no {CACHE_EVENT} event in the site's ledger records this digest")),
            **({"continuations": {**continuation, "ledger_event": (
                {"seq": generated[-1]["seq"], "sent": generated[-1]["payload"].get("sent")} if generated else
                not_assessed(f"no {CONTINUATIONS_EVENT} event in the site's ledger records this digest"))}}
               if continuation else {}),
            "sent_per_round_bytes": sent.get("bytes"), "sent_per_round_tensors": sent.get("tensors"),
            # The summary's figure is a median over rounds: the ledger's update-sent events give the same median.
            "update_bytes_median_in_ledger": statistics.median(updates) if updates else None,
        }
    return {"stays_at_site": TOPK_CACHE_STAYS, "source": "summary.json, and each site's ledger", "sites": sites}


# ------------------------------------------------------------------------------------------------ section 6
def unprotected_quantities(secure_aggregation: bool, deployed: bool) -> list[str]:
    masked = " (only its SecAgg+ sum)" if secure_aggregation else ""
    return [
        "participation: which rounds a site took part in or refused (a refusal reveals a nearly spent budget)",
        # A deployment evaluates nothing centrally: besides the updates, the sites release their training loss.
        f"the training loss of each round, weighted over the sites{masked}, without noise" if deployed else
        "evaluation metrics, computed on the sites' validation and test records without noise",
        "the number of records: it sets the sampling rate and delta"
        + (" (masked under SecAgg+, stated in this report)" if secure_aggregation else " and is sent with the update"),
        "the teacher's own training data: the guarantee holds for the student update given a fixed teacher",
        "hyperparameter choices (learning rate, clipping norm, rounds): any tuning of them on the sites' data is "
        "outside the guarantee" if deployed else
        "hyperparameter choices (learning rate, clipping norm, rounds), chosen once on the hospitals scenario",
        "side channels: timing, message sizes, the per-round epsilon a site reports",
        "DP randomness from torch generators, not a CSPRNG (Opacus secure_mode needs torchcsprng, which has no "
        "build for current torch)",
    ]


TEACHER_TRAINING_DATA = ("public", "private-dp", "private")
NO_DECLARATION = not_assessed("absent: the site's run-accepted event holds no teacher declaration (runs recorded "
                              "before sites declared their teacher have none)")
# Why a teacher fine-tuned on a site's records without DP voids that site's record-level guarantee.
VOIDED_BY_TEACHER = ("DP-SGD on distillation targets protects a record only if that record cannot change the "
                     "targets of the other records, and a teacher fine-tuned on those records without DP lets every "
                     "record it saw change every target")


def teacher_declaration(accepted: dict[str, Any] | None, private: bool) -> dict[str, Any]:
    """What a site declared about its teacher in its signed ``run-accepted`` payload (``accepted``; None when the
    site never accepted the run), and what that does to its DP guarantee in a run that asks for DP (``private``).

    ``guarantee_void`` is True only when the site's record-level guarantee does not hold; None when the run
    states no DP guarantee or the declaration cannot tell.
    """
    declared = (accepted or {}).get("teacher")
    if not isinstance(declared, dict):
        return {"declared_in": NO_DECLARATION, "digest": NOT_ASSESSED, "training_data": NOT_ASSESSED,
                "acknowledged_non_dp": NOT_ASSESSED, "description": NOT_ASSESSED, "guarantee_void": None,
                "effect": not_assessed("without a declaration, the guarantee holds only for a teacher that does not "
                                       "depend on the site's training records") if private else
                "none: this run states no DP guarantee"}
    training_data = declared.get("training_data")
    acknowledged = declared.get("acknowledged_non_dp") is True
    void: bool | None = None
    if not private:
        effect = "none: this run states no DP guarantee"
    elif training_data == "public":
        void, effect = False, ("keeps the guarantee: a teacher trained on public data only does not depend on the "
                               "site's records")
    elif training_data == "private-dp":
        void, effect = False, ("keeps the student's guarantee; the teacher's own DP guarantee composes with it, and "
                               "the combined guarantee is the site's to state")
    elif training_data == "private":
        # Void whether or not the site acknowledged it (a DP run refuses an unacknowledged one): the cause is the
        # teacher, not the acknowledgement.
        void, effect = True, (f"VOIDS the site's record-level guarantee: {VOIDED_BY_TEACHER}"
                              + ("; the site acknowledged this when it accepted the run" if acknowledged else
                                 "; the site did not acknowledge this"))
    else:
        effect = not_assessed(f"unknown training_data {training_data!r} (one of {', '.join(TEACHER_TRAINING_DATA)} "
                              "was expected)")
    return {"declared_in": "the site's signed run-accepted event", "digest": declared.get("digest"),
            "training_data": training_data, "acknowledged_non_dp": acknowledged,
            "description": declared.get("description"), "guarantee_void": void, "effect": effect}


def _person_sentence(block: dict[str, Any], unit: str) -> str:
    person = block["contribution_bound"]
    k, level = person["max_records_per_person"], person["person_level"]
    if block.get("unit") == "person":
        most = "" if is_not_assessed(k) else f" (here up to {k})"
        return (f" The unit is the person: each Poisson-sampled unit is all of one person's {unit}s{most}, whose "
                "summed gradient is clipped as one, so the guarantee holds for the person without a group-privacy "
                "step.")
    if is_not_assessed(k):
        return (f" How many {unit}s one person has there is kept at the site, so the guarantee is stated for one "
                f"{unit}, not for a person.")
    if k == 1:
        return f" Each person has one {unit} there, so the guarantee is also person-level."
    if level is None:
        return ""
    group = f"({level['epsilon']:.4g}, {level['delta']:.2g})"
    if level.get("vacuous"):
        return (f" A person can have up to {k} {unit}s there, for whom group privacy gives {group}: VACUOUS (its "
                f"delta reaches 1, so it excludes nothing). The guarantee is {unit}-level only; a person-level run "
                "(privacy_unit = \"person\") would protect the person.")
    if person["bounded"]:
        return f" Each person has at most {k} {unit}s there, so by group privacy a person is protected at {group}."
    return (f" A person can have up to {k} {unit}s there, for whom group privacy gives only {group}: the guarantee is "
            f"{unit}-level, not person-level.")


def _teacher_sentence(teacher: dict[str, Any], unit: str) -> str:
    training_data = teacher["training_data"]
    if is_not_assessed(training_data):
        return (" Its run-accepted event declares nothing about its teacher, so whether the teacher depends on these "
                f"{unit}s is not evidenced.")
    if teacher["guarantee_void"]:
        acknowledged = "and acknowledged that" if teacher["acknowledged_non_dp"] else "without acknowledging that"
        return (f" Its teacher was trained on the site's private data without differential privacy (declared in its "
                f"signed run-accepted event, {acknowledged} this voids the guarantee): {VOIDED_BY_TEACHER}, so the "
                f"guarantee above does not hold for its {unit}s.")
    if training_data == "public":
        return " Its teacher was trained on public data only (declared), so the teacher does not weaken the guarantee."
    if training_data == "private-dp":
        return (" Its teacher was trained on private data under differential privacy (declared): the teacher's own "
                "guarantee composes with this one, and the combined guarantee is the site's to state.")
    return f" Its teacher declaration names training data {training_data!r}, which the report cannot interpret."


def dp_statement(site: str, block: dict[str, Any]) -> str:
    """The plain-language sentence of a site's DP block, generated from the block's own numbers only.

    A verifier regenerates it from report.json and compares: the words cannot drift from the numbers.
    """
    mechanism = block["mechanism"]
    if not block["rounds_joined"]:
        return (f"Site {site} sent no model update in this run, so no update computed from its records left it "
                "(its evaluation metrics did; see the unprotected quantities).")
    if block["epsilon_total"] == "inf":
        return (f"Site {site} trained without differential privacy (noise multiplier 0): the updates it sent carry "
                "no formal privacy guarantee.")
    # The item is a record, or a document for a causal LM; a person-level block counts persons.
    unit = block.get("item") or block["neighbouring_relation"].rsplit(" ", 1)[-1]
    counted = "person" if block.get("unit") == "person" else unit
    opening = (f"Site {site}'s {unit}-level differential-privacy guarantee is VOID because of its teacher (below); "
               f"the DP-SGD accounting alone would say that the updates it sent satisfy" if
               block["teacher"]["guarantee_void"] else f"The updates site {site} sent satisfy")
    sentence = (f"{opening} ({block['epsilon_total']:.4g}, {block['delta']:.2g})-differential privacy for "
                f"{block['unit_of_privacy']} ({mechanism['records']:,} {counted}s), "
                f"{block['neighbouring_relation'].replace('add or remove', 'adding or removing')}: "
                f"{mechanism['total_steps']} steps of Poisson-sampled DP-SGD (sampling rate "
                f"{mechanism['sample_rate']:.3g}, noise multiplier {mechanism['noise_multiplier']:.3g}, clipping norm "
                f"{mechanism['clipping_norm']:g}) over {len(block['rounds_joined'])} round(s)"
                + "".join(f", composed with the PATE release of round {release['round']} (the mean of "
                          f"{release['teachers']} teachers trained on disjoint partitions of its {unit}s by person, "
                          f"Gaussian noise of multiplier {release['noise_multiplier']:g} on an L2 sensitivity of "
                          f"{release['sensitivity_l2']:.4g})" for release in block.get("pate_releases", []))
                + "".join(f", composed with the noised release of its test evaluation after round {release['round']} "
                          f"(Gaussian noise of std {release['noise_multiplier']:g} on a histogram of L2 sensitivity "
                          f"{release['sensitivity_l2']:g})" for release in block.get("evaluation_releases", []))
                + ", accounted with "
                f"{block['accountant']['name'].upper()} ({block['accountant']['library']}).")
    return sentence + _person_sentence(block, unit) + _teacher_sentence(block["teacher"], unit)


def _site_privacy(ev: RunEvidence, site: SiteFiles, secure: bool) -> dict[str, Any]:
    # The calibration (target epsilon, sigma, q, delta) as the site's ledger signed it when it accepted the run;
    # verify checks privacy.json's copy against it.
    accepted = site.ledger.of_run(ev.run_id, "run-accepted")
    signed = accepted[0]["payload"].get("calibration") if accepted else None
    calibration = Calibration(**signed) if signed else None
    calibrated = asdict(calibration) if calibration else {}
    spends = site.privacy.run_spends(ev.run_id)
    steps = [s for s in spends if s.mechanism == "dp-sgd"]
    pate = [e["payload"] for e in site.ledger.of_run(ev.run_id, "pate-release")]
    evaluations = [e["payload"] for e in site.ledger.of_run(ev.run_id, TEST_EVALUATION_EVENT)]
    # The site's own choice: its policy, else the accountant it calibrated this run with.
    accountant = site.policy.accountant if site.policy else calibrated.get("accountant", "prv")
    delta = calibration.delta if calibration else None
    sent = site.ledger.of_run(ev.run_id, "update-sent")
    total = epsilon_of(spends, delta, accountant) if delta else (math.inf if spends else 0.0)
    # The last event that states the run's epsilon: an update, or a noised test evaluation after it.
    stating = [e for e in site.ledger.events if e["payload"].get("run_id") == ev.run_id and "epsilon_run" in e["payload"]
               and e["kind"] in ("update-sent", TEST_EVALUATION_EVENT)]
    recorded = stating[-1]["payload"]["epsilon_run"] if sent and stating else None
    audit = ev.audit.get("sites", {}).get(site.name, {})
    opacus = ev.config.get("versions", {}).get("opacus")
    item = RECORD_ITEMS.get(ev.task, RECORD_ITEMS[CLASSIFICATION])
    # The unit the site calibrated for (signed in its run-accepted event): a person, or one record (or document).
    level = calibration.unit if calibration else "record"
    block: dict[str, Any] = {
        "setting": "site-local DP-SGD: the site curates its own records and only clipped, noised updates leave it",
        "unit": level, "item": item,
        "unit_of_privacy": unit_of_privacy(level, item, "the site's"),
        "neighbouring_relation": (f"add or remove one person with all of their {item}s" if level == "person"
                                  else f"add or remove one {item}"),
        "contribution_bound": _person_bound(ev, site.name),
        "teacher": teacher_declaration(accepted[0]["payload"] if accepted else None,
                                       ev.federation.get("target_epsilon") is not None),
        "mechanism": {
            "name": "Poisson-sampled DP-SGD (Opacus make_private, poisson_sampling=True)",
            "clipping": ("flat L2 clipping of each sampled person's summed gradient (their per-record gradients "
                         "from Opacus's hooks, added up)" if level == "person" else "flat per-sample L2 clipping"),
            "clipping_norm": calibrated.get("max_grad_norm"),
            "grad_sample_mode": "hooks" if level == "person" else ev.federation.get("grad_sample_mode"),
            "noise_multiplier": calibrated.get("noise_multiplier"), "sample_rate": calibrated.get("sample_rate"),
            "expected_batch_size": calibrated.get("batch_size"), "records": calibrated.get("records"),
            "steps_per_round": ev.federation.get("local_steps"), "total_steps": sum(s.steps for s in steps),
            "empty_batches": sum(s.empty_batches for s in steps), "secure_mode": False,
            "calibrated_for": {key: calibrated.get(key) for key in ("target_epsilon", "planned_steps")},
        },
        "accountant": {"name": accountant, "library": f"opacus {opacus}" if opacus else
                       "opacus, version not recorded in a deployed run",
                       "replayed_with": f"dp-accounting {_version_of('dp-accounting')} (PLD)"},
        "delta": delta,
        "delta_rationale": (None if calibration is None else
                            f"at most 1/(10 n) = {1 / (10 * calibration.records):.2g} for n = {calibration.records} "
                            f"{level if level == 'person' else item}s, the site policy's delta and the run's "
                            "request"),
        "rounds_joined": [s.round for s in steps],
        "pate_releases": [{"round": release["round"], "teachers": release["teachers"],
                           "noise_multiplier": release["dp"]["noise-multiplier"],
                           "sensitivity_l2": release["sensitivity_l2"], "noise_std": release["noise_std"],
                           "partition": release["partition"], "digest": release["digest"]} for release in pate],
        "evaluation_releases": [{"round": e["round"], "released": e["released"],
                                 "noise_multiplier": e["dp"]["noise-multiplier"],
                                 "sensitivity_l2": e["dp"]["sensitivity_l2"], "digest": e["digest"]}
                                for e in evaluations if "dp" in e],
        "test_metrics_released": sorted({e["released"] for e in evaluations}),
        "epsilon_per_round": [{"round": e["payload"]["round"], "epsilon": e["payload"]["epsilon_run"],
                               "seq": e["seq"]} for e in sent],
        "epsilon_total": json_epsilon(total),
        "epsilon_recorded": recorded,
        "epsilon_replayed_pld": audit.get("epsilon_replayed"),
        "epsilon_lifetime": json_epsilon(site.privacy.epsilon(delta, accountant)) if delta else json_epsilon(total),
        "privacy_profile": [{"delta": d, "epsilon": json_epsilon(epsilon_of(spends, d, accountant))}
                            for d in PROFILE_DELTAS] if delta else [],
        "mu_gdp": NOT_ASSESSED,
        "budget": {"cap_per_run": site.policy.epsilon_per_run if site.policy else None,
                   "cap_lifetime": site.policy.epsilon_lifetime if site.policy else None,
                   "exceed_policy": "refuse the round before training: nothing is trained, spent or sent",
                   "refusals": [{"round": e["payload"]["round"], "reason": e["payload"]["reason"],
                                 "epsilon_run_after": e["payload"].get("epsilon_run_after")}
                                for e in site.ledger.of_run(ev.run_id, "refusal")]},
        "released_outputs": "every round's update (all iterates) reaches the coordinator"
                            + (" inside the SecAgg+ sum" if secure else "") + "; the statement covers all of them",
    }
    cap = block["budget"]["cap_per_run"]
    block["budget"]["within_cap"] = None if cap is None or _finite(total) is None else total <= cap * (1 + 1e-9)
    block["statement"] = dp_statement(site.name, block)
    return block


def _privacy(ev: RunEvidence) -> dict[str, Any]:
    secure = bool(ev.federation.get("secure_aggregation"))
    sites = {name: _site_privacy(ev, site, secure) for name, site in ev.sites.items()}
    spent = [b["epsilon_total"] for b in sites.values() if b["rounds_joined"]]
    finite = [e for e in spent if _finite(e) is not None]
    unbounded = "inf" in spent
    federation: dict[str, Any] = {
        "sites_that_sent_updates": len(spent),
        "max_epsilon": "inf" if unbounded else (max(finite) if finite else None),
        "median_epsilon": statistics.median(finite) if finite and not unbounded else ("inf" if unbounded else None),
        "warning": "epsilon adds up for a person present at several sites: each site accounts only for its own "
                   "records, so a patient seen at two sites is protected at most at the sum of their epsilons",
        "guarantee_void_at": [name for name, b in sites.items() if b["teacher"]["guarantee_void"]],
    }
    if unbounded:
        federation["statement"] = ("At least one site trained without differential privacy in this run; for its "
                                   "records the federation offers no formal guarantee.")
    elif finite:
        units = sorted({b["unit_of_privacy"].replace("the site's", "that site's") for b in sites.values()
                        if b["rounds_joined"]})
        federation["statement"] = (f"Across the {len(finite)} site(s) that sent updates, the largest epsilon is "
                                   f"{max(finite):.4g} and the median {statistics.median(finite):.4g}, each for "
                                   f"{' or '.join(units)} at its own delta; a person with records at several sites "
                                   "composes across them.")
    else:
        federation["statement"] = "No site sent an update in this run."
    knowledge = ev.federation.get("knowledge")
    if knowledge is not None:
        federation["knowledge_releases"] = (
            f"Soft labels ({knowledge['mode']} mode, source {knowledge['source']}) on the public proxy set: "
            + ("post-processing of each site's local student after its DP-SGD steps of the same round, so they add "
               "nothing to the epsilons above" if knowledge["source"] == "local-student" else
               "outputs of teachers the sites declared public, so they cost no epsilon" if knowledge["source"] ==
               "public-teacher" else
               f"each site's PATE release, made once: the mean of {knowledge['pate_teachers']} teachers trained on "
               "disjoint partitions of its records by person, with Gaussian noise of multiplier "
               f"{knowledge['pate_noise_multiplier']:g} on their summed probabilities (L2 sensitivity "
               f"{math.sqrt(2 * knowledge['proxy_records']):.4g}), composed with its DP-SGD steps in the epsilons "
               "above")
            + "; the coordinator received only their SecAgg+ mean.")
        federation["statement"] += " " + federation["knowledge_releases"]
    if federation["guarantee_void_at"]:
        federation["statement"] += (" The record-level guarantee is void at "
                                    f"{', '.join(federation['guarantee_void_at'])}: a teacher trained on the site's "
                                    "own records without differential privacy.")
    clear = [name for name, b in sites.items() if "clear" in b["test_metrics_released"]]
    unprotected = unprotected_quantities(secure, ev.deployment is not None)
    if clear:
        unprotected.append(f"the test evaluation histograms of {', '.join(clear)}: released in the clear by those "
                           "sites' policies (their test records' class and score bins, exact)")
    return {"target_epsilon": ev.federation.get("target_epsilon"), "sites": sites, "federation": federation,
            "unprotected_quantities": unprotected}


# ------------------------------------------------------------------------------------------------ sections 7-9
def _secure_aggregation(ev: RunEvidence) -> dict[str, Any]:
    f = ev.federation
    enabled = bool(f.get("secure_aggregation"))
    clipped: dict[str, int | str] = {}
    for name, site in ev.sites.items():
        path = site.directory / "secagg_clipping.json"
        if path.is_file():
            clipped[name] = sum(json.loads(path.read_text())["runs"].get(ev.run_id, {}).values())
        elif enabled and ev.deployment is not None:
            # The counts stay in the site's state directory: fedistill site evidence does not hand them over.
            clipped[name] = not_assessed(f"{path.name} is not part of a deployed site's evidence")
        else:
            clipped[name] = 0
    return {
        "enabled": enabled,
        "protocol": "Flower SecAgg+ (SecAggPlusWorkflow, secaggplus_mod)" if enabled else "none: plain aggregation",
        "parameters": {
            "num_shares": f.get("num_shares"), "reconstruction_threshold": f.get("reconstruction_threshold"),
            "clipping_range": f.get("clipping_range"), "quantization_range": f.get("quantization_range"),
            "quantization_step": 2 * f["clipping_range"] / f["quantization_range"],
            "weight_scale": f.get("weight_scale"), "min_cohort": f.get("min_cohort"),
            "modulus_range": NOT_ASSESSED, "timeout": NOT_ASSESSED,
        },
        "per_round": [{"round": r["round"], "status": r["status"], "aggregation": r.get("aggregation"),
                       "participants": r.get("participants", []), "failures": r.get("failures", {}),
                       "refusals": r.get("refusals", {}), "rejected": r.get("rejected", {}),
                       "aggregate_rejected": r.get("aggregate_rejected"),
                       "reason": r.get("reason"),
                       "min_cohort_met": len(r.get("participants", [])) >= f.get("min_cohort", 0) if enabled else None,
                       "quantization_error_bound": r.get("quantization_error_bound")} for r in ev.metrics],
        "clipped_values": clipped,
        "transport": _transport(ev),
        "caveat": "SecAgg+ hides each site's update from the coordinator but adds no differential privacy; with "
                  "very few sites, a site can infer the sum of the others' updates",
    }


TRANSPORT_ATTESTED = ("attested, not observed: fedistill run recorded the coordinator's certificates, SuperNode "
                      "authentication and registered site keys in the signed run-started event of the coordinator "
                      "ledger (seq 0); the run directory holds no record of the individual connections")


def _transport(ev: RunEvidence) -> dict[str, Any]:
    if ev.deployment is None:
        return {"tls": NOT_ASSESSED, "node_keys": NOT_ASSESSED, "note": SIMULATION_NOTE}
    if ev.transport is not None:
        return {"tls": ev.transport["tls"], "supernode_authentication": ev.transport["supernode_authentication"],
                "node_keys": ev.transport["registered_sites"],
                "runtime_dependency_installation": ev.transport.get("runtime_dependency_installation"),
                "note": TRANSPORT_ATTESTED}
    # What fedistill's coordinator enforces is known from its code, but this run's files do not record it.
    return {"tls": not_assessed("fedistill coordinator start serves the sites over TLS only (docs/deploy.md), but "
                                "the run directory holds no record of the connections, certificates or TLS version"),
            "node_keys": NODE_KEYS_ABSENT, "note": DEPLOYMENT_NOTE}


def _access_control(ev: RunEvidence) -> dict[str, Any]:
    return {
        "note": ev.scope_note,
        "principals": NOT_ASSESSED, "unique_user_ids": NOT_ASSESSED, "mfa": NOT_ASSESSED,
        "emergency_access": NOT_ASSESSED, "automatic_logoff": NOT_ASSESSED,
        "node_key_registrations": (NOT_ASSESSED if ev.deployment is None else NODE_KEYS_ABSENT
                                   if ev.transport is None else ev.transport["registered_sites"]),
        "ledger_signing_keys": [{"actor": ledger.actor, "key_fingerprint": key_fingerprint(ledger.public_key_pem)}
                                for ledger in [ev.coordinator, *(s.ledger for s in ev.sites.values())]],
    }


def _ledger_summary(ev: RunEvidence, ledger: LedgerFile) -> dict[str, Any]:
    events = ledger.events
    return {"actor": ledger.actor, "path": str(ledger.path.relative_to(ev.run_dir)), "events": len(events),
            "first_seq": events[0]["seq"] if events else None, "last_seq": events[-1]["seq"] if events else None,
            "head_hash": events[-1]["hash"] if events else None,
            "first_time": events[0]["time"] if events else None, "last_time": events[-1]["time"] if events else None,
            "checkpoints": sum(1 for e in events if e["kind"] == CHECKPOINT),
            "kinds": dict(sorted(Counter(e["kind"] for e in events).items())), "error": ledger.error}


def _audit_trail(ev: RunEvidence) -> dict[str, Any]:
    checkpoints = [{"seq": e["seq"], "round": e["payload"].get("round"), "signed_seq": e["payload"]["signed_seq"],
                    "student_digest": e["payload"].get("student_digest"),
                    "site_heads": len(e["payload"].get("site_heads", {}))}
                   for e in ev.coordinator.events if e["kind"] == CHECKPOINT]
    return {
        "scheme": "append-only JSON lines, one event per line (seq, UTC time, actor, kind, payload, prev_hash); each "
                  "event's hash is SHA-256 over its canonical JSON; an Ed25519-signed checkpoint ends every round; "
                  "each coordinator checkpoint records the ledger heads of the sites of that round "
                  "(protocols/ledger.py)",
        "ledgers": [_ledger_summary(ev, ev.coordinator)] + [_ledger_summary(ev, s.ledger) for s in ev.sites.values()],
        "coordinator_checkpoints": checkpoints,
        "cross_recorded_site_heads": sum(c["site_heads"] for c in checkpoints),
        "clock_source": NOT_ASSESSED, "retention": NOT_ASSESSED, "tsa_tokens": NOT_ASSESSED,
        "verification": ev.audit,
        "limits": "tamper-evident, not tamper-proof: an alteration after signing is detected; a record that was "
                  "incomplete or untrue when written is not",
    }


# ------------------------------------------------------------------------------------------------ sections 10-13
def _weights_check(ev: RunEvidence) -> dict[str, Any]:
    """Do the checkpointed weights hash to the student digest the last round recorded?"""
    path = ev.run_dir / "student" / "model.safetensors"
    recorded = ev.metrics[-1]["student_digest"] if ev.metrics else None
    if not path.is_file() or recorded is None:
        return {"check": "the checkpointed student weights hash to the last round's recorded student digest",
                "result": NOT_ASSESSED}
    actual = digest_arrays(load_file(str(path)))
    return {"check": "the checkpointed student weights hash to the last round's recorded student digest",
            "result": "ok" if actual == recorded else "failed", "recorded": recorded, "recomputed": actual}


def _checkpoint_parameters(ev: RunEvidence) -> int | str:
    """The student's parameters counted in its checkpoint (floating-point tensors: integer buffers such as
    position ids are not parameters), for a run whose summary does not state them."""
    path = ev.run_dir / "student" / "model.safetensors"
    if not path.is_file():
        return not_assessed(f"{path.relative_to(ev.run_dir)} is missing")
    return sum(int(array.size) for array in load_file(str(path)).values() if array.dtype.kind == "f")


CAUSAL_LM_LOSS = ("alpha * CE(next token) + (1 - alpha) * T^2 * D(teacher_T || student_T) over the teacher's top-k "
                  "tokens plus one tail bucket")
CAUSAL_LM_TRANSFER_SET = ("each site's own private training texts; the teacher's top-k targets computed once at the "
                          "site, cached in its state directory (digest in its ledger) and never sent")


def _perplexity_gaps(comparison: dict[str, Any]) -> list[str]:
    """The causal-LM caveats: federated perplexity as a multiple of the baselines' (lower is better)."""
    gaps = []
    centralized, undistilled = (_finite(comparison.get(key)) for key in ("federated_over_centralized",
                                                                         "federated_over_undistilled"))
    if centralized is not None:
        gaps.append(f"federated perplexity is {centralized:.4g} times the centrally distilled student's (non-private: "
                    "the cost of federation and DP here)")
    if undistilled is not None:
        gaps.append(f"federated perplexity is {undistilled:.4g} times the undistilled student's (the layer subset, "
                    "no KD: below 1, the distillation helped)")
    central_dp = _finite(comparison.get("federated_over_centralized_private"))
    if central_dp is not None:
        gaps.append(f"federated perplexity is {central_dp:.4g} times that of a student distilled centrally under DP at "
                    "the same epsilon (the cost of federation alone)")
    public_only = _finite(comparison.get("federated_over_public_only"))
    if public_only is not None:
        gaps.append(f"federated perplexity is {public_only:.4g} times the public-only student's (the coordinator's "
                    "stage on public text alone: below 1, the sites' private texts added to it)")
    return gaps


PUBLIC_STAGE_KEYS = ("public_texts", "public_tokens", "public_digest", "teacher_digest", "settings",
                     "trained_parameters", "mean_loss", "site_records_read", "epsilon")


def _causal_lm_stages(ev: RunEvidence) -> list[dict[str, Any]]:
    """The run's stages in order: the coordinator's public stage when the signed ledger records one, then the
    federated rounds (the only stage that reads site records and spends their budgets)."""
    base = ev.student_base or {}
    stages = []
    public = base.get("public_stage")
    if public:
        stages.append({"stage": "coordinator", "data": "public text only (no site record)",
                       "product": f"the base student, digest {base.get('digest')}",
                       **_pick(public, PUBLIC_STAGE_KEYS)})
    f = ev.federation
    stages.append({"stage": "federated", "data": "each site's private training texts, under its DP-SGD budget",
                   "starts_from": "the public stage's base student" if public else "the base student (no public stage)",
                   **{key: f.get(key) for key in ("rounds", "local_steps", "batch_size", "learning_rate")},
                   "fragments": "lora" if f.get("student", {}).get("settings", {}).get("lora") else "blocks"})
    return stages


COORDINATOR_STAGE_KEYS = ("public_records", "public_digest", "synthetic_records", "teacher_digest", "settings",
                          "trained_parameters", "mean_loss", "site_records_read", "epsilon", "student_digest")


def _classifier_stages(ev: RunEvidence) -> list[dict[str, Any]]:
    """The run's stages in order, from the signed ledger: the coordinator stage when there is one, then the
    federated rounds, each with what it read and where its epsilon was spent."""
    stages = []
    record = ev.coordinator_stage
    if record:
        stages.append({"stage": "coordinator", "data": "the public reference set, plus teacher-labelled "
                                                       "interpolations of its records (no site record)",
                       "product": f"the federated stage's starting student, digest {record.get('student_digest')}",
                       **_pick(record, COORDINATOR_STAGE_KEYS)})
    f = ev.federation
    federated = next((s for s in f.get("curriculum", []) if s["where"] == "federated"), {})
    continues = f.get("continues")
    split = "each site's private training split" if federated.get("records", "all") == "all" else (
        "the records of each site's training split it had not trained on in an earlier run"
        + (f", plus its replay buffer (earlier records whose teacher entropy is at least "
           f"{federated['replay_min_entropy']:g} of its maximum)" if federated.get("replay_min_entropy") is not None
           else ""))
    stages.append({"stage": "federated", "data": f"{split}, under its DP-SGD budget"
                                                 if f.get("target_epsilon") is not None else f"{split} (no DP)",
                   "starts_from": "the coordinator stage's student" if record else (
                       f"the final student of run {continues['run_id']} (digest {continues['student_digest']}), "
                       "which verified before this run started; its sites' lifetime budgets go on"
                       if continues else "a fresh student (seeded)"),
                   **{key: f.get(key) for key in ("rounds", "local_steps", "batch_size", "learning_rate")},
                   "fragments": federated.get("fragments") or "all",
                   "epsilon": f"per site, section {SECTION['privacy']}"})
    finished = [e["payload"] for e in ev.coordinator.events if e["kind"] == "run-finished"]
    if finished and "kept_round" in finished[-1]:
        scores = {e["payload"]["round"]: e["payload"]["score"] for e in ev.coordinator.events
                  if e["kind"] == "validation"}
        stages[-1]["kept_round"] = finished[-1]["kept_round"]
        stages[-1]["validation_by_round"] = {str(r): v for r, v in sorted(scores.items())}
        stages[-1]["kept_because"] = ("the best pooled validation ROC-AUC the sites released (aggregate figures on "
                                      "their validation records, not DP-protected; round 0 is the start)"
                                      if any(v is not None for v in scores.values()) else
                                      "no site released a validation score, so the last round is kept")
    local = [e["payload"] for e in ev.coordinator.events if e["kind"] == "site-local-stage"]
    if local:
        sites = local[-1]["sites"]
        stages.append({"stage": "site-local", "data": "each site's own training split, at the site alone",
                       "starts_from": f"the final federated student, digest {local[-1]['started_from']}",
                       "settings": local[-1]["stage"],
                       "what_left": "each site's test metrics of its own copy, where its policy releases them "
                                    "(aggregate figures on its own records, not DP-protected); the copy stays at the "
                                    "site",
                       "released_by": sorted(site for site, r in sites.items() if r.get("released")),
                       "withheld_by": sorted(site for site, r in sites.items() if not r.get("released")),
                       "released": {site: r for site, r in sites.items() if r.get("released")},
                       "epsilon": "none spent: nothing trained here leaves the site"})
    if ev.summary is not None:
        measured = {s["stage"]: s for s in ev.summary.get("stages", [])}
        for stage in stages:
            if stage["stage"] in measured:
                stage["evaluation"] = {"pooled_test_roc_auc": (measured[stage["stage"]]["evaluation"]
                                                               or {}).get("roc_auc"),
                                       "public_holdout_roc_auc": (measured[stage["stage"]].get("public_holdout")
                                                                  or {}).get("roc_auc")}
    return stages


def _causal_lm_teacher(size: dict[str, Any], facts: dict[str, Any], subjects: list[dict[str, Any]]) -> dict[str, Any]:
    latency = size.get("latency_ms_per_token")
    return {**facts["teacher"], "files": [s for s in subjects if s["path"].startswith("teacher/")],
            "size": {"measure": size.get("measure"), "teacher": size.get("teacher"), "student": size.get("student"),
                     "non_embedding_ratio": size.get("non_embedding_ratio"),
                     "teacher_file_bytes": size.get("teacher_file_bytes"),
                     "student_file_bytes": size.get("student_file_bytes"), "file_note": size.get("file_note"),
                     "latency_ms_per_token": latency if latency is not None else
                     not_assessed("the run did not measure latency")}}


def _model_card(ev: RunEvidence, subjects: list[dict[str, Any]], privacy: dict[str, Any]) -> dict[str, Any]:
    f = ev.federation
    # A deployed causal-LM run has no summary: its card is a deployed run's, like any other.
    facts = causal_lm_facts(ev.summary) if ev.task == CAUSAL_LM and ev.summary is not None else None
    caveats = [f"the teacher's own training data is outside the DP guarantee (section {SECTION['privacy']})"]
    caveats += [f"site {name} declared a teacher trained on its private records without DP: its record-level DP "
                f"guarantee is void (section {SECTION['privacy']})" for name in privacy["federation"]["guarantee_void_at"]]
    if ev.summary is None:
        caveats.append("the coordinator of a deployed run does not evaluate the student: its utility is not "
                       f"assessed here (section {SECTION['evaluation']})")
        parameters: int | str | None = _checkpoint_parameters(ev)
        teacher: dict[str, Any] = {"description": NO_TEACHER, "files": [], "size": NO_TEACHER}
        # The rounds as the coordinator timed them: a deployment trains nothing else.
        seconds = round(sum(r.get("seconds", 0.0) for r in ev.metrics), 3)
    else:
        size, summary = ev.summary.get("size", {}), ev.summary
        undefined = sorted(site for site, m in summary["models"]["federated"]["per_site"].items()
                           if m.get("undefined"))
        if undefined:
            caveats.append(f"metrics are undefined at {', '.join(undefined)} (a test split with a single class)")
        if facts is not None:
            caveats += _perplexity_gaps(summary["comparison"])
            parameters = size.get("student", {}).get("total")
            teacher = _causal_lm_teacher(size, facts, subjects)
        else:
            gap = summary.get("comparison", {}).get("federated_minus_centralized")
            if gap is not None:
                caveats.append(f"the federated student is {gap:+.4f} {summary.get('headline_metric')} against the "
                               "centralized distilled student (the cost of federation and DP here)")
            margin = summary.get("comparison", {}).get("federated_minus_public_only")
            if margin is not None:
                caveats.append(f"the federated student is {margin:+.4f} {summary.get('headline_metric')} against the "
                               "public-only student (the public reference set alone, no site data: "
                               + ("the sites' data added to it)" if margin > 0 else
                                  "below zero, federating did worse than not federating at all)"))
            parameters = size.get("student_parameters")
            teacher = {"description": summary.get("provenance", {}).get("teacher"),
                       "files": [s for s in subjects if s["path"].startswith("teacher/")],
                       "size": {"measure": size.get("measure"), "teacher": size.get("teacher"),
                                "student": size.get("student"), "ratio": size.get("ratio")}}
        seconds = summary.get("seconds")
    schedule = {key: f.get(key) for key in ("alpha", "temperature_schedule", "temperature_start", "temperature_end")}
    if facts is not None:
        distillation = {"loss": CAUSAL_LM_LOSS, **schedule,
                        **{key: facts[key] for key in ("divergence", "top_k", "temperatures", "tail", "max_length")},
                        "transfer_set": CAUSAL_LM_TRANSFER_SET + (
                            f"; each text followed by the {facts['continuation_tokens']} tokens the site's teacher wrote "
                            "after it (sequence-level KD: generated once, cached at the site, never sent)"
                            if facts.get("continuation_tokens") else ""),
                        "stages": _causal_lm_stages(ev)}
    else:
        distillation = {"loss": "alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)", **schedule,
                        "transfer_set": "each site's own private training split; teacher outputs computed at the "
                                        "site and never sent",
                        "stages": _classifier_stages(ev)}
    return {
        "model": {"name": f"{ev.run_id} student", "family": f["student"]["family"],
                  "settings": f["student"]["settings"], "parameters": parameters,
                  "weights": [s for s in subjects if s["path"].startswith("student/")],
                  "student_digest": ev.metrics[-1]["student_digest"] if ev.metrics else None},
        "teacher": teacher,
        "distillation": distillation,
        "strategy": {"aggregation": ("SecAgg+ weighted mean of fragment updates" if f.get("secure_aggregation")
                                     else "weighted mean of fragment updates (FedAvg)"),
                     **{key: f.get(key) for key in ("fragment_plan", "rounds", "local_steps", "batch_size",
                                                    "optimizer", "learning_rate", "max_update_norm", "seed")}},
        "training_data": ev.summary.get("provenance", {}) if ev.summary is not None else KEPT_AT_SITE,
        "compute_seconds": seconds,
        "caveats": caveats,
        **({"causal_lm": facts} if facts is not None else {}),
        **_model_governance(ev.parties),
    }


MODEL_RISK_FIELDS = ("model_owner", "risk_tier", "independent_validator", "inventory_id")


def _model_governance(parties: dict[str, Any] | None) -> dict[str, Any]:
    """The card's intended use (parties.toml [intended_use]) and, under SR 11-7, its model-risk entries."""
    if parties is None:
        return dict.fromkeys(("intended_use", "out_of_scope_uses", *MODEL_RISK_FIELDS), NO_PARTIES)
    content = parties["parties"]
    use, model_risk = content.get("intended_use", {}), content.get("regimes", {}).get("sr_11_7")
    return {"intended_use": _declared(use.get("purpose")), "out_of_scope_uses": _declared(use.get("out_of_scope")),
            # Model-risk entries belong to SR 11-7: where it is not declared they do not apply (not an open item).
            **{key: ("not applicable: SR 11-7 is not declared" if model_risk is None else
                     _declared(model_risk.get(key))) for key in MODEL_RISK_FIELDS}}


MODELS = (("teacher", "teacher"), ("federated", "federated student"),
          ("centralized_distilled", "centralized distilled student (non-private)"),
          ("centralized_labels_only", "centralized labels-only student (non-private)"),
          ("public_only", "public-only student (the public reference set alone; no site data)"))
METRICS = ("roc_auc", "accuracy", "macro_f1", "kappa")


SITE_EVALUATED = "federated student, as the sites evaluated it"


def _released(metrics: dict[str, Any] | None, names: list[str]) -> dict[str, Any]:
    return {m: (metrics or {}).get(m) for m in names}


def site_evaluation(ev: RunEvidence) -> dict[str, Any] | str:
    """What the sites released of their own test evaluations of the student (the coordinator's signed
    ``site-evaluation`` events): per evaluation, each site's release and metrics, and the pooled metrics."""
    events = [e["payload"] for e in ev.coordinator.of_run(ev.run_id, SITE_EVALUATION_EVENT)]
    if not events:
        return not_assessed("no site evaluated the student on its test split in this run (a causal-LM run, a run "
                            "with site_evaluation = false, or one recorded before sites evaluated)")
    evaluations = []
    for payload in events:
        sites = {site: {"released": r["released"], "noise_std": r["noise_std"], "weighted_by": r["weighted_by"],
                        **_released(r.get("metrics"), [*METRICS, "n"])} for site, r in payload["sites"].items()}
        pooled = payload["pooled"]
        evaluations.append({"round": payload["round"], "after_round": payload["after_round"],
                            "student_digest": payload["student_digest"], "bins": payload["bins"],
                            "sites": sites, "failures": payload["failures"], "rejected": payload["rejected"],
                            "pooled": {"sites": pooled["sites"], **_released(pooled, [*METRICS, "n"]),
                                       "noise_std_per_cell": pooled.get("noise_std_per_cell"),
                                       "noise_interval_90": pooled.get("noise_interval_90", {})}})
    releases = sorted({r["released"] for e in evaluations for r in e["sites"].values()})
    return {
        "method": ("after the scheduled rounds each site scored the student named by digest on its own test split and "
                   "released a histogram (binary: test records by true class and bin of the student's log-odds; "
                   "otherwise the confusion matrix), as its policy says: noised (Gaussian noise on every cell, "
                   "charged to its budget and in its epsilon above), clear (an unprotected quantity) or none; the "
                   "coordinator computed each site's metrics and the pooled ones from the sum of the histograms. "
                   "The ROC-AUC is binned (a tie within a bin counts one half); accuracy, macro-F1 and kappa are at "
                   "probability 0.5. In a person-level run each record weighs 1 / (its person's test records), so "
                   "the figures count persons."),
        "releases": releases, "evaluations": evaluations,
    }


def _deployed_evaluation(ev: RunEvidence, evaluated: dict[str, Any] | str) -> dict[str, Any]:
    """A deployed run's evaluation: the sites' own released test evaluations (the coordinator holds no data)."""
    per_round = [{"round": r["round"], "status": r["status"], "train_loss": r.get("train_loss")} for r in ev.metrics]
    if is_not_assessed(evaluated):
        return {"headline_metric": NOT_ASSESSED, "data": NO_EVALUATION, "overall": NO_EVALUATION,
                "per_site": NO_EVALUATION, "per_round": per_round, "baselines_reference": NO_EVALUATION,
                "comparison": NO_EVALUATION, "site_evaluation": evaluated, "confidence_intervals": NOT_ASSESSED,
                "empirical_privacy_audit": NOT_ASSESSED}
    final = evaluated["evaluations"][-1]
    by_round = {e["after_round"]: e["pooled"] for e in evaluated["evaluations"]}
    for row in per_round:
        row |= _released(by_round.get(row["round"]), list(METRICS))
    noisy = "noised" in evaluated["releases"]
    return {
        "headline_metric": "roc_auc", "metrics": list(METRICS), "lower_is_better": [],
        "data": f"the sites' own held-out test splits, evaluated at the sites after round {final['after_round']}; "
                + evaluated["method"],
        "overall": [{"model": SITE_EVALUATED + (" (noised)" if noisy else ""),
                     **_released(final["pooled"], list(METRICS))}],
        "per_site": {site: [{"model": SITE_EVALUATED + f" ({release['released']})",
                             **_released(release, list(METRICS))}] for site, release in final["sites"].items()},
        "per_round": per_round,
        "baselines_reference": not_assessed("a deployed run trains no baseline (the coordinator holds no data)"),
        "comparison": not_assessed("a deployed run trains no baseline or teacher comparison"),
        "site_evaluation": evaluated,
        "confidence_intervals": (f"the noise alone: {final['pooled']['noise_interval_90']} (5th and 95th percentiles "
                                 "with the noise re-drawn on the released histograms); sampling error is "
                                 + NOT_ASSESSED) if noisy else NOT_ASSESSED,
        "empirical_privacy_audit": NOT_ASSESSED,
    }


def _evaluation(ev: RunEvidence) -> dict[str, Any]:
    evaluated = site_evaluation(ev)
    if ev.summary is None:
        return _deployed_evaluation(ev, evaluated)
    summary, models = ev.summary, ev.summary["models"]
    causal = ev.task == CAUSAL_LM
    # A causal-LM summary names its metrics (in display order) and its models; no site trains a local-only student.
    metrics = list(summary["metrics"]) if causal else list(METRICS)
    labelled = list(summary["model_labels"].items()) if causal else [(k, label) for k, label in MODELS if k in models]
    overall = [{"model": label, **{m: models[key]["overall"].get(m) for m in metrics}} for key, label in labelled]
    if not causal:
        local = models["local_only"]
        overall.append({"model": "local-only students (non-private), mean", **{
            m: local[m]["mean"] if local.get(m) else None for m in metrics}})
    if not causal and not is_not_assessed(evaluated):
        # What a deployed run would report of the same student: the sites' released histograms, pooled.
        final = evaluated["evaluations"][-1]
        overall.append({"model": SITE_EVALUATED + f" ({', '.join(evaluated['releases'])})",
                        **_released(final["pooled"], metrics)})
    per_site = {}
    for site in ev.sites:
        rows = [{"model": label, **{m: models[key]["per_site"].get(site, {}).get(m) for m in metrics},
                 **({"tokens": models[key]["per_site"].get(site, {}).get("tokens")} if causal else {})}
                for key, label in labelled]
        if not causal:
            own = local["per_site"].get(site, {}).get("per_site", {}).get(site, {})
            rows.append({"model": "this site's local-only student", **{m: own.get(m) for m in metrics}})
        per_site[site] = rows
    # A round recorded without a metric (an evaluator that did not compute it) shows None, never a guess.
    per_round = [{"round": r["round"], "status": r["status"], "train_loss": r.get("train_loss"),
                  **{m: (r.get("evaluation") or {}).get("overall", {}).get(m) for m in metrics}} for r in ev.metrics]
    headline = summary.get("headline_metric", "roc_auc")
    return {
        "headline_metric": summary.get("headline_metric"),
        "metrics": metrics, "lower_is_better": list(summary.get("lower_is_better", [])),
        "data": ("the sites' held-out test texts (newest by time); perplexity over every predicted real token, pooled "
                 "by token" if causal else
                 "the sites' held-out test splits, pooled for the overall figures; the decision threshold is chosen "
                 "once per model on the pooled validation splits"),
        "overall": overall, "per_site": per_site, "per_round": per_round,
        "baselines_reference": {key: models[key]["overall"].get(headline) for key, _ in labelled if key != "federated"},
        "comparison": summary.get("comparison", {}),
        # The same figures a deployed run reports, through the same messages (a simulation computes both).
        "site_evaluation": evaluated,
        "confidence_intervals": NOT_ASSESSED, "empirical_privacy_audit": NOT_ASSESSED,
    }


def _risk() -> dict[str, Any]:
    return {"dpia": NOT_ASSESSED, "ai_act_risk_management": NOT_ASSESSED, "hipaa_risk_analysis": NOT_ASSESSED,
            "residual_risks": NOT_ASSESSED,
            "anonymity_claim": "none: the report does not claim the student is anonymous (that would need "
                               "extraction and membership-inference evidence, which the run does not hold)"}


def _lineage(ev: RunEvidence, weights: dict[str, Any]) -> dict[str, Any]:
    return {"parent_model": f"none: the student is initialised from seed {ev.federation.get('seed')}",
            "parent_report": "none",
            "student_digest_per_round": [{"round": r["round"], "status": r["status"],
                                          "student_digest": r.get("student_digest")} for r in ev.metrics],
            "final_weights_check": weights,
            "config_diff": NOT_ASSESSED, "substantial_modification": NOT_ASSESSED}


# ------------------------------------------------------------------------------------------------ section 15
def _verification(ev: RunEvidence, privacy: dict[str, Any], weights: dict[str, Any],
                  config_recomputes: bool) -> dict[str, Any]:
    run = str(ev.run_dir)
    audit = ev.audit
    if "failure" in audit:
        checks = [{"check": "fedistill verify (stops at the first failure)", "result": "failed",
                   "detail": audit["failure"]}]
    else:
        checks = [{"check": text, "result": "ok"} for text in audit["checks"]] + [
            {"check": "the run is complete (a signed run-finished event)", "result": "incomplete", "detail": text}
            for text in audit.get("incomplete", [])]
    report_checks = [{"check": "config.json's config_hash is the hash of its federation section",
                      "result": "ok" if config_recomputes else "failed"}, weights]
    for name, block in privacy["sites"].items():
        recomputed, recorded = _finite(block["epsilon_total"]), _finite(block["epsilon_recorded"])
        if not block["rounds_joined"]:
            result = "ok" if block["epsilon_recorded"] is None else "failed"
        elif recomputed is None or recorded is None:
            result = "ok" if block["epsilon_total"] == block["epsilon_recorded"] == "inf" else "failed"
        else:
            result = "ok" if abs(recomputed - recorded) <= EPSILON_TOLERANCE * max(recorded, 1e-9) else "failed"
        report_checks.append({"check": f"site {name}: epsilon recomputed from privacy.json with Opacus matches the "
                                       f"epsilon its ledger recorded (within {EPSILON_TOLERANCE:.0%})",
                              "result": result})
    return {
        "tool": {"name": "fedistill verify", "version": _version_of("fedistill")},
        "commands": [f"fedistill verify {run}", f"fedistill verify {run} --format json",
                     *(f"fedistill site report {run}/sites/{name} --format json" for name in ev.sites),
                     f"cd {run} && sha256sum <path>   # for each subject of section {SECTION['envelope']}"],
        "verified": bool(audit["verified"]), "status": audit.get("status", "failed"), "checks": checks,
        "report_checks": report_checks,
        "not_machine_checked": [
            f"section {SECTION['run']}: intended purpose, users and regimes asserted (the operator's parties.toml, "
            "signed into the coordinator's ledger: the signature shows who declared them, not that they are true)",
            f"section {SECTION['parties']}: legal entities, roles, privacy officers, jurisdictions and agreements "
            "(declared, as above)",
            f"section {SECTION['data_inventory']}: data categories, lawful basis, de-identification and erasure (each "
            "site's declaration in its run-accepted event); the data digests cannot be checked without the records",
            f"section {SECTION['data_flows']}: the never-leaves list, a property of the code (client/train.py), not of "
            "the ledgers",
            f"section {SECTION['privacy']}: the setting, trust model and unprotected quantities (narrative)",
            f"section {SECTION['secure_aggregation']}: transport security (TLS) and SecAgg+ parameters Flower does not "
            "record",
            f"section {SECTION['access_control']}: access control and authentication of people",
            f"section {SECTION['audit_trail']}: clock source and retention",
            f"section {SECTION['model_card']}: owner, risk tier, validator (declared under SR 11-7 where it is)",
            f"section {SECTION['evaluation']}: evaluation metrics need the sites' test records to recompute; reported "
            "as the simulation computed them" if ev.summary is not None else f"section {SECTION['evaluation']}: the "
            "training loss per round, as the sites reported it (a deployed run has no coordinator-side evaluation)",
            f"sections {SECTION['risk']}-{SECTION['lineage']}: DPIA, risk management, substantial modification",
            f"section {SECTION['crosswalk']}: the adequacy of the evidence for each clause, and whether the declared "
            "regimes are all that apply",
            "completeness and truth at capture: a ledger shows that nothing changed after signing, not that what was "
            "written was complete or true",
            "sign-offs by privacy officers, security officer, validator and operator are not part of a generated "
            "report",
        ],
    }


# ------------------------------------------------------------------------------------------------ the report
def build_report(run_dir: Path) -> dict[str, Any]:
    """``report.json`` of a run directory: every section of the outline, from the run's evidence only."""
    return report_of(load_evidence(run_dir))


def report_of(ev: RunEvidence) -> dict[str, Any]:
    """``report.json`` of evidence already read (:func:`load_evidence`)."""
    envelope = _envelope(ev, datetime.now(timezone.utc))
    subjects = envelope["subjects"]
    weights = _weights_check(ev)
    run = _run(ev)
    privacy = _privacy(ev)
    built: dict[str, Any] = {
        "envelope": envelope,
        "run": run,
        "parties": _parties(ev),
        "data_inventory": _data_inventory(ev),
        "data_flows": _data_flows(ev),
        "privacy": privacy,
        "secure_aggregation": _secure_aggregation(ev),
        "access_control": _access_control(ev),
        "audit_trail": _audit_trail(ev),
        "model_card": _model_card(ev, subjects, privacy),
        "evaluation": _evaluation(ev),
        "risk": _risk(),
        "lineage": _lineage(ev, weights),
        "verification": _verification(ev, privacy, weights, run["config_hash_recomputes"]),
    }
    sections = [{"key": key, "number": number, "title": title} for key, number, title in SECTIONS]
    # The crosswalk, then the summary, are derived from the sections above only, so a verifier recomputes both.
    built["crosswalk"] = crosswalk_of({"sections": sections, **built})
    built["summary"] = summary_of({"sections": sections, **built})
    # In the outline's order: the summary first, the envelope (files and hashes) last.
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "sections": sections,
                              **{key: built[key] for key, _, _ in SECTIONS}}
    envelope["report_id"] = report_id(report)
    return report

