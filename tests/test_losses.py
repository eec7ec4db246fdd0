import math

import pytest
import torch
from torch.nn import functional as F

from distill.losses import DistillationLoss, distillation_loss, temperature_at


def test_alpha_one_is_cross_entropy_and_alpha_zero_is_scaled_kl():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(distillation_loss(student, teacher, labels, 2.0, 1.0), F.cross_entropy(student, labels))
    t = 3.0
    expected = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    assert torch.allclose(distillation_loss(student, teacher, labels, t, 0.0), expected, atol=1e-6)


def test_per_sample_reduction_for_ghost_clipping():
    student, teacher, labels = torch.randn(5, 2), torch.randn(5, 2), torch.randint(0, 2, (5,))
    loss = DistillationLoss(2.0, 0.5, reduction="none")(student, labels, teacher)
    assert loss.shape == (5,)
    assert torch.allclose(loss.mean(), distillation_loss(student, teacher, labels, 2.0, 0.5))


def test_loss_is_zero_when_student_matches_teacher_and_alpha_zero():
    logits = torch.randn(4, 3)
    assert distillation_loss(logits, logits.clone(), torch.zeros(4, dtype=torch.long), 2.0, 0.0).abs() < 1e-6


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_go_from_start_to_end(schedule):
    assert temperature_at(1, 10, schedule, 10.0, 1.0) == pytest.approx(10.0)
    assert temperature_at(10, 10, schedule, 10.0, 1.0) == pytest.approx(1.0)
    middle = temperature_at(5, 9, schedule, 10.0, 1.0)
    assert middle == pytest.approx(5.5)


def test_constant_schedule_and_cosine_shape():
    assert temperature_at(7, 10, "constant", 2.0, 9.0) == 2.0
    assert temperature_at(2, 10, "cosine", 10.0, 1.0) > temperature_at(2, 10, "linear", 10.0, 1.0)
    assert not math.isnan(temperature_at(1, 1, "cosine", 10.0, 1.0))
