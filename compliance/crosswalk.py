"""The regulatory crosswalk of a report: one row per clause of each regime the federation declared.

It is derived from the other sections of report.json only (as the summary is), so a verifier recomputes it with
:func:`crosswalk_of`. The regimes come from ``run.regimes_asserted``, which the report reads from the operator's
``parties-declared`` event in the coordinator's signed ledger: an undeclared regime has no row, and a run without a
parties declaration maps nothing and says so. Each row names the clause, the sections that answer it, its evidence
(JSON pointers into report.json and the files, with their SHA-256, it rests on), a status and its basis. The
presence of evidence is machine-checked; its adequacy is for the privacy officer and counsel. Not legal advice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compliance.assessed import NOT_ASSESSED, is_not_assessed

STATUSES = ("met", "partial", "not met", NOT_ASSESSED, "not applicable")
NOTE = ("presence of evidence is machine-checked; its adequacy is a judgement for the privacy officer and counsel, "
        "and the report is not legal advice")
NO_REGIME = ("no regime declared: the run has no parties declaration (the coordinator's signed ledger records no "
             "parties-declared event), so no clause is mapped; give the run a parties.toml naming its regimes "
             "(fedistill simulate --parties, or run.toml parties)")
# The AI Act's high-risk requirements (Chapter III, Section 2) that follow from a high-risk classification.
HIGH_RISK_ARTICLES = (9, 10, 11, 12, 13, 14, 15)
AI_ACT_CLASSES = {
    "credit-scoring": ("high-risk", "Annex III point 5(b): evaluating the creditworthiness of natural persons or "
                                    "establishing their credit score (Art. 6(2))"),
    "medical-device": ("high-risk", "Art. 6(1) and Annex I: the model is, or is a safety component of, a medical "
                                    "device under Regulation (EU) 2017/745 or 2017/746 that needs a third-party "
                                    "conformity assessment"),
    "other": ("not high-risk", "the declared use is neither listed in Annex III nor a product under Annex I"),
}


def _names(path: str, pattern: str) -> bool:
    """``student/`` names a folder; ``ledger.jsonl`` names the coordinator's file and every site's."""
    if pattern.endswith("/"):
        return path.startswith(pattern)
    return path == pattern or path.endswith("/" + pattern)


class _Facts:
    """What the rows rest on, read once from the report's other sections."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.number = {entry["key"]: entry["number"] for entry in report["sections"]}
        self.subjects = report["envelope"]["subjects"]
        run, verification = report["run"], report["verification"]
        self.verified = bool(verification["verified"])
        self.intact = self.verified and report["lineage"]["final_weights_check"]["result"] == "ok"
        self.private = report["privacy"]["target_epsilon"] is not None
        self.secure = bool(report["secure_aggregation"]["enabled"])
        self.flows_readable = all(s["ledger_error"] is None for s in report["data_flows"]["sites"].values())
        transport = report["secure_aggregation"]["transport"]
        # Attested by the coordinator's signed run-started event, and only trusted when the run verifies.
        self.attested = transport if self.verified and "supernode_authentication" in transport else None
        self.scope_note = report["access_control"]["note"]
        failure = report["audit_trail"]["verification"].get("failure")
        self.failure = f"verification failed: {failure}"
        self.simulated = "simulation" in run
        overall = report["evaluation"]["overall"]
        self.evaluated = not is_not_assessed(overall)
        self.unevaluated = "" if self.evaluated else f"; evaluation is {overall}"
        self.parties = [report["parties"]["coordinator"], *report["parties"]["sites"]]
        self.inventory = report["data_inventory"]["sites"]
        self.purpose = run["intended_purpose"]
        self.governed = any(not is_not_assessed(site.get("lawful_basis")) for site in self.inventory.values())

    def sections(self, *keys: str) -> list[int]:
        return [self.number[key] for key in keys]

    def evidence(self, pointers: list[str], *patterns: str) -> dict[str, Any]:
        """Where in report.json, and which files (with their digests), a row rests on; a file the run lacks is
        never cited."""
        return {"report": pointers,
                "files": [{"path": s["path"], "sha256": s["sha256"]} for s in self.subjects
                          if s["sha256"] != "missing" and any(_names(s["path"], p) for p in patterns)]}

    def stated(self, field: str, of: str = "sites") -> tuple[list[str], list[str]]:
        """(who stated ``field``, who did not): every party of the run, or every site's data inventory."""
        if of == "parties":
            entries = [(party["name"], party.get(field)) for party in self.parties]
        else:
            entries = [(name, site.get(field)) for name, site in self.inventory.items()]
        return ([name for name, value in entries if not is_not_assessed(value)],
                [name for name, value in entries if is_not_assessed(value)])


def _missing(label: str, names: list[str]) -> str:
    return f"{label} is {NOT_ASSESSED} for {', '.join(names)}" if names else ""


def _joined(parts: list[str]) -> str:
    return "; ".join(part for part in parts if part)


Row = dict[str, Any]
NONE: dict[str, Any] = {"report": [], "files": []}
LEDGERS = ("ledger.jsonl", "ledger_key.pub.pem")


def _row(regime: str, clause: str, requirement: str, sections: list[int], evidence: dict[str, Any], status: str,
         basis: str) -> Row:
    return {"regime": regime, "clause": clause, "requirement": requirement, "sections": sections,
            "evidence": evidence, "status": status, "basis": basis}


def _access_row(f: _Facts, regime: str, clause: str, requirement: str) -> Row:
    return _row(regime, clause, requirement, f.sections("access_control"), NONE, NOT_ASSESSED, f.scope_note)


def _audit_row(f: _Facts, regime: str, clause: str, requirement: str, met_basis: str) -> Row:
    return _row(regime, clause, requirement, f.sections("audit_trail", "verification"),
                f.evidence(["#/audit_trail"], *LEDGERS), "met" if f.verified else "not met",
                met_basis if f.verified else f.failure)


def _transmission_row(f: _Facts, regime: str, clause: str, requirement: str) -> Row:
    secure, attested = f.secure, f.attested
    return _row(regime, clause, requirement, f.sections("secure_aggregation"),
                f.evidence(["#/secure_aggregation"], "config.json", *(LEDGERS if attested else ()))
                if secure or attested else NONE,
                "met" if secure and attested else "partial" if secure or attested else NOT_ASSESSED,
                ("updates travel masked by SecAgg+; " if secure else "") + (
                    "every connection is TLS under the consortium CA (attested in the coordinator's signed "
                    "run-started event)" if attested else f"TLS is {NOT_ASSESSED}: " + f.scope_note))


def _hipaa(f: _Facts, regime: dict[str, Any]) -> list[Row]:
    name = regime["regime"]
    deidentified, undeclared = f.stated("deidentification")
    return [
        _access_row(f, name, "45 CFR 164.312(a)(1)-(2)", "access control: unique user IDs, emergency access, "
                    "automatic logoff, encryption"),
        _audit_row(f, name, "45 CFR 164.312(b)", "audit controls that record and examine activity",
                   "every site and the coordinator keep a signed, hash-chained ledger; fedistill verify examined "
                   "them"),
        _row(name, "45 CFR 164.312(c)(1)-(2)", "integrity: protection against improper alteration, and a "
             "mechanism to corroborate it", f.sections("envelope", "audit_trail", "lineage", "verification"),
             f.evidence(["#/envelope/subjects", "#/lineage/final_weights_check"], *LEDGERS, "student/"),
             "met" if f.intact else "not met",
             "ledgers verify and the checkpointed weights hash to the recorded student digest" if f.intact else
             (f.failure if not f.verified else "the checkpointed weights do not hash to the recorded student "
                                                "digest")),
        _row(name, "45 CFR 164.312(d)", "person or entity authentication", f.sections("parties", "access_control"),
             f.evidence(["#/parties", "#/access_control"], *LEDGERS), "met" if f.attested else "partial",
             "each actor signs its own ledger with its own Ed25519 key; " + (
                 f"only SuperNodes holding one of the {len(f.attested['node_keys'])} registered site keys may join "
                 "(attested in the coordinator's signed run-started event)" if f.attested else
                 f"node authentication (SuperNode keys, mTLS) is {NOT_ASSESSED}: " + f.scope_note)),
        _transmission_row(f, name, "45 CFR 164.312(e)(1)-(2)", "transmission security: integrity controls and "
                          "encryption in transit"),
        _row(name, "45 CFR 164.316(b)(2)", "documentation retained 6 years", f.sections("audit_trail"), NONE,
             NOT_ASSESSED, "the run records no retention policy for its ledgers and this report"),
        _row(name, "45 CFR 164.514(b)", "de-identification of what leaves a site", f.sections("data_inventory",
                                                                                               "data_flows"),
             f.evidence(["#/data_inventory", "#/data_flows"], "ledger.jsonl") if deidentified else NONE,
             "partial" if deidentified else NOT_ASSESSED,
             _joined([f"each site's signed run-accepted event states how its records are de-identified "
                      f"({', '.join(deidentified)})" if deidentified else "", _missing("de-identification", undeclared),
                      "what leaves a site is a clipped, noised update (section "
                      f"{f.number['data_flows']}): DP is not a named 164.514(b) path, though an expert determination "
                      "may rely on it"])),
    ]


def _gdpr(f: _Facts, regime: dict[str, Any]) -> list[Row]:
    name = regime["regime"]
    contacts = [p["name"] for p in f.parties if is_not_assessed(p.get("privacy_officer"))
                or is_not_assessed(p.get("legal_entity"))]
    jurisdictions = [p["name"] for p in f.parties if is_not_assessed(p.get("jurisdiction"))]
    _, no_categories = f.stated("categories_of_subjects_and_data")
    _, no_erasure = f.stated("erasure_schedule")
    bases, no_basis = f.stated("lawful_basis")
    purpose = not is_not_assessed(f.purpose)
    records_complete = not (contacts or jurisdictions or no_categories or no_erasure) and purpose
    inventory = ["#/data_inventory"] if f.simulated or f.governed else []
    agreements = f.report["parties"]["agreements"]
    arrangements = [a for a in agreements if "26" in a["kind"] or "28" in a["kind"]] if isinstance(agreements, list) \
        else []
    return [
        _row(name, "Art. 5(1)(c), 5(2)", "data minimisation and accountability: what left each site and why",
             f.sections("data_flows", "privacy"),
             f.evidence(["#/data_flows"], "ledger.jsonl") if f.flows_readable else NONE,
             "partial" if f.flows_readable else NOT_ASSESSED,
             ("what left each site each round is enumerated from its own signed ledger; the necessity rationale "
              f"is {NOT_ASSESSED}") if f.flows_readable else "a site ledger could not be read"),
        _row(name, "Art. 6(1), 9(2)", "lawful basis of the processing, and the condition for special categories",
             f.sections("data_inventory"), f.evidence(["#/data_inventory"], "ledger.jsonl") if bases else NONE,
             "met" if bases and not no_basis else "partial" if bases else NOT_ASSESSED,
             _joined([f"stated in the signed run-accepted event of {', '.join(bases)}" if bases else "",
                      _missing("the lawful basis", no_basis)])),
        _row(name, "Art. 25", "data protection by design and by default", f.sections("privacy", "secure_aggregation"),
             f.evidence(["#/privacy", "#/secure_aggregation"], "config.json", "policy.json"),
             "met" if f.private and f.secure else ("partial" if f.private or f.secure else "not met"),
             "local training; DP-SGD at every site" + (" (on)" if f.private else " (off in this run)")
             + "; SecAgg+" + (" (on)" if f.secure else " (off in this run)") + "; both are the defaults"),
        _row(name, "Art. 26, 28", "arrangements between joint controllers, and processor contracts",
             f.sections("parties"), f.evidence(["#/parties/agreements"], "ledger.jsonl") if arrangements else NONE,
             "partial" if arrangements else NOT_ASSESSED,
             f"the operator cites {', '.join(a['id'] for a in arrangements)} (section {f.number['parties']}); the "
             "documents themselves are not part of the run" if arrangements else
             "the parties declaration cites no Art. 26 arrangement or Art. 28 contract"),
        _row(name, "Art. 30(1)(a)-(g)", "records of processing",
             f.sections("run", "parties", "data_inventory", "data_flows"),
             f.evidence(["#/run", "#/parties", *inventory, "#/data_flows"], "config.json", "ledger.jsonl"),
             "met" if records_complete else "partial",
             _joined(["recipients (section " f"{f.number['data_flows']}) and security measures (sections "
                      f"{f.number['privacy']}, {f.number['secure_aggregation']}, {f.number['audit_trail']}) are "
                      "evidenced",
                      "" if purpose else f"the purpose is {NOT_ASSESSED}",
                      _missing("the controller's or DPO's contact", contacts),
                      _missing("the jurisdiction (for transfers)", jurisdictions),
                      _missing("the categories of subjects and data", no_categories),
                      _missing("the erasure time limit", no_erasure),
                      "whether a transfer between the declared jurisdictions is to a third country is counsel's "
                      "judgement" if not jurisdictions else ""])),
        _row(name, "Art. 32(1)(a)-(d)", "security of processing: encryption, confidentiality and integrity, restore, "
             "regular testing", f.sections("privacy", "secure_aggregation", "audit_trail", "verification"),
             f.evidence(["#/privacy", "#/secure_aggregation", "#/verification"], *LEDGERS, "privacy.json"),
             "partial", "DP-SGD, SecAgg+ masking and verifiable ledgers are evidenced"
             + ("" if f.verified else f" ({f.failure})") + f"; availability, resilience and restore are {NOT_ASSESSED}"),
        _row(name, "Art. 35(7)(a)-(d)", "data protection impact assessment", f.sections("risk"), NONE, NOT_ASSESSED,
             "no DPIA is linked to the run"),
    ]


def _ai_act(f: _Facts, regime: dict[str, Any]) -> list[Row]:
    name = regime["regime"]
    risk_class, why = AI_ACT_CLASSES[regime["use_case"]]
    high = risk_class == "high-risk"
    classification = _row(
        name, "Art. 6, Annex III", "risk classification of the declared use", f.sections("run"),
        f.evidence(["#/run/regimes_asserted", "#/run/intended_purpose"], "ledger.jsonl"),
        "met" if high else "not applicable",
        f"{risk_class} as declared by the operator (role {regime['role']}, use {regime['use_case']}): {why}; "
        + (f"Articles {HIGH_RISK_ARTICLES[0]}-{HIGH_RISK_ARTICLES[-1]} follow (rows below)" if high else
           f"Articles {HIGH_RISK_ARTICLES[0]}-{HIGH_RISK_ARTICLES[-1]} apply to high-risk systems only, so none is "
           "mapped"))
    if not high:
        return [classification]
    evaluation = ["#/evaluation"] if f.evaluated else []
    inventory = ["#/data_inventory"] if f.simulated or f.governed else []
    purpose = not is_not_assessed(f.purpose)
    return [
        classification,
        _row(name, "Art. 9", "risk management system over the lifecycle", f.sections("risk"), NONE, NOT_ASSESSED,
             "no risk management record is linked to the run"),
        _row(name, "Art. 10", "data and data governance: provenance, relevance, bias examination",
             f.sections("data_inventory", "privacy"),
             f.evidence([*inventory, "#/privacy"], "ledger.jsonl", "summary.json"), "partial",
             "each site's data inventory (counts, digests, declared categories and lawful basis where stated) and its "
             f"DP statement are evidenced; the examination for bias is {NOT_ASSESSED}"),
        _row(name, "Art. 11", "technical documentation", f.sections("run", "model_card", "evaluation"),
             f.evidence(["#/run", "#/model_card", *evaluation], "config.json", "summary.json", "student/"),
             "partial", f"generated from the run{f.unevaluated}; risk management and conformity are {NOT_ASSESSED}"),
        _row(name, "Annex IV point 1", "general description: purpose, versions, hardware", f.sections("run"),
             f.evidence(["#/run"], "config.json"), "partial",
             ("the intended purpose is declared" if purpose else f"the intended purpose is {NOT_ASSESSED}")
             + ("; software versions and configuration are evidenced" if f.simulated else
                "; the coordinator's code version and the configuration are evidenced, the sites' package versions "
                f"are {NOT_ASSESSED}") + f"; hardware is {NOT_ASSESSED}"),
        _row(name, "Annex IV point 2", "development: methods, pre-trained components, design choices, architecture, "
             "data provenance, validation, cybersecurity",
             f.sections("data_inventory", "privacy", "secure_aggregation", "model_card", "evaluation"),
             f.evidence(["#/model_card", *inventory, *evaluation], "config.json", "student/", "summary.json",
                        "teacher/"),
             "partial", "evidenced from the run" + ("" if f.simulated else "; data provenance is kept at the sites")
             + f"{f.unevaluated}; compute resources and datasheet narrative are {NOT_ASSESSED}"),
        _row(name, "Annex IV points 3-9", "monitoring, metrics appropriateness, risk management, lifecycle changes, "
             "standards, declaration of conformity, post-market monitoring", f.sections("risk", "lineage"), NONE,
             NOT_ASSESSED, "outside what a run can evidence"),
        _audit_row(f, name, "Art. 12", "automatic recording of events (logs) for traceability",
                   "every round is recorded automatically in signed, hash-chained ledgers at the coordinator and "
                   f"every site; retention (Art. 19, at least 6 months) is {NOT_ASSESSED}"),
        _row(name, "Art. 13", "transparency and instructions for use to deployers", f.sections("run", "model_card"),
             f.evidence(["#/run/intended_purpose", "#/model_card"], "ledger.jsonl") if purpose else NONE,
             "partial" if purpose else NOT_ASSESSED,
             ("the intended purpose, users, out-of-scope uses and the model's caveats are stated" if purpose else
              f"the intended purpose is {NOT_ASSESSED}") + f"; instructions for use are {NOT_ASSESSED}"),
        _row(name, "Art. 14", "human oversight", f.sections("model_card"), NONE, NOT_ASSESSED,
             "oversight measures are outside what a run can evidence"),
        _row(name, "Art. 15", "accuracy, robustness and cybersecurity",
             f.sections("evaluation", "secure_aggregation", "audit_trail"),
             f.evidence([*evaluation, "#/secure_aggregation", "#/audit_trail"], "summary.json", *LEDGERS),
             "partial", ("accuracy against the teacher and baselines is measured" if f.evaluated else
                         f"accuracy is {NOT_ASSESSED}") + "; SecAgg+ and signed ledgers are evidenced"
             + f"; robustness testing is {NOT_ASSESSED}"),
    ]


def _sr_11_7(f: _Facts, regime: dict[str, Any]) -> list[Row]:
    name = regime["regime"]
    evaluation = ["#/evaluation"] if f.evaluated else []
    inventory_id, owner, tier = (regime.get(key) for key in ("inventory_id", "model_owner", "risk_tier"))
    validator = regime.get("independent_validator")
    declared = [label for label, value in (("inventory id", inventory_id), ("owner", owner), ("risk tier", tier))
                if value]
    return [
        _row(name, "model inventory and ownership", "an inventory entry, owner and materiality tier",
             f.sections("run", "model_card"),
             f.evidence(["#/run/regimes_asserted", "#/model_card"], "ledger.jsonl") if declared else NONE,
             "met" if len(declared) == 3 else "partial" if declared else NOT_ASSESSED,
             _joined([f"declared by the operator: {', '.join(declared)}" if declared else "",
                      "" if len(declared) == 3 else "the rest is " + NOT_ASSESSED])),
        _row(name, "development documentation", "theory, assumptions, data, limitations, enough for an unfamiliar "
             "party", f.sections("model_card", "data_inventory", "privacy"),
             f.evidence(["#/model_card", "#/privacy"], "config.json", "summary.json", "student/"), "partial",
             "architecture, distillation, data counts and digests, DP statement and caveats are generated from the "
             f"run; the theory and assumptions narrative is {NOT_ASSESSED}"),
        _row(name, "independent validation (effective challenge)", "validation by a party independent of development",
             f.sections("verification"), f.evidence(["#/verification"], *LEDGERS) if validator else NONE,
             "partial" if validator else NOT_ASSESSED,
             (f"validator declared: {validator}; " if validator else "")
             + f"the validation itself and its findings are {NOT_ASSESSED}; fedistill verify checks the evidence, "
               "not the model's soundness"),
        _row(name, "ongoing monitoring, outcomes analysis, change control", "performance against benchmarks and a "
             "controlled lineage", f.sections("evaluation", "lineage"),
             f.evidence([*evaluation, "#/lineage"], "summary.json", "metrics.jsonl"), "partial",
             ("outcomes against the teacher and baselines and " if f.evaluated else "")
             + f"the student's lineage per round are evidenced{f.unevaluated}; ongoing monitoring after the run is "
             f"{NOT_ASSESSED}"),
    ]


def _glba(f: _Facts, regime: dict[str, Any]) -> list[Row]:
    name = regime["regime"]
    qualified = regime.get("qualified_individual")
    return [
        _row(name, "16 CFR 314.4(a)", "a Qualified Individual oversees the information security program",
             f.sections("run"), f.evidence(["#/run/regimes_asserted"], "ledger.jsonl") if qualified else NONE,
             "met" if qualified else NOT_ASSESSED,
             f"declared by the operator: {qualified}" if qualified else "parties.toml names no qualified_individual"),
        _access_row(f, name, "16 CFR 314.4(c)(1)", "access controls on customer information"),
        _transmission_row(f, name, "16 CFR 314.4(c)(3)", "encryption of customer information in transit and at rest"),
        _row(name, "16 CFR 314.4(c)(8)", "monitoring and logging of authorised users' activity",
             f.sections("audit_trail"), f.evidence(["#/audit_trail"], *LEDGERS), "partial" if f.verified else "not met",
             ("every action of the run is logged in signed ledgers at the coordinator and every site; the activity "
              f"of individual users is {NOT_ASSESSED}") if f.verified else f.failure),
        _row(name, "16 CFR 314.4(i)", "the Qualified Individual's written report to the board, at least annually",
             f.sections("verification"), NONE, NOT_ASSESSED,
             "this report can feed it; the board report itself is outside the run"),
    ]


REGIME_ROWS: dict[str, Callable[[_Facts, dict[str, Any]], list[Row]]] = {
    "hipaa": _hipaa, "gdpr": _gdpr, "eu_ai_act": _ai_act, "sr_11_7": _sr_11_7, "glba": _glba}


def crosswalk_of(report: dict[str, Any]) -> dict[str, Any]:
    """The crosswalk of a report whose other sections are built (``summary`` and ``crosswalk`` need not be)."""
    declared = report["run"]["regimes_asserted"]
    if is_not_assessed(declared):
        return {"statuses": list(STATUSES), "note": NOTE, "regimes_declared": [], "declaration": NO_REGIME,
                "rows": []}
    facts = _Facts(report)
    return {"statuses": list(STATUSES), "note": NOTE,
            "regimes_declared": [regime["regime"] for regime in declared],
            "declaration": ("declared by the operator in parties.toml, recorded in the coordinator's signed ledger: "
                            + (", ".join(regime["regime"] for regime in declared) or "none")
                            + "; an undeclared regime is not mapped"),
            "rows": [row for regime in declared for row in REGIME_ROWS[regime["key"]](facts, regime)]}
