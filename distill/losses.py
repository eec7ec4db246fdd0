"""Distillation losses and temperature schedules.

The loss is ``alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``. ``reduction="none"``
returns one loss per sample, which Opacus ghost clipping needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from protocols.config import TEMPERATURE_SCHEDULES
from protocols.errors import ConfigError

REDUCTIONS = ("mean", "sum", "none")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float, reduction: str = "mean") -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                  F.log_softmax(teacher_logits / temperature, dim=-1),
                  reduction="none", log_target=True).sum(-1) * temperature ** 2
    per_sample = alpha * ce + (1.0 - alpha) * kl
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


class DistillationLoss(nn.Module):
    """The distillation loss as a module with a settable ``reduction`` (the form Opacus's ghost clipping wraps)."""

    def __init__(self, temperature: float, alpha: float, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature, self.alpha, self.reduction = temperature, alpha, reduction

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.reduction)


def hidden_alignment_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module,
                          reduction: str = "mean") -> torch.Tensor:
    """MSE between the projected student representation and the teacher's (FitNets-style hint)."""
    per_sample = ((projection(student_hidden) - teacher_hidden) ** 2).mean(-1)
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def temperature_at(server_round: int, total_rounds: int, schedule: str, start: float, end: float) -> float:
    """Temperature for a 1-based round: constant (``start``), or linear/cosine from ``start`` to ``end``."""
    if schedule not in TEMPERATURE_SCHEDULES:
        raise ConfigError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}.")
    if schedule == "constant" or total_rounds == 1:
        return float(start)
    progress = (server_round - 1) / (total_rounds - 1)
    if schedule == "linear":
        return float(start + (end - start) * progress)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress)))
