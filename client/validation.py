"""A site's validation report on one round's student, for a run that keeps its best round.

The coordinator of such a run asks every site, after each round, to score that round's student on its validation
split: records the site never trains on (the federated rounds read its training split only), so the score says
how well the student generalises there. Only the ROC-AUC and the number of validation records may leave, and only
when the site's policy releases them (``release_validation_metrics``, off by default): they are aggregate figures on
the site's own records and are not DP-protected. The coordinator keeps the round whose pooled score is best.

A site scores a student only for a run it accepted with that config hash, only a student with the digest named,
and each round once: a coordinator cannot use the reports to probe the validation split with students of its
choosing beyond one per round. Everything is recorded in the site's own ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from client.local_stage import requested_student
from client.site import Site
from distill.evaluate import classification_metrics
from distill.train import predict_proba
from protocols.accounting import SitePolicy
from protocols.errors import UpdateRejected
from protocols.ledger import ledger_in, read_events
from protocols.messages import ValidationRequest


def _already_scored(site: Site, request: ValidationRequest) -> bool:
    path = site.state_dir / "ledger.jsonl"
    return any(e["kind"] == "validation" and e["payload"].get("run_id") == request.run_id
               and e["payload"].get("round") == request.round for e in (read_events(path) if path.is_file() else []))


def validate_student(site: Site, request: ValidationRequest, global_state: Mapping[str, np.ndarray]
                     ) -> dict[str, Any]:
    """Score, record, and return what may leave: ``{"released": bool, "roc_auc": ..., "n": ...}``."""
    what = f"site {site.name}, validation of round {request.round} of run {request.run_id}"
    if _already_scored(site, request):
        raise UpdateRejected(f"{what}: this site scored round {request.round} already; it answers each round once.")
    model = requested_student(site, what, request.run_id, request.config_hash, request.student,
                              request.student_digest, global_state)
    family = request.student.family
    splits = site.splits()
    validation = splits.get("val")
    roc_auc, n = None, 0
    if validation is not None and len(validation):
        roc_auc = classification_metrics(validation.labels, predict_proba(model, family, validation),
                                         threshold=None)["roc_auc"]
        n = len(validation)
    release = SitePolicy.load(site.state_dir).release_validation_metrics
    ledger = ledger_in(site.state_dir, site.name)
    ledger.append("validation", {"run_id": request.run_id, "config_hash": request.config_hash,
                                 "round": request.round, "student_digest": request.student_digest,
                                 "roc_auc": roc_auc, "n": n, "released": release})
    ledger.checkpoint({"run_id": request.run_id, "after": f"validation of round {request.round}"})
    return {"released": release, "roc_auc": roc_auc, "n": n} if release else {"released": False}
