"""A student vocabulary subset fixed from public text (distill/vocabulary.py): the teacher's distribution mapped onto
it, a standard save_pretrained student, and held-out perplexity still over the teacher's full vocabulary."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.causal_lm import layer_subset_student, save_causal_lm_student, student_from_config
from distill.causal_train import causal_logits, score_tokens, teacher_targets
from distill.vocabulary import public_vocabulary, restrict_vocabulary, vocabulary_of
from protocols.errors import ConfigError
from tests.test_causal_lm import VOCAB, tiny_config


@pytest.fixture()
def teacher():
    torch.manual_seed(0)
    return student_from_config(tiny_config()).eval().requires_grad_(False)


def public_ids(seed: int = 0):
    ids = np.random.default_rng(seed).integers(4, 30, (30, 10))  # public text uses ids 4..29 only
    return ids, np.ones_like(ids)


def test_public_vocabulary_keeps_the_frequent_and_the_special_tokens():
    ids, mask = public_ids()
    subset = public_vocabulary(ids, mask, VOCAB, 20, always=[0, 1, 2])
    assert subset.size == 21 and subset.oov_id == 20 and subset.dropped == VOCAB - 20
    assert list(subset.teacher_ids[:3]) == [0, 1, 2] and set(subset.teacher_ids[3:]) <= set(range(4, 30))
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    assert counts[subset.teacher_ids[3:]].min() >= counts[[i for i in range(4, 30) if i not in subset.teacher_ids]].max()
    assert subset.student_ids(np.array([0, 45])).tolist() == [0, subset.oov_id]
    with pytest.raises(ConfigError, match="vocabulary size"):
        public_vocabulary(ids, mask, VOCAB, 2, always=[0, 1, 2])


def test_teacher_distribution_on_the_subset_keeps_kept_probabilities_and_puts_the_rest_on_oov(teacher):
    subset = public_vocabulary(*public_ids(), VOCAB, 20, always=[0, 1, 2])
    logits = torch.randn(3, 5, VOCAB, dtype=torch.float64)
    mapped = subset.teacher_logits_on_subset(logits)
    full, on_subset = logits.softmax(-1), mapped.softmax(-1)
    kept = torch.from_numpy(subset.teacher_ids)
    assert torch.allclose(on_subset[..., :-1], full[..., kept], atol=1e-12)
    assert torch.allclose(on_subset[..., -1], 1 - full[..., kept].sum(-1), atol=1e-12)


def test_restricted_student_is_a_standard_model_with_the_teachers_rows(teacher, tmp_path):
    subset = public_vocabulary(*public_ids(), VOCAB, 20, always=[0, 1, 2])
    full = layer_subset_student(teacher, [0, 3])
    ids = torch.from_numpy(subset.teacher_ids[np.random.default_rng(1).integers(0, 20, (2, 6))])
    mask = torch.ones_like(ids)
    expected = causal_logits(full.eval(), ids, mask)[..., torch.from_numpy(subset.teacher_ids)]
    student = restrict_vocabulary(layer_subset_student(teacher, [0, 3]), subset)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert not student.get_input_embeddings().weight.requires_grad  # still the frozen, shared embedding
    save_causal_lm_student(student, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"), local_files_only=True).eval()
    assert loaded.config.vocab_size == 21 and vocabulary_of(loaded).teacher_ids.tolist() == subset.teacher_ids.tolist()
    got = causal_logits(loaded, subset.student_ids(ids), mask)
    assert torch.allclose(got[..., :-1], expected, atol=1e-5)


def test_perplexity_of_a_subset_student_is_over_the_full_vocabulary(teacher):
    subset = public_vocabulary(*public_ids(), VOCAB, 20, always=[0, 1, 2])
    student = restrict_vocabulary(layer_subset_student(teacher, [0, 3]), subset).eval()
    inside = subset.teacher_ids[3:9]
    ids = np.array([[inside[0], inside[1], 45, inside[2], inside[3]]])  # 45 is outside the subset
    mask = np.ones_like(ids)
    scores = score_tokens(student, ids, mask, 4)
    with torch.no_grad():
        logits = causal_logits(student, subset.student_ids(torch.from_numpy(ids)), torch.from_numpy(mask))[0].double()
    log_probs = logits.log_softmax(-1)
    targets = subset.student_ids(ids[0])
    expected = [-float(log_probs[p, targets[p + 1]]) for p in range(4)]
    expected[1] += math.log(subset.dropped)  # position 1 predicts the dropped token 45
    assert np.allclose(scores.nll, expected, atol=1e-6)
    assert set(scores.top1.tolist()) <= set(subset.teacher_ids.tolist()) | {-1}
    # Targets built through the subset are over the student's ids.
    targets = teacher_targets(teacher, subset.teacher_ids[None, 3:9], np.ones((1, 6), np.int64), 4, 2,
                              vocabulary=subset)
    assert targets.vocab_size == subset.size
