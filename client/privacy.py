"""DP-SGD distillation at a site, through Opacus's own PrivacyEngine, accountant and Poisson sampler.

Each round a fresh copy of the global student is wrapped by a PrivacyEngine whose accountant is the
site's accountant: it is restored from every spend the site has recorded (across rounds, runs and
processes), so the epsilon the engine reports after the round is the site's lifetime epsilon. The
noise multiplier comes from the run's calibration (:func:`client.budget.calibrate`), never recomputed
per round. Sampling and noise draw from generators seeded by a secret only the site knows.
:func:`private_distill` trains the classification families (mlp, bert), :func:`private_distill_causal` a
causal-LM student; both run the same loop (:func:`_private_steps`).

The unit of privacy is one person where the site's records name their person (:class:`PersonUnits`): Poisson
sampling draws persons, every record of a drawn person is in the batch, and the gradient Opacus clips is the sum
of that person's per-record gradients, so adding or removing one person changes the noised sum by at most the
clipping norm, however many records they have. Otherwise it is one record.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.causal_train import CausalTrainSettings, check_targets, kd_criterion, split_sequences, trainable_only
from distill.data import SplitData
from distill.losses import DistillationLoss
from distill.models import student_forward
from distill.token_kd import TopKTargets
from distill.train import TrainOutcome, TrainSettings, freeze_except, make_optimizer
from protocols.accounting import Calibration, Spend
from protocols.errors import ConfigError

log = logging.getLogger("fedistill.site.privacy")

# One Poisson-sampled batch: (the model Opacus returned, the criterion it returned, the batch's record indices)
# -> the loss to call backward() on.
BatchLoss = Callable[[nn.Module, Callable, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PersonUnits:
    """A training split's records grouped by person: the units person-level DP-SGD samples and clips."""

    order: torch.Tensor  # record indices, each person's records contiguous
    offsets: torch.Tensor  # person p owns order[offsets[p]:offsets[p + 1]]

    @classmethod
    def of(cls, groups: np.ndarray) -> PersonUnits:
        """From each record's person id (distill.data.SplitData.groups)."""
        _, owner, counts = np.unique(groups, return_inverse=True, return_counts=True)
        order = np.argsort(owner, kind="stable")
        return cls(torch.as_tensor(order, dtype=torch.long),
                   torch.as_tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def most_records(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1]).max()) if len(self) else 0

    def records_of(self, persons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The records of the sampled ``persons`` and, for each record, its person's position in ``persons``."""
        starts, ends = self.offsets[persons], self.offsets[persons + 1]
        counts = ends - starts
        slots = torch.repeat_interleave(torch.arange(len(persons)), counts)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return self.order[starts[slots] + within], slots


def units_of_privacy(data: SplitData, requested: str) -> tuple[str, int]:
    """The unit a site calibrates for, and how many there are: persons when the run asks for person-level privacy
    and the records name persons of several records; otherwise records. A site without a person column cannot
    count persons, and where every person has one record the two are one mechanism, stated as record-level (the
    report then says that each person has one record)."""
    if requested == "person" and data.max_records_per_person() > 1:
        return "person", int(len(np.unique(data.groups)))
    return "record", len(data)


def person_units(groups: np.ndarray, unit: str) -> PersonUnits | None:
    """The persons to sample for a person-level run whose records name persons; None when each record is its own
    unit (a record-level run, records without person ids, or every person with one record: the same mechanism)."""
    if unit != "person" or not len(groups):
        return None
    units = PersonUnits.of(groups)
    return units if units.most_records > 1 else None


def _sum_per_person(parameters: Sequence[nn.Parameter], slots: torch.Tensor, persons: int) -> None:
    """Replace each per-record gradient row by its person's sum (what the optimizer then clips per row)."""
    for parameter in parameters:
        per_record = parameter.grad_sample
        if isinstance(per_record, list):
            per_record = torch.cat(per_record)
        parameter.grad_sample = torch.zeros((persons, *per_record.shape[1:]), dtype=per_record.dtype).index_add_(
            0, slots, per_record)


def _restored_engine(accountant: str, prior: Sequence[Spend]):
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=accountant)
    for spend in prior:
        if spend.steps and spend.noise_multiplier > 0:
            engine.accountant.history.append((spend.noise_multiplier, spend.sample_rate, spend.steps))
    return engine


def _counted_steps(history: Sequence[tuple[float, float, int]]) -> int:
    return sum(steps for _, _, steps in history)


def _private_steps(model: nn.Module, parameters: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                   criterion: Callable, records: int, steps: int, calibration: Calibration, grad_sample_mode: str,
                   prior: Sequence[Spend], run_id: str, server_round: int, secret_seed: int,
                   batch_loss: BatchLoss, persons: PersonUnits | None = None) -> tuple[float, Spend]:
    """``steps`` Poisson-sampled DP-SGD steps over ``records`` records; returns the mean loss and the spend counted.

    ``parameters`` are the trainable ones (the only ones requiring grad). ``prior`` is the site's spend history:
    the engine's accountant continues from it. An empty Poisson batch still takes an accounted noise-only step,
    which is the mechanism the accountant analyses. With ``persons`` the sampled units are persons: each step's
    batch is every record of the sampled persons, and each person's gradient is clipped as one (Opacus's hooks
    give per-record gradients, which are summed per person before the optimizer clips them).
    """
    units = records if persons is None else len(persons)
    expected_unit = "person" if persons is not None else calibration.unit
    if units != calibration.records or calibration.unit != expected_unit:
        raise RuntimeError(f"the training split has {units} {expected_unit}s but run {run_id} was calibrated for "
                           f"{calibration.records} {calibration.unit}s; a site's data must not change during a run.")
    if persons is not None:
        # Ghost clipping never materialises a record's gradient, so it cannot sum a person's: hooks do.
        grad_sample_mode = "hooks"
    sampling = torch.Generator().manual_seed(secret_seed)
    noise = torch.Generator().manual_seed(secret_seed + 1)
    loader = DataLoader(TensorDataset(torch.arange(units)), batch_size=calibration.batch_size, generator=sampling)
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
    # The loader's own rate, not 1 / len(loader): Opacus truncates 1 / (1 / 93) = 92.99... to 92 batches.
    if abs(private_loader.sample_rate - calibration.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus samples at rate {private_loader.sample_rate} but run {run_id} was calibrated "
                           f"at {calibration.sample_rate}.")
    private_model.train()
    total, taken, empty = 0.0, 0, 0
    with warnings.catch_warnings():
        # Ghost clipping's second backward pass fires full backward hooks on inputs that need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while taken < steps:
            for (index,) in private_loader:
                private_optimizer.zero_grad(set_to_none=True)
                if len(index) == 0:
                    empty += 1
                    for parameter in parameters:
                        if grad_sample_mode == "ghost":
                            parameter.grad = torch.zeros_like(parameter)
                        else:
                            parameter.grad_sample = torch.zeros((0, *parameter.shape))
                elif persons is None:
                    loss = batch_loss(private_model, private_criterion, index)
                    loss.backward()
                    total += float(loss.detach())
                else:
                    rows, slots = persons.records_of(index)
                    loss = batch_loss(private_model, private_criterion, rows)
                    loss.backward()
                    _sum_per_person(parameters, slots, len(index))
                    total += float(loss.detach())
                private_optimizer.step()
                taken += 1
                if taken == steps:
                    break
    private_model.cleanup()  # removes Opacus's hooks and per-sample attributes from the student
    counted = _counted_steps(engine.accountant.history) - before
    if counted != taken:
        raise RuntimeError(f"Opacus's accountant counted {counted} steps but {taken} were taken; refusing to send an "
                           "update whose privacy cost is unknown.")
    if empty:
        log.info("round %d: %d empty Poisson batch(es) took a noise-only step", server_round, empty)
    spend = Spend(run_id=run_id, round=server_round, noise_multiplier=calibration.noise_multiplier,
                  sample_rate=calibration.sample_rate, steps=counted, empty_batches=empty)
    return total / max(taken - empty, 1), spend


def private_distill(model: nn.Module, family: str, data: SplitData, teacher_logits: np.ndarray,
                    settings: TrainSettings, trainable: Collection[str] | None, calibration: Calibration,
                    grad_sample_mode: str, prior: Sequence[Spend], run_id: str, server_round: int,
                    secret_seed: int) -> tuple[TrainOutcome, Spend]:
    """``settings.steps`` Poisson-sampled DP-SGD steps on ``data``; returns the outcome and the spend counted.

    ``prior`` is the site's spend history: the engine's accountant continues from it. An empty Poisson
    batch still takes an accounted noise-only step, which is the mechanism the accountant analyses. The
    calibration's unit says whether a person (all of their records in ``data``) or a record is sampled and clipped.
    """
    parameters = freeze_except(model, trainable)
    optimizer = make_optimizer(settings.optimizer, parameters, settings.learning_rate)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    teacher = torch.as_tensor(teacher_logits, dtype=torch.float32)
    inputs = {name: torch.as_tensor(values) for name, values in data.inputs.items()}

    def batch_loss(private_model: nn.Module, private_criterion: Callable, index: torch.Tensor) -> torch.Tensor:
        logits, _ = student_forward(private_model, family, {k: v[index] for k, v in inputs.items()})
        return private_criterion(logits, labels[index], teacher[index])

    criterion = DistillationLoss(settings.temperature, settings.alpha)
    mean_loss, spend = _private_steps(model, parameters, optimizer, criterion, len(data), settings.steps, calibration,
                                      grad_sample_mode, prior, run_id, server_round, secret_seed, batch_loss,
                                      person_units(data.groups, calibration.unit))
    freeze_except(model, None)
    return TrainOutcome(mean_loss=mean_loss, steps=spend.steps, examples=len(data)), spend


def private_distill_causal(model: nn.Module, data: SplitData, targets: TopKTargets, settings: CausalTrainSettings,
                           trainable: Collection[str], calibration: Calibration, prior: Sequence[Spend], run_id: str,
                           server_round: int, secret_seed: int,
                           grad_sample_mode: str = "ghost") -> tuple[TrainOutcome, Spend]:
    """:func:`distill.causal_train.distill_causal` under DP-SGD: Poisson-sampled sequences, each sequence's gradient
    of its own loss (the per-sequence KD loss of distill.token_kd) clipped, noise added, steps accounted.

    One sample is one sequence (one document): Opacus clips per row of the batch, and the criterion's
    ``reduction="none"`` is one loss per sequence. Only the ``trainable`` tensors (blocks or LoRA adapters)
    require grad inside Opacus, so only they are clipped, noised and changed; every other tensor is as frozen
    afterwards as before.

    Ghost clipping is the default because it works with this model: with peft's LoRA layers and with Gemma's
    decoder blocks (their Linear layers by ghost norms, Gemma's own RMSNorm through Opacus's functorch fallback)
    its clipped update equals the per-sequence brute force (tests/test_causal_train.py), and its memory does not
    grow with the batch: hooks materialise every trained tensor once per sequence (for the 4-layer Gemma
    student's 22.3M block parameters, 89 MB per sequence in the batch). Hooks give the same update and were
    measured 4-11% faster on the real 4-layer student at 8 x 32 tokens (docs/performance.md), where the frozen
    262k-token output layer dominates both; for LoRA's few tensors hooks cost no memory to speak of, so
    ``grad_sample_mode="hooks"`` is a sound choice there.
    """
    input_ids, attention_mask = split_sequences(data)
    check_targets(targets, len(data))
    with trainable_only(model, trainable) as parameters:
        criterion = kd_criterion(model, settings, input_ids, attention_mask)
        if criterion.trains_output_layer:
            # Opacus refuses Gemma's scaled embedding (a layer with a buffer), and its per-sequence gradient would be
            # vocabulary-sized; the students keep the teacher's embedding frozen.
            raise ConfigError("DP-SGD on a causal-LM student trains decoder blocks or LoRA adapters only; the "
                              "embedding and output layer must stay frozen (layer_subset_student freezes them).")
        optimizer = make_optimizer(settings.optimizer, parameters, settings.learning_rate)

        def batch_loss(_private_model: nn.Module, private_criterion: Callable, index: torch.Tensor) -> torch.Tensor:
            # The criterion runs the student itself: Opacus's hooks sit on the student's modules, wrapped or not.
            return private_criterion(input_ids[index], attention_mask[index], targets.select(index.numpy()))

        mean_loss, spend = _private_steps(model, parameters, optimizer, criterion, len(data), settings.steps,
                                          calibration, grad_sample_mode, prior, run_id, server_round, secret_seed,
                                          batch_loss, person_units(data.groups, calibration.unit))
    return TrainOutcome(mean_loss=mean_loss, steps=spend.steps, examples=len(data)), spend
