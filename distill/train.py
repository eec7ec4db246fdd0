"""Distillation training and prediction as plain functions (no Flower, no privacy engine)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from distill.data import SplitData
from distill.evaluate import softmax
from distill.losses import distillation_loss, hidden_alignment_loss
from distill.models import student_forward
from protocols.knowledge import KnowledgeSettings


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    learning_rate: float
    temperature: float
    alpha: float
    seed: int
    optimizer: str = "sgd"
    hidden_alignment_weight: float = 0.0


@dataclass(frozen=True)
class TrainOutcome:
    mean_loss: float
    steps: int
    examples: int


def _tensors(data: SplitData, index: np.ndarray) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(values[index]) for name, values in data.inputs.items()}


def make_optimizer(name: str, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    """SGD with momentum (the default: FedAvg of SGD steps tracks centralized SGD) or Adam."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)


def shuffled_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` mini-batches drawn from reshuffled passes over ``n`` records (a pass never splits a batch).

    Counting in steps rather than epochs makes every site move the shared student by the same number of
    optimizer steps per round, whatever its size; the weighted average then matches centralized training.
    """
    batch_size = min(batch_size, n)
    order, position = np.zeros(0, dtype=np.int64), 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(n, generator=generator).numpy(), 0
        yield order[position:position + batch_size]
        position += batch_size


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
    """Take ``settings.steps`` optimizer steps on ``data`` with the distillation loss (plain cross-entropy when ``teacher_logits`` is None).

    ``trainable`` restricts training to those parameter names (the planned fragments); the rest stay frozen.
    With ``projection`` and ``teacher_hidden`` the pooled hidden state is also aligned to the teacher's.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    parameters = freeze_except(model, trainable)
    align = projection is not None and teacher_hidden is not None and settings.hidden_alignment_weight > 0
    if align:
        parameters += list(projection.parameters())
    optimizer = make_optimizer(settings.optimizer, parameters, settings.learning_rate)
    labels = torch.tensor(data.labels, dtype=torch.long)
    teacher = None if teacher_logits is None else torch.as_tensor(teacher_logits, dtype=torch.float32)
    hidden_target = torch.as_tensor(teacher_hidden, dtype=torch.float32) if align else None
    model.train()
    total = 0.0
    for index in shuffled_batches(len(data), settings.batch_size, settings.steps, generator):
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
    freeze_except(model, None)
    return TrainOutcome(mean_loss=total / max(settings.steps, 1), steps=settings.steps, examples=len(data))


# Probabilities below this are floored before their logarithm: the target's log-probabilities stay finite.
PROBABILITY_FLOOR = 1e-8


def distil_to_probabilities(model: nn.Module, family: str, inputs: dict[str, np.ndarray], probabilities: np.ndarray,
                            settings: TrainSettings) -> TrainOutcome:
    """KD of ``model`` towards given class probabilities on unlabelled ``inputs`` (alpha is forced to 0: there are
    no labels). The targets enter the loss as logits ``T * log p``, so that at temperature T the teacher
    distribution the student matches is exactly ``p``."""
    floored = np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, None)
    logits = (settings.temperature * np.log(floored)).astype(np.float32)
    data = SplitData(dict(inputs), floored.argmax(axis=1).astype(np.int64))
    return distill(model, family, data, logits, replace(settings, alpha=0.0))


def proxy_distillation(settings: KnowledgeSettings, seed: int) -> TrainSettings:
    """A knowledge run's distillation on its proxy set: its server steps, batch, rate and optimizer, at its
    temperature (the coordinator's each round; a site with its own student digests the global one the same way)."""
    return TrainSettings(steps=settings.server_steps, batch_size=settings.server_batch_size,
                         learning_rate=settings.server_learning_rate, temperature=settings.temperature, alpha=0.0,
                         seed=seed, optimizer=settings.server_optimizer)


@torch.no_grad()
def predict_proba(model: nn.Module, family: str, data: SplitData, batch_size: int = 512,
                  temperature: float = 1.0) -> np.ndarray:
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        logits, _ = student_forward(model, family, _tensors(data, index))
        outputs.append(logits.float().numpy())
    if not outputs:
        return np.zeros((0, 2), dtype=np.float32)
    return softmax(np.concatenate(outputs) / temperature)
