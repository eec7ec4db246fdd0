"""DP-SGD distillation at a site, through Opacus's own PrivacyEngine, accountant and Poisson sampler.

Each round a fresh copy of the global student is wrapped by a PrivacyEngine whose accountant is the
site's accountant: it is restored from every spend the site has recorded (across rounds, runs and
processes), so the epsilon the engine reports after the round is the site's lifetime epsilon. The
noise multiplier comes from the run's calibration (:func:`client.budget.calibrate`), never recomputed
per round. Sampling and noise draw from generators seeded by a secret only the site knows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.data import SplitData
from distill.losses import DistillationLoss
from distill.models import student_forward
from distill.train import TrainOutcome, TrainSettings, freeze_except, make_optimizer
from protocols.accounting import Calibration, Spend

log = logging.getLogger("fedistill.site.privacy")


def _restored_engine(accountant: str, prior: Sequence[Spend]):
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=accountant)
    for spend in prior:
        if spend.steps and spend.noise_multiplier > 0:
            engine.accountant.history.append((spend.noise_multiplier, spend.sample_rate, spend.steps))
    return engine


def _counted_steps(history: Sequence[tuple[float, float, int]]) -> int:
    return sum(steps for _, _, steps in history)


def private_distill(model: nn.Module, family: str, data: SplitData, teacher_logits: np.ndarray,
                    settings: TrainSettings, trainable: Collection[str] | None, calibration: Calibration,
                    grad_sample_mode: str, prior: Sequence[Spend], run_id: str, server_round: int,
                    secret_seed: int) -> tuple[TrainOutcome, Spend]:
    """``settings.steps`` Poisson-sampled DP-SGD steps on ``data``; returns the outcome and the spend counted.

    ``prior`` is the site's spend history: the engine's accountant continues from it. An empty Poisson
    batch still takes an accounted noise-only step, which is the mechanism the accountant analyses.
    """
    if len(data) != calibration.records:
        raise RuntimeError(f"the training split has {len(data)} records but run {run_id} was calibrated for "
                           f"{calibration.records}; a site's data must not change during a run.")
    parameters = freeze_except(model, trainable)
    optimizer = make_optimizer(settings.optimizer, parameters, settings.learning_rate)
    sampling = torch.Generator().manual_seed(secret_seed)
    noise = torch.Generator().manual_seed(secret_seed + 1)
    loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=calibration.batch_size, generator=sampling)
    criterion = DistillationLoss(settings.temperature, settings.alpha)
    with warnings.catch_warnings():
        # Opacus warns that a non-secure RNG is used (torchcsprng is unavailable); docs/privacy.md says so.
        warnings.simplefilter("ignore")
        engine = _restored_engine(calibration.accountant, prior)
        before = _counted_steps(engine.accountant.history)
        wrapped = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                      noise_multiplier=calibration.noise_multiplier,
                                      max_grad_norm=calibration.max_grad_norm, grad_sample_mode=grad_sample_mode,
                                      noise_generator=noise, poisson_sampling=True)
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, private_criterion, private_loader = wrapped
    else:
        (private_model, private_optimizer, private_loader), private_criterion = wrapped, criterion
    if abs(1.0 / len(private_loader) - calibration.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus samples at rate {1.0 / len(private_loader)} but run {run_id} was calibrated "
                           f"at {calibration.sample_rate}.")
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    teacher = torch.as_tensor(teacher_logits, dtype=torch.float32)
    inputs = {name: torch.as_tensor(values) for name, values in data.inputs.items()}
    private_model.train()
    total, steps, empty = 0.0, 0, 0
    with warnings.catch_warnings():
        # Ghost clipping's second backward pass fires full backward hooks on inputs that need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while steps < settings.steps:
            for (index,) in private_loader:
                private_optimizer.zero_grad(set_to_none=True)
                if len(index) == 0:
                    empty += 1
                    for parameter in parameters:
                        if grad_sample_mode == "ghost":
                            parameter.grad = torch.zeros_like(parameter)
                        else:
                            parameter.grad_sample = torch.zeros((0, *parameter.shape))
                else:
                    logits, _ = student_forward(private_model, family, {k: v[index] for k, v in inputs.items()})
                    loss = private_criterion(logits, labels[index], teacher[index])
                    loss.backward()
                    total += float(loss.detach())
                private_optimizer.step()
                steps += 1
                if steps == settings.steps:
                    break
    private_model.cleanup()  # removes Opacus's hooks and per-sample attributes from the student
    freeze_except(model, None)
    counted = _counted_steps(engine.accountant.history) - before
    if counted != steps:
        raise RuntimeError(f"Opacus's accountant counted {counted} steps but {steps} were taken; refusing to send an "
                           "update whose privacy cost is unknown.")
    if empty:
        log.info("round %d: %d empty Poisson batch(es) took a noise-only step", server_round, empty)
    spend = Spend(run_id=run_id, round=server_round, noise_multiplier=calibration.noise_multiplier,
                  sample_rate=calibration.sample_rate, steps=counted, empty_batches=empty)
    return TrainOutcome(mean_loss=total / max(steps - empty, 1), steps=steps, examples=len(data)), spend
