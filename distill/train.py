"""Distillation training and prediction as plain functions (no Flower, no privacy engine)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.data import SplitData
from distill.evaluate import softmax
from distill.losses import distillation_loss, hidden_alignment_loss
from distill.models import student_forward


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    temperature: float
    alpha: float
    seed: int
    hidden_alignment_weight: float = 0.0


@dataclass(frozen=True)
class TrainOutcome:
    mean_loss: float
    steps: int
    examples: int


def _tensors(data: SplitData, index: np.ndarray) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(values[index]) for name, values in data.inputs.items()}


def freeze_except(model: nn.Module, trainable: Collection[str] | None) -> list[nn.Parameter]:
    """Only the named parameters (``None``: all) keep ``requires_grad``; returns them."""
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable is None or name in trainable)
        if parameter.requires_grad:
            chosen.append(parameter)
    return chosen


def distill(model: nn.Module, family: str, data: SplitData, teacher_logits: np.ndarray | None,
            settings: TrainSettings, trainable: Collection[str] | None = None,
            teacher_hidden: np.ndarray | None = None, projection: nn.Module | None = None) -> TrainOutcome:
    """Train ``model`` on ``data`` with the distillation loss (plain cross-entropy when ``teacher_logits`` is None).

    ``trainable`` restricts training to those parameter names (the planned fragments); the rest stay frozen.
    With ``projection`` and ``teacher_hidden`` the pooled hidden state is also aligned to the teacher's.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    parameters = freeze_except(model, trainable)
    align = projection is not None and teacher_hidden is not None and settings.hidden_alignment_weight > 0
    if align:
        parameters += list(projection.parameters())
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    labels = torch.tensor(data.labels, dtype=torch.long)
    teacher = None if teacher_logits is None else torch.as_tensor(teacher_logits, dtype=torch.float32)
    hidden_target = torch.as_tensor(teacher_hidden, dtype=torch.float32) if align else None
    model.train()
    total, steps = 0.0, 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator).numpy()
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            logits, pooled = student_forward(model, family, _tensors(data, index), with_hidden=align)
            if teacher is None:
                loss = nn.functional.cross_entropy(logits, labels[index])
            else:
                loss = distillation_loss(logits, teacher[index], labels[index], settings.temperature, settings.alpha)
            if align:
                loss = loss + settings.hidden_alignment_weight * hidden_alignment_loss(pooled, hidden_target[index],
                                                                                       projection)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    freeze_except(model, None)
    return TrainOutcome(mean_loss=total / max(steps, 1), steps=steps, examples=len(data))


@torch.no_grad()
def predict_proba(model: nn.Module, family: str, data: SplitData, batch_size: int = 512) -> np.ndarray:
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        logits, _ = student_forward(model, family, _tensors(data, index))
        outputs.append(logits.float().numpy())
    if not outputs:
        return np.zeros((0, 2), dtype=np.float32)
    return softmax(np.concatenate(outputs))
