"""The site-local stage of a curriculum: the site fine-tunes its own copy of the run's final student, alone.

Nothing trained here leaves the site: the fine-tuned copy is kept in the state directory
(``site-local/<run id>/``), and only its evaluation metrics may leave, when the site's policy releases them
(``release_local_metrics``). The stage reads the site's own training split against its cached teacher logits (the
federated rounds computed them), without DP: DP-SGD protects what is released, and the copy is not released. The
released metrics are aggregate figures on the site's own validation and test records and are not DP-protected; the
site's policy decides whether they go. Everything is recorded in the site's ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from client.site import Site
from distill.cache import TeacherLogitCache
from distill.evaluate import evaluate_across_sites
from distill.models import (build_student, fragment_parameter_names, load_student_state, load_teacher, student_state,
                            teacher_digest)
from distill.train import TrainSettings, distill, predict_proba
from protocols.accounting import SitePolicy
from protocols.canonical import atomic_directory, atomic_write_json, digest_arrays, sha256_hex
from protocols.config import StudentSpec
from protocols.errors import UpdateRejected
from protocols.fragments import stage_parameters
from protocols.ledger import ledger_in, read_events
from protocols.messages import LocalStageRequest, check_tensors

SCHEMA_VERSION = 1
LOCAL_DIR = "site-local"
METRIC_NAMES = ("roc_auc", "accuracy", "macro_f1", "kappa")


def accepted_config_hash(site: Site, run_id: str) -> str | None:
    path = site.state_dir / "ledger.jsonl"
    for event in read_events(path) if path.is_file() else []:
        if event["kind"] == "run-accepted" and event["payload"].get("run_id") == run_id:
            return event["payload"].get("config_hash")
    return None


def _metrics(model: torch.nn.Module, family: str, splits: Mapping[str, Any]) -> dict[str, Any]:
    """Test metrics at the threshold chosen on the site's own validation split (the evaluator every run uses).

    A site that keeps no validation and test split (a deployed classification site trains on its whole table) has
    nothing to score on: its metrics are empty (``n`` 0), and it still fine-tunes and keeps its copy."""
    if not {"val", "test"} <= set(splits):
        return {"threshold": None, **{m: None for m in METRIC_NAMES}, "n": 0}
    evaluation = evaluate_across_sites(lambda split: predict_proba(model, family, split), {"site": splits})
    overall = evaluation["overall"]
    return {"threshold": evaluation["threshold"], **{m: overall.get(m) for m in METRIC_NAMES}, "n": overall["n"]}


def requested_student(site: Site, what: str, run_id: str, config_hash: str, spec: StudentSpec, digest: str,
                      global_state: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """The student a coordinator sends for a site-local stage or a validation report, built only for a run this site
    accepted with that config hash, and only when the tensors have the shapes and the digest the request names."""
    accepted = accepted_config_hash(site, run_id)
    if accepted is None:
        raise UpdateRejected(f"{what}: this site never accepted the run; it acts only for a run it took part in.")
    if accepted != config_hash:
        raise UpdateRejected(f"{what}: the request names config hash {config_hash[:12]}..., not {accepted[:12]}..., "
                             "the run this site accepted.")
    model = build_student(spec)
    check_tensors(global_state, student_state(model, spec.family), what)
    if digest_arrays(dict(global_state)) != digest:
        raise UpdateRejected(f"{what}: the student sent does not hash to {digest[:12]}..., the student the request "
                             "names.")
    load_student_state(model, spec.family, global_state)
    return model


def local_student_dir(site: Site, run_id: str):
    return site.state_dir / LOCAL_DIR / run_id


def run_site_local_stage(site: Site, request: LocalStageRequest, global_state: Mapping[str, np.ndarray]
                         ) -> dict[str, Any]:
    """Fine-tune, keep, evaluate and record; returns what may leave (metrics, or that they are withheld)."""
    what = f"site {site.name}, site-local stage of run {request.run_id}"
    torch.manual_seed(request.seed)
    model = requested_student(site, what, request.run_id, request.config_hash, request.student,
                              request.student_digest, global_state)
    family = request.student.family
    splits = site.splits()
    federated_metrics = _metrics(model, family, splits)
    outputs = TeacherLogitCache(site.state_dir).outputs(splits["train"], teacher_digest(site.teacher_path),
                                                        lambda: load_teacher(site.teacher_path))
    stage = request.stage
    trainable = stage_parameters(family, fragment_parameter_names(model, family), stage.fragments_at(site.name))
    seed = int(sha256_hex(f"{request.seed}:site-local:{site.name}")[:8], 16)
    outcome = distill(model, family, splits["train"], outputs.logits,
                      TrainSettings(steps=stage.steps, batch_size=stage.batch_size, learning_rate=stage.learning_rate,
                                    temperature=stage.temperature, alpha=stage.alpha, seed=seed,
                                    optimizer=stage.optimizer), trainable=trainable)
    local_state = student_state(model, family)
    local_metrics = _metrics(model, family, splits)
    with atomic_directory(local_student_dir(site, request.run_id)) as staging:
        save_file(local_state, str(staging / "model.safetensors"))
        atomic_write_json(staging / "local.json", {
            "schema_version": SCHEMA_VERSION, "run_id": request.run_id, "student": request.student.to_dict(),
            "stage": stage.to_dict(), "started_from": request.student_digest, "student_digest": digest_arrays(local_state)})
    release = SitePolicy.load(site.state_dir).release_local_metrics
    released = {"federated_student": federated_metrics, "local_student": local_metrics} if release else None
    ledger = ledger_in(site.state_dir, site.name)
    ledger.append("site-local-stage", {
        "run_id": request.run_id, "config_hash": request.config_hash, "stage": stage.to_dict(),
        "started_from": request.student_digest, "local_student_digest": digest_arrays(local_state),
        "records": len(splits["train"]), "steps": outcome.steps, "mean_loss": outcome.mean_loss,
        "metrics": {"federated_student": federated_metrics, "local_student": local_metrics},
        "released": release, "kept_at": f"{LOCAL_DIR}/{request.run_id}"})
    ledger.checkpoint({"run_id": request.run_id, "after": "site-local-stage"})
    return {"released": release, "metrics": released}
