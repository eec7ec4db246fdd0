"""Baselines run in the same simulation, on the same splits and with the same training budget.

- teacher: the teacher itself;
- local-only: each site distils its teacher into its own student, alone;
- centralized distilled: one student distilled on the pooled site data (what federation approximates);
- centralized labels-only: the same student trained on the pooled labels without a teacher (what distillation adds);
- public-only: the same student distilled on the scenario's public reference set alone: no site, no federation and
  no privacy budget, the free alternative a federated student has to beat.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.data import SplitData
from distill.evaluate import evaluate_across_sites, softmax
from distill.models import Teacher, build_student
from distill.train import TrainSettings, distill, predict_proba
from protocols.config import FederationConfig
from simulations.scenario import Scenario


def _settings(config: FederationConfig, seed_offset: int) -> TrainSettings:
    # Each federated round moves the student by local_steps averaged steps; the baselines get as many steps.
    return TrainSettings(steps=config.rounds * config.local_steps, batch_size=config.batch_size,
                         learning_rate=config.learning_rate, optimizer=config.optimizer,
                         temperature=config.temperature_start,
                         alpha=config.alpha, seed=config.seed + seed_offset)


def _train_student(scenario: Scenario, config: FederationConfig, data: SplitData, teacher_logits: np.ndarray | None,
                   seed_offset: int):
    torch.manual_seed(config.seed)
    model = build_student(scenario.student)
    distill(model, scenario.family, data, teacher_logits, _settings(config, seed_offset))
    return lambda split: predict_proba(model, scenario.family, split)


def teacher_predictor(teacher: Teacher):
    return lambda split: softmax(teacher.logits(split.inputs))


def run_baselines(scenario: Scenario, config: FederationConfig, teacher_logits: dict[str, np.ndarray],
                  progress=None) -> dict[str, Any]:
    """``teacher_logits`` holds each site's cached teacher logits on its training split."""
    results: dict[str, Any] = {"teacher": evaluate_across_sites(teacher_predictor(scenario.teacher), scenario.sites)}
    names = list(scenario.sites)
    local: dict[str, Any] = {}
    for offset, name in enumerate(names, start=1):
        predictor = _train_student(scenario, config, scenario.sites[name]["train"], teacher_logits[name], offset)
        local[name] = evaluate_across_sites(predictor, scenario.sites)
        if progress:
            progress(f"local-only {name}")
    results["local_only"] = local
    pooled = SplitData.concatenate([scenario.sites[n]["train"] for n in names])
    pooled_logits = np.concatenate([teacher_logits[n] for n in names])
    results["centralized_distilled"] = evaluate_across_sites(
        _train_student(scenario, config, pooled, pooled_logits, 100), scenario.sites)
    if progress:
        progress("centralized distilled")
    results["centralized_labels_only"] = evaluate_across_sites(
        _train_student(scenario, config, pooled, None, 100), scenario.sites)
    if progress:
        progress("centralized labels-only")
    if scenario.public is not None:
        public_logits = scenario.teacher.logits(scenario.public.inputs)
        results["public_only"] = evaluate_across_sites(
            _train_student(scenario, config, scenario.public, public_logits, 200), scenario.sites)
        if progress:
            progress("public-only")
    return results
