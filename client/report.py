"""A site's own account of itself: everything that left it, the epsilon it spent, the budget it has left.

Built only from the site's state directory (its ledger, verified with its own public key, its policy and
its spend history), so a site engineer can answer a privacy officer without asking the coordinator.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from client.site import Site
from protocols.accounting import EVIDENCE_FILES, PrivacyState, SitePolicy, json_epsilon, unit_of_privacy
from protocols.ledger import read_events, verify_ledger


def site_report(state_dir: Path) -> dict[str, Any]:
    site = Site.load(state_dir)
    ledger = verify_ledger(site.state_dir / "ledger.jsonl", (site.state_dir / "ledger_key.pub.pem").read_text(),
                           actor=site.name)
    events = read_events(site.state_dir / "ledger.jsonl")
    policy = SitePolicy.load(site.state_dir)
    state = PrivacyState.load(site.state_dir)
    runs: dict[str, dict[str, Any]] = {}
    for event in events:
        payload = event["payload"]
        if event["kind"] == "checkpoint":
            continue
        run = runs.setdefault(payload["run_id"], {"config_hash": payload.get("config_hash"), "updates_sent": [],
                                                  "refusals": []})
        if event["kind"] == "update-sent":
            run["updates_sent"].append({"round": payload["round"], "payload_kind": payload["payload_kind"],
                                        "tensors": len(payload["tensors"]), "bytes": payload["bytes"],
                                        "digest": payload["digest"], "time": event["time"]})
        elif event["kind"] == "refusal":
            run["refusals"].append({"round": payload["round"], "reason": payload["reason"]})
    deltas = [c.delta for c in state.calibrations.values()]
    delta = min(deltas) if deltas else policy.delta_for(len(site.splits()["train"]))
    item = "document" if site.student_base is not None else "record"
    for run_id, run in runs.items():
        run["epsilon"] = json_epsilon(state.epsilon(delta, policy.accountant, run_id))
        calibration = state.calibrations.get(run_id)
        run["unit_of_privacy"] = unit_of_privacy(calibration.unit if calibration else "record", item, "this site's")
    lifetime = state.epsilon(delta, policy.accountant)
    units = {c.unit for c in state.calibrations.values()}
    return {
        "schema_version": 1, "site": site.name,
        # The lifetime epsilon composes every run: it protects a person only if every run was person-level.
        "unit_of_privacy": unit_of_privacy("person" if units == {"person"} else "record", item, "this site's"),
        "ledger": {"events": ledger.events, "checkpoints": ledger.checkpoints, "head_seq": ledger.head_seq,
                   "head_hash": ledger.head_hash, "verified": True},
        "policy": policy.to_dict(), "delta": delta, "accountant": policy.accountant,
        "epsilon_lifetime": json_epsilon(lifetime),
        "lifetime_budget_left": (None if policy.epsilon_lifetime is None
                                 else json_epsilon(max(0.0, policy.epsilon_lifetime - lifetime))),
        "runs": runs,
    }


def export_evidence(state_dir: Path, out: Path) -> list[Path]:
    """Copy the site's verifiable evidence into ``out`` (e.g. ``RUN_DIR/sites/<site>`` for ``fedistill verify``).

    The ledger is verified first, so a site never hands over a history that does not verify.
    """
    site = Site.load(state_dir)
    verify_ledger(site.state_dir / "ledger.jsonl", (site.state_dir / "ledger_key.pub.pem").read_text(), actor=site.name)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in EVIDENCE_FILES:
        if (site.state_dir / name).is_file():
            copied.append(Path(shutil.copy2(site.state_dir / name, out / name)))
    return copied
