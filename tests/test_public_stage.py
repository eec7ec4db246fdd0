"""The coordinator's public stage of a causal-LM run (coordinator.public_stage): the base student distilled on public
text before any site trains, recorded inside the digest-pinned base folder and in the coordinator's signed ledger.
Tiny random Gemma 3 configs; the whole path through the CLI is tests/test_cli_causal_lm.py."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.public_stage import PublicStageSettings, distill_on_public
from coordinator.rounds import Coordinator
from distill.causal_lm import (CausalLMTeacher, base_provenance, layer_subset_student, load_causal_lm_student,
                               save_causal_lm_student, student_record, tokenize_texts)
from distill.causal_train import split_scores
from distill.data import SplitData
from distill.models import path_digest
from protocols.config import FederationConfig, StudentSpec
from protocols.errors import ConfigError
from protocols.ledger import read_events
from tests.test_causal_lm import tiny_config, tiny_tokenizer

PUBLIC = ["the patient is well today", "the patient is ill", "is the patient well", "today the patient is ill",
          "well the patient is today", "the ill patient is well"] * 4


def split(texts):
    encoded = tokenize_texts(tiny_tokenizer(), texts, 10)
    return SplitData(encoded, np.zeros(len(texts), np.int64), np.arange(len(texts)))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher, first trained a little on the public texts, so that its targets carry something to learn."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    data = split(PUBLIC)
    ids, mask = torch.from_numpy(data.inputs["input_ids"]), torch.from_numpy(data.inputs["attention_mask"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    return CausalLMTeacher(model, tiny_tokenizer(), tmp_path_factory.mktemp("t"), "checkpoint", "ab" * 32)


SETTINGS = PublicStageSettings(steps=40, batch_size=8, learning_rate=3e-3, top_k=8)


def test_public_stage_lowers_held_out_perplexity_and_records_itself(teacher, tmp_path):
    student = layer_subset_student(teacher.model, [0, 3])
    held_out = {"public": split(PUBLIC[:6])}
    before = split_scores(student, held_out, 4)["public"].perplexity
    frozen = student.get_input_embeddings().weight.detach().clone()
    record = distill_on_public(student, teacher, split(PUBLIC), SETTINGS, tmp_path / "cache")
    after = split_scores(student, held_out, 4)["public"].perplexity
    assert after < 0.8 * before
    # The frozen, vocabulary-sized embedding did not move; every other tensor trained.
    assert torch.equal(student.get_input_embeddings().weight, frozen)
    assert record["trained_parameters"] == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert record["site_records_read"] == 0 and record["epsilon"] == 0.0
    assert record["teacher_digest"] == teacher.digest and record["public_texts"] == len(PUBLIC)
    assert record["public_digest"] == split(PUBLIC).digest()
    # The record is saved inside the base folder's config.json, so the base digest pins it.
    save_causal_lm_student(student, tmp_path / "base")
    assert student_record(tmp_path / "base")["public_stage"] == record
    assert student_record(load_causal_lm_student(tmp_path / "base"))["public_stage"] == record


def test_the_teacher_runs_once_for_the_same_public_texts(teacher, tmp_path):
    calls = []
    original = teacher.model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    students = [layer_subset_student(teacher.model, [0, 3]) for _ in range(2)]  # before the teacher is wrapped
    teacher.model.forward = counting
    try:
        for student in students:
            distill_on_public(student, teacher, split(PUBLIC),
                              PublicStageSettings(steps=2, batch_size=8, learning_rate=1e-3, top_k=8),
                              tmp_path / "cache")
    finally:
        del teacher.model.forward
    assert len(calls) == 3  # 24 texts in batches of 8, once


def test_the_coordinator_ledger_records_how_the_base_was_made(teacher, tmp_path):
    student = layer_subset_student(teacher.model, [0, 3])
    record = distill_on_public(student, teacher, split(PUBLIC), SETTINGS, tmp_path / "cache")
    base = save_causal_lm_student(student, tmp_path / "base")
    settings = {"base": str(base), "base_digest": path_digest(base), "lora": {"r": 2, "alpha": 4,
                "targets": ["q_proj"]}, "top_k": 8, "divergence": "forward_kl", "beta": 0.5, "temperatures": [1.0],
                "max_length": 10}
    config = FederationConfig.from_dict({"student": StudentSpec("causal_lm", settings), "rounds": 1,
                                         "temperature_start": 1.0, "temperature_end": 1.0})
    coordinator = Coordinator(config, "run-1", tmp_path / "run")
    coordinator.ledger  # opens the ledger with its run-started event
    started = [e for e in read_events(tmp_path / "run" / "ledger.jsonl") if e["kind"] == "run-started"][0]
    provenance = started["payload"]["student_base"]
    assert provenance == base_provenance(config.student.causal_lm())
    assert provenance["digest"] == path_digest(base) and provenance["teacher_layers"] == [0, 3]
    assert provenance["public_stage"] == record


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("learning_rate", 0.0),
                                          ("optimizer", "lamb"), ("divergence", "kl"), ("alpha", 1.5)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PublicStageSettings(**{**SETTINGS.to_dict(), field: value})


def test_too_few_public_texts_for_a_batch_is_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        distill_on_public(layer_subset_student(teacher.model, [0, 3]), teacher, split(PUBLIC[:4]), SETTINGS,
                          tmp_path / "cache")


def test_operator_builds_a_public_stage_base_through_the_cli(teacher, tmp_path):
    """``fedistill coordinator base-student``: the folder, its digest and its public stage, as the operator sends
    them to the sites; a vocabulary subset needs public text."""
    import json

    from typer.testing import CliRunner

    from fedistill.cli import app

    teacher_dir = save_causal_lm_student(teacher.model, tmp_path / "teacher", tiny_tokenizer())
    corpus = tmp_path / "public.txt"
    corpus.write_text("\n".join(PUBLIC) + "\n\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["coordinator", "base-student", str(tmp_path / "base"), "--teacher", str(teacher_dir),
                                 "--layers", "0,3", "--public", str(corpus), "--vocabulary", "8", "--max-length",
                                 "10", "--steps", "5", "--batch-size", "8", "--top-k", "4", "--format", "json"])
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    assert built["base_digest"] == path_digest(tmp_path / "base")
    assert built["teacher_layers"] == [0, 3] and built["vocabulary_tokens"] == 9
    assert built["public_stage"]["public_texts"] == len(PUBLIC) and built["public_stage"]["settings"]["steps"] == 5
    assert student_record(tmp_path / "base")["public_stage"] == built["public_stage"]
    assert load_causal_lm_student(tmp_path / "base").config.vocab_size == 9

    refused = runner.invoke(app, ["coordinator", "base-student", str(tmp_path / "other"), "--teacher",
                                  str(teacher_dir), "--layers", "0,3", "--vocabulary", "8"])
    assert refused.exit_code == 1 and "--public" in refused.output
    assert not (tmp_path / "other").exists()
