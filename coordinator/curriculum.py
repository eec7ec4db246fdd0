"""The coordinator stage of a classification run's curriculum: the student distilled on public records first.

The stage runs at the coordinator, before any site trains. Its teacher is public (fitted on the public reference
set, client/teacher.py) and so is its transfer set, so it reads no site record and spends no privacy budget. A
tabular student's transfer set can be widened at no privacy cost: ``synthetic_records`` mixup interpolations of
public records, each labelled by the teacher (its soft targets for the KD term, its arg-max as the hard label of the
CE term). The product is the federated stage's starting student; the stage's record (what it read, its settings,
the digest of the student it produced) goes into the coordinator's signed run-started event.

A slice of the public set (``PUBLIC_HOLDOUT_SHARE`` of its persons) is held out of the stage: it is the stage's own
held-out set, on which every later stage is evaluated too (forgetting, docs/curriculum.md).

In deployment ``fedistill run`` runs the stage before it submits the run (the run has no id yet), into a folder of
the coordinator directory (:func:`save_stage`); the ServerApp copies its student into the run directory, where
``fedistill verify`` looks for it, and starts from that copy (:func:`adopt_stage`, :func:`stage_state`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from coordinator.checkpoint import MANIFEST, load_student, save_student
from distill.data import SplitData
from distill.models import Teacher, build_student, fragment_parameter_names, student_state
from distill.train import TrainSettings, distill
from protocols.canonical import atomic_directory, atomic_write_bytes, atomic_write_json, digest_arrays
from protocols.config import FederationConfig, StudentSpec
from protocols.curriculum import START_STUDENT, Stage
from protocols.errors import ConfigError
from protocols.fragments import stage_parameters

SCHEMA_VERSION = 1
PUBLIC_HOLDOUT_SHARE = 0.2
# A stage folder written by save_stage: the student (a checkpoint) and the stage's record beside it.
STAGE_STUDENT = "student"
STAGE_RECORD = "record.json"
# Where a run directory keeps its coordinator stage's student (compliance.verify hashes it there).
RUN_STAGE_DIR = Path("stages") / "coordinator"


@dataclass(frozen=True)
class CoordinatorStageResult:
    model: nn.Module
    state: dict[str, np.ndarray]
    record: dict[str, Any]
    # The public records kept out of the stage, on which every later stage is scored too (forgetting).
    holdout: SplitData | None = None


def split_public(public: SplitData, seed: int) -> tuple[SplitData, SplitData]:
    """(the stage's transfer records, its held-out records), split by person so nobody is on both sides."""
    groups = public.groups if len(public.groups) else np.arange(len(public))
    persons = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(persons, max(1, int(PUBLIC_HOLDOUT_SHARE * len(persons))), replace=False).tolist())
    in_holdout = np.array([g in held for g in groups])
    return public.subset(np.flatnonzero(~in_holdout)), public.subset(np.flatnonzero(in_holdout))


def mixup_records(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` convex combinations of two random public records each (mixing weight uniform in [0, 1])."""
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(x), count), rng.integers(0, len(x), count)
    weight = rng.uniform(0.0, 1.0, (count, 1)).astype(x.dtype)
    return weight * x[first] + (1.0 - weight) * x[second]


def transfer_set(public: SplitData, teacher: Teacher, synthetic_records: int, seed: int
                 ) -> tuple[SplitData, np.ndarray]:
    """The public records plus their synthetic interpolations, with the teacher's logits on every one."""
    if synthetic_records:
        synthetic = mixup_records(public.inputs["x"], synthetic_records, seed)
        synthetic_logits = teacher.logits({"x": synthetic})
        records = SplitData({"x": np.concatenate([public.inputs["x"], synthetic])},
                            np.concatenate([public.labels, synthetic_logits.argmax(axis=1).astype(np.int64)]))
        return records, np.concatenate([teacher.logits(public.inputs), synthetic_logits])
    return public, teacher.logits(public.inputs)


def run_coordinator_stage(spec: StudentSpec, public: SplitData, teacher: Teacher, teacher_digest: str, stage: Stage,
                          seed: int, patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> CoordinatorStageResult:
    """Distil the teacher into a fresh student on the public transfer set; nothing here reads a site record."""
    if stage.where != "coordinator":
        raise ConfigError(f"curriculum: run_coordinator_stage got a {stage.where} stage.")
    records, logits = transfer_set(public, teacher, stage.synthetic_records, seed)
    torch.manual_seed(seed)
    model = build_student(spec)
    trainable = stage_parameters(spec.family, fragment_parameter_names(model, spec.family), stage.fragments, patterns)
    outcome = distill(model, spec.family, records, logits,
                      TrainSettings(steps=stage.steps, batch_size=stage.batch_size, learning_rate=stage.learning_rate,
                                    temperature=stage.temperature, alpha=stage.alpha, seed=seed,
                                    optimizer=stage.optimizer), trainable=trainable)
    state = student_state(model, spec.family)
    record = {
        "schema_version": SCHEMA_VERSION, "stage": "coordinator", "settings": stage.to_dict(),
        "public_records": len(public), "public_digest": public.digest(),
        "synthetic_records": stage.synthetic_records, "teacher_digest": teacher_digest,
        "trained_parameters": sum(int(p.numel()) for name, p in model.named_parameters()
                                  if trainable is None or name in trainable),
        "mean_loss": outcome.mean_loss, "seed": seed,
        "site_records_read": 0, "epsilon": 0.0,
        "student_digest": digest_arrays(state),
    }
    return CoordinatorStageResult(model, state, record)


def save_stage(result: CoordinatorStageResult, spec: StudentSpec, config: FederationConfig, directory: Path) -> Path:
    """The stage's student (``student/``, with the manifest the simulation writes) and its record
    (``record.json``) in one folder, replaced whole: no reader finds one stage's record beside another's student."""
    with atomic_directory(Path(directory)) as staging:
        save_student(result.model, spec, staging / STAGE_STUDENT, config,
                     {"stage": "coordinator", "student_digest": result.record["student_digest"]})
        atomic_write_json(staging / STAGE_RECORD, result.record)
    return Path(directory)


def adopt_stage(directory: Path, run_dir: Path, config: FederationConfig
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(record, student state) of a stage :func:`save_stage` wrote, with its student copied into the run directory
    first and read back from that copy: the rounds start from the very files ``fedistill verify`` hashes."""
    directory = Path(directory)
    student = directory / STAGE_STUDENT
    if not (directory / STAGE_RECORD).is_file() or not (student / MANIFEST).is_file():
        raise ConfigError(f"coordinator stage '{directory}' has no {STAGE_RECORD} and {STAGE_STUDENT}/; launch the "
                          "run with `fedistill run run.toml`, which runs the stage before submitting.")
    record = json.loads((directory / STAGE_RECORD).read_text())
    with atomic_directory(Path(run_dir) / RUN_STAGE_DIR) as staging:
        shutil.copytree(student, staging, dirs_exist_ok=True)
    return record, stage_state(run_dir, config)


def stage_state(run_dir: Path, config: FederationConfig) -> dict[str, np.ndarray]:
    """The coordinator stage's student kept in ``run_dir`` (what a resumed run starts from again). One made for
    another configuration is refused here; the Coordinator checks its digest against the stage's signed record."""
    directory = Path(run_dir) / RUN_STAGE_DIR
    if not (directory / MANIFEST).is_file():
        raise ConfigError(f"{directory}: the coordinator stage's student is missing; the run cannot start from it. "
                          "Restore the folder from a backup, or start a new run with `fedistill run run.toml`.")
    model, manifest = load_student(directory)
    if manifest.get("config_hash") != config.config_hash():
        raise ConfigError(f"{directory}: this coordinator stage's student was made for configuration "
                          f"{str(manifest.get('config_hash'))[:12]}..., not this run's {config.config_hash()[:12]}...; "
                          "run the stage again with `fedistill run run.toml`.")
    return student_state(model, config.student.family)


def keep_start(run_dir: Path, student_file: Path) -> dict[str, np.ndarray]:
    """A continuing run's starting student (the earlier run's ``student/model.safetensors``), kept in its own run
    directory, where ``fedistill verify`` hashes it; returns its tensors as kept."""
    target = Path(run_dir) / START_STUDENT
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, Path(student_file).read_bytes())
    return load_file(str(target))
