"""Causal-LM students in a round (issue 12): the spec at the boundary, what travels, the site's top-k cache, the
teacher declaration in DP runs, checkpoints. Tiny random Gemma 3 configs; the Flower path is tests/test_cli_causal_lm.py."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from client.site import create_site
from client.teacher import TeacherDeclaration
from client.train import train_round
from coordinator.checkpoint import load_student
from coordinator.replies import SiteReply
from coordinator.rounds import Coordinator
from distill.cache import TopKTargetCache
from distill.causal_lm import layer_subset_student, save_causal_lm_student, student_from_config, tokenize_texts
from distill.data import SplitData
from distill.models import path_digest, student_state
from protocols.accounting import SitePolicy
from protocols.config import FederationConfig, StudentSpec
from protocols.errors import ConfigError, UpdateRejected
from protocols.ledger import read_events
from tests.helpers import PUBLIC_TEACHER
from tests.test_causal_lm import tiny_config, tiny_tokenizer

TEXTS = ["the patient is well today", "the patient is ill", "is the patient well", "the patient is ill today",
         "today the patient is well", "well the patient is", "the ill patient is well today", "the patient today"] * 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny teacher folder (with its tokenizer) and a 2-of-4-layer base student saved from it."""
    root = tmp_path_factory.mktemp("causal")
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config())
    save_causal_lm_student(teacher, root / "teacher", tiny_tokenizer())
    save_causal_lm_student(layer_subset_student(teacher, [0, 3]), root / "base")
    return root


def spec(folders, lora: bool = True, **changes) -> StudentSpec:
    settings = {"base": str(folders / "base"), "base_digest": path_digest(folders / "base"),
                "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]} if lora else None, "top_k": 8,
                "divergence": "forward_kl", "beta": 0.5, "temperatures": [2.0, 1.0], "max_length": 10, **changes}
    return StudentSpec("causal_lm", settings)


def config(folders, lora: bool = True, **overrides) -> FederationConfig:
    return FederationConfig.from_dict({"student": spec(folders, lora), "rounds": 2, "local_steps": 3,
                                       "batch_size": 4, "learning_rate": 0.01, "optimizer": "adam",
                                       "temperature_start": 2.0, "temperature_end": 1.0,
                                       "temperature_schedule": "linear", **overrides})


def site(folders, directory, name="site-a", declaration=PUBLIC_TEACHER, policy=None):
    encoded = tokenize_texts(tiny_tokenizer(), TEXTS, 10)
    data = SplitData(encoded, np.zeros(len(TEXTS), np.int64), np.arange(len(TEXTS)))
    return create_site(directory / name, name, {"train": data, "val": data, "test": data}, folders / "teacher",
                       policy, bytes(32), teacher_declaration=declaration)


def test_causal_lm_spec_is_validated_at_the_boundary(folders):
    with pytest.raises(ConfigError, match="base_digest"):
        spec(folders, base_digest="abc")
    with pytest.raises(ConfigError, match="top_kk"):
        spec(folders, top_kk=3)
    with pytest.raises(ConfigError, match="divergence"):
        spec(folders, divergence="kl")
    with pytest.raises(ConfigError, match="temperatures"):
        config(folders, temperature_start=5.0)  # the schedule leaves the cache's grid
    with pytest.raises(ConfigError, match="hidden_alignment_weight"):
        config(folders, hidden_alignment_weight=0.5)
    with pytest.raises(ConfigError, match="alignment_weight"):
        spec(folders, alignment_weight=1.0)  # no layer pairs to align
    with pytest.raises(ConfigError, match="'alignment'"):
        spec(folders, alignment=[[0, -1]], alignment_weight=1.0)
    aligned = spec(folders, alignment=[[0, 0], [1, 3]], alignment_weight=0.5).causal_lm()
    assert aligned.alignment == ((0, 0), (1, 3)) and aligned.teacher_hidden_layers == (0, 3)


def test_a_base_folder_that_is_not_the_pinned_one_is_refused(folders, tmp_path):
    torch.manual_seed(1)
    save_causal_lm_student(student_from_config(tiny_config(2)), tmp_path / "other")
    with pytest.raises(ConfigError, match="hashes to"):
        Coordinator(FederationConfig.from_dict({"student": spec(folders, base=str(tmp_path / "other")),
                                                "temperature_start": 1.0, "temperature_end": 1.0}),
                    "run", tmp_path / "run")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "blocks-aligned"])
def test_only_trainable_tensors_travel_and_the_teacher_runs_once(folders, tmp_path, lora):
    run_config = config(folders, lora) if lora else FederationConfig.from_dict({
        **config(folders, lora).to_dict(), "student": spec(folders, False, alignment=[[0, 0], [1, 3]],
                                                           alignment_weight=0.5)})
    coordinator = Coordinator(run_config, "run", tmp_path / "run")
    names = set(coordinator.state)
    if lora:
        assert names and all("lora_" in name for name in names)
    else:
        assert not any("embed" in name for name in names) and any("layers.1." in name for name in names)
    sites = [site(folders, tmp_path, name) for name in ("site-a", "site-b")]
    for server_round in (1, 2):
        instruction = coordinator.instruction(server_round)
        replies = []
        for s in sites:
            update = train_round(s, instruction, coordinator.state)
            assert set(update.arrays) == names
            replies.append(SiteReply(s.name, update.arrays, update.num_examples, update.train_loss,
                                     update.privacy | {"ledger-seq": server_round * 10, "ledger-hash": "ab" * 32},
                                     binding=instruction.binding()))
        before = dict(coordinator.state)
        record = coordinator.complete_round(server_round, replies, {}, started=0.0)
        assert record["status"] == "aggregated", record
        assert any(not np.array_equal(before[k], coordinator.state[k]) for k in names)
    for s in sites:
        cache = TopKTargetCache(s.state_dir)
        assert cache.metadata()["teacher_forward_passes"] == 1 and cache.metadata()["k"] == 8
        assert cache.metadata()["hidden_layers"] == ([] if lora else [0, 3])
        cached = [e["payload"] for e in read_events(s.state_dir / "ledger.jsonl")
                  if e["kind"] == "teacher-targets-cached"]
        assert len(cached) == 1 and cached[0]["sent"] is False and cached[0]["sha256"] == cache.metadata()["sha256"]
        accepted = next(e["payload"] for e in read_events(s.state_dir / "ledger.jsonl") if e["kind"] == "run-accepted")
        assert accepted["teacher"]["training_data"] == "public"
        assert accepted["teacher"]["digest"] == path_digest(folders / "teacher")
    # The checkpoint holds exactly the trainable tensors; loading it gives the global student back.
    model, _ = load_student(coordinator.student_dir)
    restored = student_state(model, "causal_lm")
    assert set(restored) == names and all(np.array_equal(restored[k], coordinator.state[k]) for k in names)


def test_a_private_non_dp_teacher_is_refused_for_a_dp_run_before_anything_is_spent(folders, tmp_path):
    coordinator = Coordinator(config(folders, target_epsilon=8.0), "run", tmp_path / "run")
    private = site(folders, tmp_path, declaration=TeacherDeclaration("private", description="fine-tuned on records"),
                   policy=SitePolicy(epsilon_per_run=8.0))
    with pytest.raises(UpdateRejected, match="acknowledge_non_dp"):
        train_round(private, coordinator.instruction(1), coordinator.state)
    assert not (private.state_dir / "ledger.jsonl").exists() or not any(
        e["kind"] == "run-accepted" for e in read_events(private.state_dir / "ledger.jsonl"))
    acknowledged = site(folders, tmp_path, "site-b", TeacherDeclaration("private", acknowledge_non_dp=True),
                        SitePolicy(epsilon_per_run=8.0))
    update = train_round(acknowledged, coordinator.instruction(1), coordinator.state)
    assert update.privacy["epsilon-run"] > 0
    accepted = next(e["payload"] for e in read_events(acknowledged.state_dir / "ledger.jsonl")
                    if e["kind"] == "run-accepted")
    assert accepted["teacher"]["acknowledged_non_dp"] is True
