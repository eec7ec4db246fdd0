"""The coordinator stage of a classification run's curriculum: the student distilled on public records first.

The stage runs at the coordinator, before any site trains. Its teacher is public (fitted on the public reference
set, client/teacher.py) and so is its transfer set, so it reads no site record and spends no privacy budget. A
tabular student's transfer set can be widened at no privacy cost: ``synthetic_records`` mixup interpolations of
public records, each labelled by the teacher (its soft targets for the KD term, its arg-max as the hard label of the
CE term). The product is the federated stage's starting student; the stage's record (what it read, its settings,
the digest of the student it produced) goes into the coordinator's signed run-started event.

A slice of the public set (``PUBLIC_HOLDOUT_SHARE`` of its persons) is held out of the stage: it is the stage's own
held-out set, on which every later stage is evaluated too (forgetting, docs/curriculum.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.data import SplitData
from distill.models import Teacher, build_student, fragment_parameter_names, student_state
from distill.train import TrainSettings, distill
from protocols.canonical import digest_arrays
from protocols.config import StudentSpec
from protocols.curriculum import Stage
from protocols.errors import ConfigError
from protocols.fragments import stage_parameters

SCHEMA_VERSION = 1
PUBLIC_HOLDOUT_SHARE = 0.2


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
