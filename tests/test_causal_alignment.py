"""Hidden-state alignment for causal-LM students (distill.causal_train.alignment_loss): the teacher's layer outputs
cached with its top-k targets, a per-sequence term that training lowers, under DP-SGD too."""

import numpy as np
import pytest
import torch

from client.privacy import private_distill_causal
from distill.causal_lm import add_lora, layer_subset_student, trainable_tensor_names
from distill.causal_train import (CausalTrainSettings, SequenceKDLoss, alignment_loss, distill_causal, layer_outputs,
                                  split_sequences, teacher_targets)
from distill.token_kd import TopKTargets
from protocols.accounting import Calibration
from protocols.errors import ConfigError
from tests.test_causal_train import K, settings
from tests.test_causal_train import data, teacher  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def aligned_targets(teacher, data):  # noqa: F811
    return teacher_targets(teacher, data.inputs["input_ids"], data.inputs["attention_mask"], K, batch_size=5,
                           hidden_layers=(1, 3))


def alignment(student, data, targets, layers):
    ids, mask = split_sequences(data)
    with torch.no_grad(), layer_outputs(student, layers) as outputs:
        student(input_ids=ids, attention_mask=mask)
        return alignment_loss(outputs, layers, targets, mask)


def test_the_cache_holds_the_teachers_layer_outputs_at_the_real_positions(teacher, data, aligned_targets):  # noqa: F811
    ids, mask = split_sequences(data)
    with torch.no_grad():
        states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hidden = aligned_targets.hidden
    assert hidden.dtype == np.float32 and hidden.shape == (int(mask.sum()), 2, teacher.config.hidden_size)
    # hidden_states[i + 1] is layer i's output for every layer but the last (whose entry is after the final norm).
    np.testing.assert_allclose(hidden[:, 0], states[2][mask.bool()].numpy(), rtol=2e-3, atol=2e-3)
    restored = TopKTargets.from_arrays(aligned_targets.to_arrays())
    assert np.array_equal(restored.select([3, 1]).hidden,
                          np.concatenate([hidden[restored.offsets[3]:restored.offsets[4]],
                                          hidden[restored.offsets[1]:restored.offsets[2]]]))


def test_a_student_with_the_teachers_layers_is_aligned_and_a_subset_is_not(teacher, data, aligned_targets):  # noqa: F811
    whole = layer_subset_student(teacher, [0, 1, 2, 3])
    assert float(alignment(whole, data, aligned_targets, (1, 3)).max()) < 1e-6  # the same layers compute the same states
    subset = layer_subset_student(teacher, [0, 3])
    assert float(alignment(subset, data, aligned_targets, (0, 1)).min()) > 1e-3


def test_each_sequences_alignment_term_is_its_own(teacher, data, aligned_targets):  # noqa: F811
    student = layer_subset_student(teacher, [0, 3])
    together = alignment(student, data, aligned_targets, (0, 1))
    for i in (0, 5, 9):
        one = type(data)({k: v[i:i + 1] for k, v in data.inputs.items()}, data.labels[i:i + 1])
        assert float(alignment(student, one, aligned_targets.select([i]), (0, 1))[0]) == pytest.approx(
            float(together[i]), rel=1e-5)


def test_training_with_alignment_lowers_it_and_dp_sgd_runs_with_it(teacher, data, aligned_targets):  # noqa: F811
    student = layer_subset_student(teacher, [0, 3])
    names = trainable_tensor_names(student)
    before = float(alignment(student, data, aligned_targets, (0, 1)).mean())
    tuned = settings(steps=20, learning_rate=0.05, optimizer="adam", alignment_weight=5.0, alignment_layers=(0, 1))
    distill_causal(student, data, aligned_targets, tuned, names)
    assert float(alignment(student, data, aligned_targets, (0, 1)).mean()) < 0.7 * before
    lora = add_lora(layer_subset_student(teacher, [0, 3]))
    calibration = Calibration("run-a", 8.0, 1e-5, 1.0, 0.25, 4, 4, 1.0, len(data), "prv")
    outcome, spend = private_distill_causal(lora, data, aligned_targets, settings(steps=4, alignment_weight=1.0,
                                                                                  alignment_layers=(0, 1)),
                                            trainable_tensor_names(lora), calibration, [], "run-a", 1, 3)
    assert np.isfinite(outcome.mean_loss) and spend.steps == 4


def test_alignment_needs_layers_and_a_cache_that_holds_them(teacher, data):  # noqa: F811
    with pytest.raises(ConfigError, match="alignment"):
        CausalTrainSettings(steps=1, batch_size=2, learning_rate=0.1, temperature=1.0, alpha=0.5, seed=0,
                            alignment_weight=1.0)
    plain = teacher_targets(teacher, data.inputs["input_ids"], data.inputs["attention_mask"], K, batch_size=5)
    ids, mask = split_sequences(data)
    criterion = SequenceKDLoss(layer_subset_student(teacher, [0, 3]),
                               settings(alignment_weight=1.0, alignment_layers=(0, 1)))
    with pytest.raises(ConfigError, match="rebuild it with hidden_layers"):
        criterion(ids, mask, plain)
    with pytest.raises(ConfigError, match="decoder layers 0..1"):
        alignment(layer_subset_student(teacher, [0, 3]), data, plain, (0, 5))


def test_the_cache_keeps_hidden_states_beyond_float16s_range(aligned_targets):
    # The real Gemma's residual stream after its last layer has entries above 65,504, float16's largest value.
    arrays = aligned_targets.to_arrays()
    arrays["hidden"] = arrays["hidden"].copy()
    arrays["hidden"][0, 1, 0] = 1.0e5
    assert TopKTargets.from_arrays(arrays).hidden[0, 1, 0] == 1.0e5
    with pytest.raises(ValueError, match="finite float32"):
        TopKTargets.from_arrays({**arrays, "hidden": arrays["hidden"].astype(np.float16)})
