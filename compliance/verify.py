"""Independent verification of a run directory: every check an auditor can make without trusting anyone.

``fedistill verify RUN_DIR`` walks, in this order, and stops at the first failure with an error that
names the file and what failed:

1. the run configuration: ``config.json``'s ``config_hash`` is the hash of its ``federation`` section;
2. the coordinator's ledger: chain, hashes and every checkpoint signature (``ledger_key.pub.pem``); its
   run-started event names the same config hash;
3. every site's ledger (``sites/<site>/``): chain and signatures with the site's own public key;
4. cross-signatures: every site head a coordinator checkpoint recorded is in that site's ledger;
5. every site's privacy: the DP parameters its ledger recorded for each update it sent are the spends in its
   ``privacy.json``; its epsilon is replayed from them with Google's dp-accounting (PLD) and must match the
   epsilon the site recorded (Opacus PRV) within 2 %, and every update it sent names the run's config hash.

Missing evidence (a ledger, a key, a site directory) is a failure, never a pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.accounting import PrivacyState, Spend, pld_epsilon
from protocols.canonical import digest_json
from protocols.errors import LedgerTampered
from protocols.ledger import read_events, verify_ledger

EPSILON_TOLERANCE = 0.02


@dataclass
class AuditReport:
    run_dir: str
    config_hash: str
    checks: list[str] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "verified": True, "run_dir": self.run_dir, "config_hash": self.config_hash,
                "checks": self.checks, "sites": self.sites}


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


def _site_spends(events: list[dict[str, Any]], run_id: str) -> list[Spend]:
    return [Spend(run_id, e["payload"]["round"], float(e["payload"]["dp"]["noise-multiplier"]),
                  float(e["payload"]["dp"]["sample-rate"]), int(e["payload"]["dp"]["steps"]),
                  int(e["payload"]["dp"]["empty-batches"]))
            for e in events if e["kind"] == "update-sent" and e["payload"]["run_id"] == run_id]


def _verify_site_privacy(site_dir: Path, events: list[dict[str, Any]], run_id: str, config_hash: str) -> dict[str, Any]:
    sent = [e for e in events if e["kind"] == "update-sent" and e["payload"]["run_id"] == run_id]
    for event in sent:
        if event["payload"]["config_hash"] != config_hash:
            raise LedgerTampered(f"{site_dir / 'ledger.jsonl'}, seq {event['seq']}: the update names config hash "
                                 f"{event['payload']['config_hash']}, not the run's {config_hash}.")
    spends = _site_spends(events, run_id)
    stored = [s for s in PrivacyState.load(site_dir).run_spends(run_id)]
    if [(s.round, s.noise_multiplier, s.sample_rate, s.steps) for s in stored] != \
            [(s.round, s.noise_multiplier, s.sample_rate, s.steps) for s in spends]:
        raise LedgerTampered(f"{site_dir / 'privacy.json'}: the spends of run {run_id} differ from the DP parameters "
                             "the site's ledger recorded for the updates it sent.")
    summary: dict[str, Any] = {"updates_sent": len(sent), "refusals": sum(
        1 for e in events if e["kind"] == "refusal" and e["payload"]["run_id"] == run_id)}
    if not sent:
        return summary
    recorded = sent[-1]["payload"]["epsilon_run"]
    delta = float(sent[-1]["payload"]["dp"]["delta"])
    replayed = pld_epsilon(spends, delta)
    if recorded == "inf" or math.isinf(replayed):
        if not (recorded == "inf" and math.isinf(replayed)):
            raise LedgerTampered(f"{site_dir / 'ledger.jsonl'}, seq {sent[-1]['seq']}: recorded epsilon {recorded} "
                                 f"but the DP parameters replay to {replayed}.")
    elif abs(replayed - float(recorded)) > EPSILON_TOLERANCE * max(float(recorded), 1e-9):
        raise LedgerTampered(f"{site_dir / 'ledger.jsonl'}, seq {sent[-1]['seq']}: the site recorded epsilon "
                             f"{float(recorded):.4f} at delta {delta:g}, but its recorded DP parameters replay to "
                             f"{replayed:.4f} with dp-accounting; a noise multiplier, sampling rate or step count was "
                             "altered.")
    summary |= {"epsilon_recorded": recorded, "epsilon_replayed": replayed if math.isfinite(replayed) else "inf",
                "delta": delta}
    return summary


def verify_run(run_dir: Path) -> AuditReport:
    run_dir = Path(run_dir)
    config_hash = _config_hash(run_dir)
    report = AuditReport(str(run_dir), config_hash, ["config.json: config hash recomputes"])
    coordinator = verify_ledger(run_dir / "ledger.jsonl", _public_key(run_dir), actor="coordinator")
    events = read_events(run_dir / "ledger.jsonl")
    started = [e for e in events if e["kind"] == "run-started"]
    if not started or started[0]["payload"]["config_hash"] != config_hash:
        raise LedgerTampered(f"{run_dir / 'ledger.jsonl'}: its run-started event does not name config hash "
                             f"{config_hash}.")
    run_id = started[0]["payload"]["run_id"]
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
    for site_dir in site_dirs:
        report.sites[site_dir.name] |= _verify_site_privacy(site_dir, site_events[site_dir.name], run_id, config_hash)
    report.checks.append("every site's epsilon replays from its recorded DP parameters with dp-accounting (PLD) "
                         f"within {EPSILON_TOLERANCE:.0%}")
    return report
