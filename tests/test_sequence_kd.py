"""Sequence-level KD (issue 12): each training document followed by the continuation its teacher writes, generated
once per site, cached, recorded in the site's ledger and never sent. Tiny random Gemma 3 configs."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from client.train import train_round
from coordinator.rounds import Coordinator
from distill.cache import ContinuationCache, TopKTargetCache
from distill.causal_train import teacher_continuations
from distill.causal_lm import tokenize_texts
from distill.data import SplitData
from protocols.accounting import PrivacyState, SitePolicy
from protocols.errors import ConfigError
from protocols.ledger import read_events
from tests.test_causal_lm import tiny_config, tiny_tokenizer
from tests.test_causal_rounds import TEXTS, config, folders, site, spec  # noqa: F401 (folders is a fixture)


def test_each_document_is_followed_by_the_teachers_own_greedy_continuation():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config()).eval()
    texts = ["the patient is well today", "is the patient", "the ill patient is well today"]
    encoded = tokenize_texts(tiny_tokenizer(), texts, 8)
    lengths = encoded["attention_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) > 1  # a batch of different lengths: generated left-padded, put back right
    out = teacher_continuations(teacher, encoded["input_ids"], encoded["attention_mask"], 4, batch_size=3,
                                pad_token_id=0)
    assert out["input_ids"].shape == (3, 12) and out["attention_mask"].shape == (3, 12)
    for row, length in enumerate(lengths):
        assert out["attention_mask"][row].tolist() == [1] * (length + 4) + [0] * (8 - length)
        assert np.array_equal(out["input_ids"][row, :length], encoded["input_ids"][row, :length])
        # The same continuation as the teacher writes for this document alone, without any padding.
        alone = teacher.generate(input_ids=torch.from_numpy(encoded["input_ids"][row:row + 1, :length]),
                                 max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out["input_ids"][row, length:length + 4].tolist() == alone[0, length:].tolist()


def test_continuation_tokens_are_validated(folders):  # noqa: F811
    with pytest.raises(ConfigError, match="continuation_tokens"):
        spec(folders, continuation_tokens=-1)
    assert spec(folders, continuation_tokens=3).causal_lm().continuation_tokens == 3
    assert spec(folders).causal_lm().continuation_tokens == 0


def test_a_dp_round_distils_on_the_continued_documents_generated_once(folders, tmp_path):  # noqa: F811
    run_config = config(folders, target_epsilon=8.0, target_delta=1e-3, student=spec(folders,
                                                                                     continuation_tokens=3))
    coordinator = Coordinator(run_config, "run", tmp_path / "run")
    sites = [site(folders, tmp_path, name, policy=SitePolicy(epsilon_per_run=8.0)) for name in ("a", "b")]
    for server_round in (1, 2):
        instruction = coordinator.instruction(server_round)
        for s in sites:
            update = train_round(s, instruction, coordinator.state)
            assert set(update.arrays) == set(coordinator.state)
    train_tokens = int(tokenize_texts(tiny_tokenizer(), TEXTS, 10)["attention_mask"].sum())
    for s in sites:
        continuations = ContinuationCache(s.state_dir).metadata()
        assert continuations["teacher_generations"] == 1 and continuations["sequences"] == len(TEXTS)
        events = [e["payload"] for e in read_events(s.state_dir / "ledger.jsonl")]
        kinds = [e["kind"] for e in read_events(s.state_dir / "ledger.jsonl")]
        generated = [p for p, k in zip(events, kinds) if k == "teacher-continuations-cached"]
        assert len(generated) == 1 and generated[0]["sent"] is False
        assert generated[0]["sha256"] == continuations["sha256"] and generated[0]["new_tokens"] == 3
        # The top-k targets cover every document's real tokens and its 3 continuation tokens.
        assert TopKTargetCache(s.state_dir).metadata()["positions"] == train_tokens + 3 * len(TEXTS)
        # One DP-SGD sample is still one document: the budget counts documents, not continued sequences.
        calibration = PrivacyState.load(s.state_dir).calibrations["run"]
        assert calibration.sample_rate == pytest.approx(run_config.batch_size / len(TEXTS))


def test_a_tampered_cache_is_regenerated_not_trusted(tmp_path):
    """Both teacher caches check their archive's SHA-256: a changed file is computed again, and counted."""
    encoded = tokenize_texts(tiny_tokenizer(), TEXTS[:4], 10)
    data = SplitData(encoded, np.zeros(4, np.int64), np.arange(4))
    calls = []

    def generate():
        calls.append(1)
        return {"input_ids": np.ones((4, 12), np.int64), "attention_mask": np.ones((4, 12), np.int64)}

    cache = ContinuationCache(tmp_path)
    first = cache.continued(data, "ab" * 32, 2, generate)
    assert first.computed is not None and cache.continued(data, "ab" * 32, 2, generate).computed is None
    cache.arrays_path.write_bytes(cache.arrays_path.read_bytes()[:-8] + b"tampered")
    again = cache.continued(data, "ab" * 32, 2, generate)
    assert again.computed is not None and len(calls) == 2 and cache.metadata()["teacher_generations"] == 2
    assert again.data.inputs["input_ids"].shape == (4, 12)
