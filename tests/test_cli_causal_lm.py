"""End-to-end through the CLI: `fedistill simulate --scenario health-tweets` (causal LM), then verify and report.

The fast test runs the smoke preset (a word-level LM trained on the public agencies' tweets as the teacher); the
slow one runs the tiny preset with the real Gemma 3 270M teacher.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.causal_train import score_tokens
from distill.data import load_splits
from tests.test_cli_simulate import run_cli


def simulate(out: Path, *args: str, timeout: int = 600) -> dict:
    result = run_cli("simulate", "--scenario", "health-tweets", "--out", str(out), "--format", "json", *args,
                     timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def config_base_digest(run_dir: Path) -> str:
    return json.loads((run_dir / "config.json").read_text())["federation"]["student"]["settings"]["base_digest"]


def check_causal_run(summary: dict, top1_improves: bool = True) -> Path:
    """What every causal-LM run must leave: a verified run, a report describing it, a deployable student.

    ``top1_improves``: whether the run is long enough for the student's top-1 agreement with the teacher to rise
    above the undistilled student's (the tiny preset's few steps only start to undo a layer-subset student's
    far-off predictions; its perplexity falls by orders of magnitude first)."""
    run_dir = Path(summary["paths"]["run_dir"])
    assert summary["task"] == "causal-lm" and summary["failed_rounds"] == []
    models = summary["models"]
    assert set(models) == set(summary["model_labels"])
    # Distillation helps: the federated student at epsilon 8 predicts the held-out tweets better than the same
    # initialisation without KD, and agrees with the teacher more often.
    assert models["federated"]["overall"]["perplexity"] < models["undistilled"]["overall"]["perplexity"]
    if top1_improves:
        assert models["federated"]["overall"]["top1_agreement"] > models["undistilled"]["overall"]["top1_agreement"]
    for site in summary["privacy"]["sites"].values():
        assert site["epsilon"] <= 8.0 + 1e-6 and site["delta"] is not None
    causal = summary["causal_lm"]
    for name, cache in causal["cache"].items():
        assert cache["teacher_forward_passes"] == 1
        assert cache["positions"] == summary["sites"][name]["train"]["tokens"] + \
            causal["continuation_tokens"] * summary["sites"][name]["train"]["records"]
    trainable_bytes = 8 * summary["size"]["student"]["trainable"]  # SecAgg+ vectors are float64
    assert all(0 < sent["bytes"] <= trainable_bytes + 1024 for sent in causal["sent_per_round"].values())

    verify = run_cli("verify", str(run_dir))
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    report = run_cli("report", str(run_dir), "--format", "json,html")
    assert report.returncode == 0, report.stderr[-3000:]
    built = json.loads((run_dir / "report" / "report.json").read_text())
    assert built["model_card"]["causal_lm"]["top_k"] == causal["top_k"]
    assert built["model_card"]["causal_lm"]["teacher"]["digest"] == causal["teacher"]["digest"]
    # Every preset starts the federation from a base the coordinator distilled on public text: the public-only
    # student is a baseline, and the report's stages say where each stage ran and what it read.
    stage = causal["public_stage"]
    assert stage["site_records_read"] == 0 and stage["epsilon"] == 0.0 and stage["public_texts"] > 0
    assert models["public_only"]["overall"]["perplexity"] < models["undistilled"]["overall"]["perplexity"]
    stages = built["model_card"]["distillation"]["stages"]
    assert [s["stage"] for s in stages] == ["coordinator", "federated"]
    assert stages[0]["public_digest"] == stage["public_digest"] and stages[0]["epsilon"] == 0.0
    assert stages[0]["product"].endswith(config_base_digest(run_dir))

    # The exported student loads with transformers alone and scores the held-out texts as the run reported.
    exported = AutoModelForCausalLM.from_pretrained(causal["exported_student"], local_files_only=True,
                                                    dtype=torch.float32)
    nll = []
    for name in summary["sites"]:
        test = load_splits(run_dir / "sites" / name / "data.npz")["test"]
        nll.append(score_tokens(exported, test.inputs["input_ids"], test.inputs["attention_mask"], 8).nll)
    assert np.exp(np.concatenate(nll).mean()) == pytest.approx(models["federated"]["overall"]["perplexity"], rel=1e-4)
    return run_dir


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    summary = simulate(tmp_path, "--preset", "smoke")
    run_dir = check_causal_run(summary)
    assert summary["causal_lm"]["fragments"] == "blocks"
    # Sequence-level KD: the teacher continued every training tweet once per site, and the continuations stayed.
    continuation_tokens = summary["causal_lm"]["continuation_tokens"]
    assert continuation_tokens == 4
    report = json.loads((run_dir / "report" / "report.json").read_text())
    for name, generated in summary["causal_lm"]["continuations"].items():
        records = summary["sites"][name]["train"]["records"]
        assert generated["teacher_generations"] == 1 and generated["new_tokens_total"] == 4 * records
        assert summary["causal_lm"]["cache"][name]["positions"] == summary["sites"][name]["train"]["tokens"] + \
            4 * records
        reported = report["data_flows"]["teacher_cache"]["sites"][name]["continuations"]
        assert reported["digest"] == generated["digest"] and reported["ledger_event"]["sent"] is False
    config = json.loads((run_dir / "config.json").read_text())
    assert config["federation"]["student"]["family"] == "causal_lm"


@pytest.mark.slow
def test_tiny_preset_with_the_real_gemma_teacher(tmp_path):
    summary = simulate(tmp_path, "--preset", "tiny", timeout=1800)
    check_causal_run(summary, top1_improves=False)
    assert summary["causal_lm"]["fragments"] == "lora" and summary["causal_lm"]["teacher"]["kind"] == "gguf"
    assert summary["size"]["non_embedding_ratio"] <= 0.2
    assert summary["size"]["latency_ms_per_token"]["speedup"] > 1.0
    assert summary["causal_lm"]["vocabulary"]["subset"] and summary["causal_lm"]["vocabulary"]["student_tokens"] < 262144
