"""Person-level DP-SGD: persons are sampled, each person's summed gradient is clipped as one, the accountant counts
persons; record-level stays available and is stated with its group-privacy bound."""

import math

import numpy as np
import pytest
import torch

from client.budget import sample_rate
from client.privacy import PersonUnits, person_units, private_distill, units_of_privacy
from client.site import create_site
from client.train import train_round
from distill.data import SplitData
from distill.losses import DistillationLoss
from distill.models import TabularMLP
from distill.train import TrainSettings
from protocols.accounting import Calibration, PrivacyState, group_privacy
from protocols.errors import ConfigError, UpdateRejected
from protocols.messages import TrainInstruction
from tests.helpers import make_site, tabular_split
from tests.test_privacy import global_state, instruction_for, private_federation


def test_persons_are_grouped_and_a_sampled_persons_records_all_come_with_them():
    units = PersonUnits.of(np.array([50, 30, 50, 70, 30, 50]))
    assert len(units) == 3 and units.most_records == 3
    # Persons in id order: 30 -> records 1, 4; 50 -> 0, 2, 5; 70 -> 3.
    rows, slots = units.records_of(torch.tensor([2, 0]))
    assert rows.tolist() == [3, 1, 4] and slots.tolist() == [0, 1, 1]
    assert person_units(np.arange(6), "person") is None  # one record each: the record mechanism itself
    assert person_units(np.array([1, 1, 2]), "record") is None


def _persons_split() -> SplitData:
    # Three persons with 1, 4 and 12 records: the last would dominate a record-level sum.
    rng = np.random.default_rng(3)
    counts = (1, 4, 12)
    x = rng.normal(size=(sum(counts), 5)).astype(np.float32) * 3
    return SplitData({"x": x}, rng.integers(0, 2, sum(counts)), np.repeat([11, 22, 33], counts))


def test_each_persons_summed_gradient_is_clipped_as_one_and_the_step_matches_the_brute_force():
    data = _persons_split()
    teacher = np.random.default_rng(4).normal(size=(len(data), 2)).astype(np.float32)
    torch.manual_seed(0)
    model = TabularMLP(5, [8], 2)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    clip, lr = 0.5, 1.0
    # Noise 0 and a sampling rate of 1: every person is in the one batch, so the update is deterministic.
    calibration = Calibration("run-p", 8.0, 1e-5, 0.0, sample_rate(3, 3), 1, 3, clip, 3, "prv", unit="person")
    settings = TrainSettings(steps=1, batch_size=3, learning_rate=lr, temperature=2.0, alpha=0.5, seed=0)
    private_distill(model, "mlp", data, teacher, settings, None, calibration, "ghost", [], "run-p", 1, 7)

    reference = TabularMLP(5, [8], 2)
    reference.load_state_dict(start)
    loss_of = DistillationLoss(2.0, 0.5)
    clipped_sum = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    norms = []
    for person in (11, 22, 33):
        rows = np.flatnonzero(data.groups == person)
        reference.zero_grad()
        # The person's total contribution: the sum of their records' losses (each record's loss, not the mean).
        loss = sum(loss_of(reference(torch.as_tensor(data.inputs["x"][[r]])), torch.as_tensor(data.labels[[r]]),
                           torch.as_tensor(teacher[[r]])) for r in rows)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
        norms.append(norm)
        for name, g in grads.items():
            clipped_sum[name] += g * min(1.0, clip / (norm + 1e-6))
    assert max(norms) > clip  # clipping binds, so the test tells person-level from record-level clipping
    for name, p in model.named_parameters():
        expected = start[name] - lr * clipped_sum[name] / 3  # Opacus divides by the expected batch (3 persons)
        assert torch.allclose(p.detach(), expected, atol=1e-5), name


def _site_with_persons(tmp_path, groups: np.ndarray | None):
    teacher_site = make_site(tmp_path)
    train = tabular_split(64, 0)
    train = SplitData(train.inputs, train.labels, np.zeros(0, dtype=np.int64) if groups is None else groups)
    splits = {"train": train, "val": tabular_split(32, 1), "test": tabular_split(32, 2)}
    return create_site(tmp_path / "persons", "persons", splits, teacher_site.teacher_path,
                       teacher_declaration=teacher_site.teacher_declaration)


@pytest.mark.parametrize("unit, expected_unit, units", [("person", "person", 16), ("record", "record", 64)])
def test_the_site_calibrates_for_persons_or_records_as_the_run_asks(tmp_path, unit, expected_unit, units):
    site = _site_with_persons(tmp_path, np.repeat(np.arange(16), 4))  # 16 persons of 4 records
    config = private_federation(privacy_unit=unit)
    update = train_round(site, instruction_for(config, 1), global_state(config))
    calibration = PrivacyState.load(site.state_dir).calibrations["run-a"]
    assert (calibration.unit, calibration.records) == (expected_unit, units)
    assert calibration.sample_rate == sample_rate(units, 16)
    assert calibration.delta == pytest.approx(min(1e-5, 1 / (10 * units)))
    assert 0 < update.privacy["epsilon-run"] < 4.0


def test_a_site_whose_records_name_no_person_calibrates_for_records(tmp_path):
    site = _site_with_persons(tmp_path, None)
    assert units_of_privacy(site.splits()["train"], "person") == ("record", 64)
    # One record per person (or groups that only number the records): one mechanism, stated as record-level.
    assert units_of_privacy(SplitData({"x": np.zeros((5, 1))}, np.zeros(5), np.arange(5)), "person") == ("record", 5)
    config = private_federation()
    train_round(site, instruction_for(config, 1), global_state(config))
    assert PrivacyState.load(site.state_dir).calibrations["run-a"].unit == "record"


def test_group_privacy_at_epsilon_8_for_12_records_is_vacuous_and_at_small_epsilon_it_is_not():
    vacuous = group_privacy(12, 8.0, 1e-5)
    assert vacuous["epsilon"] == 96.0 and vacuous["delta"] == 1.0 and vacuous["vacuous"]
    useful = group_privacy(2, 0.5, 1e-6)
    assert useful["delta"] == pytest.approx(2 * math.exp(0.5) * 1e-6) and not useful["vacuous"]


def test_the_unit_travels_in_the_instruction_and_a_bad_one_is_rejected_by_name():
    config = private_federation(privacy_unit="record")
    wire = instruction_for(config, 1).to_config()
    assert TrainInstruction.from_config(wire).privacy_unit == "record"
    with pytest.raises(UpdateRejected, match="privacy-unit"):
        TrainInstruction.from_config({**wire, "privacy-unit": "household"})
    with pytest.raises(ConfigError, match="privacy_unit"):
        private_federation(privacy_unit="household")
