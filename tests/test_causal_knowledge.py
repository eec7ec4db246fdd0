"""The causal-LM knowledge channel (distill/causal_knowledge.py): next-token distributions at the proxy prompts' real
positions on shared tokens plus one bucket, exactly the model's own; the mean distilled back as top-k targets; and a
hybrid and a knowledge run of the health-tweets smoke preset through the CLI that verify."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.causal_knowledge import (distil_on_release, next_token_release, proxy_prompts, release_as_targets,
                                      shared_token_ids)
from distill.causal_train import CausalTrainSettings, causal_logits
from distill.data import SplitData
from protocols.errors import ConfigError
from tests.helpers import federation
from tests.test_causal_lm import VOCAB, tiny_config
from tests.test_cli_causal_lm import simulate
from tests.test_cli_simulate import run_cli


def prompts(rows: int = 4, length: int = 9, seed: int = 0) -> SplitData:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, (rows, length))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    return SplitData({"input_ids": ids, "attention_mask": mask}, np.zeros(rows, dtype=np.int64))


def test_shared_tokens_are_the_most_frequent_real_tokens_of_the_prompts_ties_to_the_smaller_id():
    data = SplitData({"input_ids": np.array([[5, 7, 7, 9, 3], [9, 9, 5, 2, 2]]),
                      "attention_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}, np.zeros(2, dtype=np.int64))
    # 9 three times, 5 and 7 twice (5 first), padding (3, 2) never counted.
    assert shared_token_ids(data, 3, 12).tolist() == [9, 5, 7]
    with pytest.raises(ConfigError, match="shares 1 to 11 tokens"):
        shared_token_ids(data, 12, 12)


def test_a_release_is_the_models_own_next_token_distribution_folded_onto_the_shared_tokens():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(2))
    data = proxy_prompts(model, prompts().inputs)
    shared = shared_token_ids(data, 6, VOCAB)
    release = next_token_release(model, data, shared, temperature=2.0)
    mask = data.inputs["attention_mask"].astype(bool)
    assert release.shape == (mask.sum(), 7) and np.allclose(release.sum(axis=1), 1.0)
    with torch.no_grad():
        full = torch.softmax(causal_logits(model.eval(), torch.as_tensor(data.inputs["input_ids"]),
                                           torch.as_tensor(data.inputs["attention_mask"])).double() / 2.0, -1)
    real = full[torch.as_tensor(mask)].numpy()
    np.testing.assert_allclose(release[:, :-1], real[:, shared], atol=1e-12)
    np.testing.assert_allclose(release[:, -1], 1.0 - real[:, shared].sum(axis=1), atol=1e-12)

    # As top-k targets at the same temperature, the k + 1 distribution is the release itself.
    targets = release_as_targets(release, data, shared, VOCAB, 2.0)
    np.testing.assert_allclose(targets.teacher_log_probs(2.0).numpy(), np.log(release), atol=1e-5)
    assert targets.offsets.tolist() == [0, 5, 14, 17, 26]

    # Distilling a fresh model towards it moves that model's own release towards it.
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_config(2))
    before = np.abs(next_token_release(other, data, shared, 2.0) - release).sum()
    trainable = [name for name, _ in other.named_parameters() if "embed" not in name]
    distil_on_release(other, data, release, shared, CausalTrainSettings(
        steps=40, batch_size=4, learning_rate=3e-3, temperature=2.0, alpha=0.0, seed=0, optimizer="adam"), trainable)
    assert np.abs(next_token_release(other, data, shared, 2.0) - release).sum() < 0.5 * before


def test_a_causal_knowledge_config_names_its_positions_and_only_the_local_student_source(tmp_path: Path):
    from distill.causal_lm import layer_subset_student, save_causal_lm_student
    from distill.models import path_digest
    from protocols.config import StudentSpec

    torch.manual_seed(0)
    save_causal_lm_student(layer_subset_student(AutoModelForCausalLM.from_config(tiny_config()), [0, 3]),
                           tmp_path / "base")
    causal = StudentSpec("causal_lm", {"base": str(tmp_path / "base"), "base_digest": path_digest(tmp_path / "base"),
                                       "top_k": 4, "temperatures": [2.0], "max_length": 8})
    knowledge = {"mode": "hybrid", "source": "local-student", "proxy_digest": "ab" * 32, "proxy_records": 4,
                 "classes": 7}
    with pytest.raises(ConfigError, match="proxy_positions"):
        federation(student=causal, knowledge=knowledge)
    with pytest.raises(ConfigError, match="proxy_positions"):
        federation(knowledge=knowledge | {"proxy_positions": 26})
    with pytest.raises(ConfigError, match="source 'public-teacher' is built for classification students only"):
        federation(student=causal, knowledge=knowledge | {"proxy_positions": 26, "source": "public-teacher"})
    config = federation(student=causal, knowledge=knowledge | {"proxy_positions": 26})
    assert config.knowledge.soft_label_shape == (26, 7) and config.knowledge.shared_tokens == 6


@pytest.mark.slow  # two minutes each on 2 cores; CI runs them (the release and its targets are tested above)
@pytest.mark.parametrize("mode", ["hybrid", "knowledge"])
def test_the_smoke_preset_runs_the_knowledge_channel_and_verifies(tmp_path: Path, mode: str):
    summary = simulate(tmp_path, "--preset", "smoke", "--knowledge-mode", mode, "--shared-tokens", "31")
    run_dir = Path(summary["paths"]["run_dir"])
    knowledge = json.loads((run_dir / "config.json").read_text())["federation"]["knowledge"]
    assert knowledge["classes"] == 32 and knowledge["proxy_records"] == 32 and knowledge["temperature"] == 1.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["aggregated"] * len(records)
    assert all(r["knowledge"]["shared_tokens"] == 31 and r["knowledge"]["server_steps"] > 0 for r in records)
    for site in summary["privacy"]["sites"]:
        events = [json.loads(line) for line in (run_dir / "sites" / site / "ledger.jsonl").read_text().splitlines()]
        for sent in (e["payload"] for e in events if e["kind"] == "update-sent"):
            assert sent["knowledge"]["shape"] == [knowledge["proxy_positions"], 32]
            if mode == "knowledge":  # only the release travels: its layout, whatever the student
                assert sent["bytes"] < 8 * (knowledge["proxy_positions"] * 32 + 1024)
    models = summary["models"]
    assert models["federated"]["overall"]["perplexity"] < models["undistilled"]["overall"]["perplexity"]
    verify = run_cli("verify", str(run_dir))
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert f"knowledge ({mode}, source local-student)" in verify.stdout
