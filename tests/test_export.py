"""A deployable student: `fedistill export`, `fedistill verify-model` and `fedistill bench` through the CLI, on the
hospitals MLP (here) and on the drug-reviews BERT student (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli_simulate import run_cli

MODEL_SIGNING = [str(Path(sys.executable).with_name("model_signing"))]


def export(run_dir: Path, out: Path) -> dict:
    """`fedistill export RUN_DIR --out OUT --quantize int8,int4`, its manifest."""
    result = run_cli("export", str(run_dir), "--out", str(out), "--quantize", "int8,int4", "--output", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def simulate(tmp_path: Path, *args: str) -> tuple[dict, Path]:
    """A scenario's run through the CLI: its summary and run directory."""
    result = run_cli("simulate", *args, "--out", str(tmp_path / "runs"), "--format", "json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    return summary, Path(summary["paths"]["run_dir"])


@pytest.fixture(scope="module")
def exported(verified_run, tmp_path_factory):
    """The shared small hospitals run, copied (the export adds its model-signing key), exported with int8 and int4."""
    base = tmp_path_factory.mktemp("export")
    run_dir = Path(shutil.copytree(verified_run, base / "run"))
    out = base / "student"
    return run_dir, out, export(run_dir, out)


@pytest.fixture
def export_copy(exported, tmp_path):
    run_dir, out, manifest = exported
    return run_dir, Path(shutil.copytree(out, tmp_path / "student")), manifest


def verify_model(*args: str) -> subprocess.CompletedProcess:
    return run_cli("verify-model", *args, "--format", "json")


def test_export_writes_a_loadable_signed_student_with_parity_and_quality(exported):
    run_dir, out, manifest = exported
    for name in ("config.json", "model.safetensors", "modeling_fedistill_mlp.py", "README.md", "model.sig",
                 "fedistill_export.json", "onnx/model.onnx", "onnx/model.int8.onnx", "provenance/ledger.jsonl"):
        assert (out / name).is_file(), name
    assert (run_dir / "model_signing_key.pem").stat().st_mode & 0o077 == 0
    assert manifest["variants"]["onnx-fp32"]["parity"]["max_abs_logit_difference"] <= 1e-4
    assert manifest["variants"]["onnx-fp32"]["parity"]["inputs"] == "held-out"
    # The MLP's layers are Gemm nodes, which onnxruntime's weight-only int4 quantizer does not take: said, not faked.
    assert manifest["variants"]["onnx-int4"]["file"] is None and "Gemm" in manifest["variants"]["onnx-int4"]["skipped"]
    assert not (out / "onnx" / "model.int4.onnx").exists()
    # The exported student scores exactly what the run's own evaluation gave the federated student.
    summary = json.loads((run_dir / "summary.json").read_text())
    federated = summary["models"]["federated"]["overall"]["roc_auc"]
    assert manifest["quality"]["torch-fp32"]["roc_auc"] == pytest.approx(federated, abs=1e-9)
    assert manifest["quality"]["onnx-fp32"]["roc_auc"] == pytest.approx(federated, abs=1e-6)
    assert 0.0 < manifest["quality"]["onnx-int8"]["roc_auc"] <= 1.0
    card = (out / "README.md").read_text()
    for section in ("## Model details", "## Uses", "## Bias, risks, and limitations", "## Training details",
                    "### Differential privacy", "## Evaluation", "## Provenance"):
        assert section in card
    assert manifest["student_digest"] in card and "student, ONNX int8" in card and "epsilon" in card
    # Hugging Face's own parser reads the front matter: the pipeline and the held-out result.
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data
    assert data.pipeline_tag == "tabular-classification"
    assert data.eval_results[0].metric_value == pytest.approx(round(federated, 4))


def test_the_exported_folder_loads_with_the_auto_classes_and_matches_onnxruntime(exported):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    _, out, manifest = exported
    model = AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"} and len(model.config.feature_names) == 31
    x = np.random.default_rng(0).standard_normal((16, 31)).astype(np.float32)
    with torch.no_grad():
        reference = model(x=torch.from_numpy(x)).logits.numpy()
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["logits"], {"x": x})[0] - reference).max() <= 1e-4


def test_verify_model_passes_and_the_model_signing_cli_agrees(exported):
    run_dir, out, _ = exported
    result = verify_model(str(out), "--run", str(run_dir))
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout)
    assert checked["verified"] and checked["run_pinned"] and len(checked["checks"]) == 5
    alone = subprocess.run([*MODEL_SIGNING, "verify", "key", "--signature", str(out / "model.sig"), "--public_key",
                            str(out / "model_signing_key.pub.pem"), str(out)], capture_output=True, text=True)
    assert alone.returncode == 0 and "Verification succeeded" in alone.stdout


@pytest.mark.parametrize("tamper", ["weights", "card", "added-file", "onnx"])
def test_a_tampered_export_fails_verify_model(export_copy, tamper):
    _, out, _ = export_copy
    if tamper == "weights":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(out / "model.safetensors"))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + np.float32(1e-3)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif tamper == "card":
        (out / "README.md").write_text((out / "README.md").read_text().replace("epsilon", "epsilon (unlimited)"))
    elif tamper == "added-file":
        (out / "onnx" / "extra.onnx").write_bytes(b"\0")
    else:
        data = bytearray((out / "onnx" / "model.onnx").read_bytes())
        data[-10] ^= 0xFF
        (out / "onnx" / "model.onnx").write_bytes(bytes(data))
    result = verify_model(str(out))
    assert result.returncode == 1
    failure = json.loads(result.stdout)["failure"]
    assert "model.sig" in failure and "does not verify" in failure


def test_a_resigned_export_fails_on_the_endorsement(export_copy, tmp_path):
    """Someone who swaps the weights and signs with their own key is caught: the run's ledger key never endorsed it."""
    from compliance.model_signature import sign_folder
    from cryptography.hazmat.primitives import serialization

    from protocols.pki import generate_model_signing_key

    _, out, _ = export_copy
    key = generate_model_signing_key(tmp_path / "other.pem")
    (out / "model_signing_key.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    sign_folder(out, tmp_path / "other.pem")
    result = verify_model(str(out))
    assert result.returncode == 1 and "does not endorse" in json.loads(result.stdout)["failure"]


def test_verify_model_pins_the_run(exported, verified_run, tmp_path):
    _, out, _ = exported
    other = Path(shutil.copytree(verified_run, tmp_path / "other"))
    # Another coordinator's key: same run content, a different ledger key.
    from protocols.ledger import generate_signing_key, public_key_pem

    key = generate_signing_key(tmp_path / "k.pem")
    (other / "ledger_key.pub.pem").write_text(public_key_pem(key))
    result = verify_model(str(out), "--run", str(other))
    assert result.returncode == 1 and "another coordinator" in json.loads(result.stdout)["failure"]


def test_export_refuses_an_unfinished_run_a_swapped_student_and_a_foreign_folder(run_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    from protocols.errors import ConfigError, LedgerTampered
    from serving.export import ExportRequest, export_run

    ledger = run_copy / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    kinds = [json.loads(line)["kind"] for line in lines]
    unfinished = Path(shutil.copytree(run_copy, tmp_path / "unfinished"))
    (unfinished / "ledger.jsonl").write_text("".join(lines[:kinds.index("run-finished")]))
    result = run_cli("export", str(unfinished), "--out", str(tmp_path / "a"))
    assert result.returncode == 1 and "has not finished" in result.stderr and not (tmp_path / "a").exists()

    weights = run_copy / "student" / "model.safetensors"
    save_file({name: value * np.float32(1.01) for name, value in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(LedgerTampered, match="swapped or damaged"):
        export_run(ExportRequest(run_copy, tmp_path / "b"))
    assert not (tmp_path / "b").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier fedistill export"):
        ExportRequest(run_copy, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="needs --format onnx"):
        ExportRequest(run_copy, tmp_path / "c", formats=("safetensors",), quantize=("int8",))

    shutil.rmtree(run_copy / "student")
    with pytest.raises(ConfigError, match="final checkpoint is missing"):
        export_run(ExportRequest(run_copy, tmp_path / "c"))


@pytest.mark.slow  # about 30 s: five worker processes; the default suite stays under 10 minutes
def test_bench_compares_the_teacher_and_every_student_form(exported, tmp_path):
    run_dir, _, _ = exported
    result = run_cli("bench", str(run_dir), "--quick", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher" in result.stdout and "load average" in result.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["model"]: row for row in bench["rows"]}
    assert list(rows) == ["teacher", "student, torch fp32", "student, ONNX fp32", "student, ONNX int8"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows["teacher"]["headline"] == pytest.approx(summary["models"]["teacher"]["overall"]["roc_auc"], abs=1e-9)
    assert rows["student, torch fp32"]["headline"] == pytest.approx(
        summary["models"]["federated"]["overall"]["roc_auc"], abs=1e-9)
    for row in rows.values():
        assert row["file_bytes"] > 0 and row["latency_calls"] >= 50 and row["peak_rss_mib"] > 0
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0 and row["throughput_per_s"] > 0
        assert all(isinstance(row[key], list) for key in ("untrustworthy", "ratio_untrustworthy", "memory_untrustworthy"))
    assert rows["teacher"]["x_faster_batch1"] == pytest.approx(1.0)
    assert rows["student, ONNX int8"]["headline_change_vs_fp32"] is not None
    assert rows["student, torch fp32"]["file_bytes"] < rows["teacher"]["file_bytes"]


@pytest.mark.slow
def test_the_text_path_exports_verifies_and_benches(tmp_path):
    """The drug-reviews BERT student: save_pretrained with its tokenizer, ONNX, int8 and int4 (its MatMuls are
    quantized), verify-model, and bench against the MiniLM teacher."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, run_dir = simulate(tmp_path, "--scenario", "drug-reviews", "--rounds", "1", "--subsample", "0.3",
                          "--local-steps", "2")
    out = tmp_path / "student"
    manifest = export(run_dir, out)
    assert manifest["family"] == "bert" and manifest["pretrained"]["tokenizer"]
    assert manifest["variants"]["onnx-fp32"]["parity"]["max_abs_logit_difference"] <= 1e-4
    assert manifest["variants"]["onnx-int4"]["matmuls_quantized"] > 0 and (out / "onnx" / "model.int4.onnx").is_file()
    assert set(manifest["quality"]) == {"torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int4"}
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    encoded = tokenizer(["this drug helped my migraine", "terrible side effects"], padding="max_length",
                        max_length=64, truncation=True, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.arange(64).repeat(2, 1)).logits.numpy()
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0] - reference).max() <= 1e-4
    assert verify_model(str(out), "--run", str(run_dir)).returncode == 0
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNK2]"', 1))
    assert verify_model(str(out)).returncode == 1
    result = run_cli("bench", str(run_dir), "--format", "json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["model"]: row for row in json.loads(result.stdout)["rows"]}
    assert "student, ONNX int4" in rows and rows["teacher"]["parameters"] > 10 * rows["student, ONNX fp32"]["parameters"]


@pytest.mark.slow
def test_the_causal_lm_student_exports_verifies_and_benches(tmp_path):
    """The health-tweets smoke preset: the merged student loads with AutoModelForCausalLM, its ONNX logits match, every
    file's held-out perplexity is measured, verify-model checks the trainable tensors the ledger hashed."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    summary, run_dir = simulate(tmp_path, "--scenario", "health-tweets", "--preset", "smoke")
    out = tmp_path / "student"
    manifest = export(run_dir, out)
    assert manifest["ledger_weights"] == "fedistill/trainable.safetensors" and manifest["pretrained"]["tokenizer"]
    assert manifest["variants"]["onnx-fp32"]["parity"]["max_abs_logit_difference"] <= 1e-4
    federated = summary["models"]["federated"]["overall"]["perplexity"]
    assert manifest["quality"]["torch-fp32"]["perplexity"] == pytest.approx(federated, rel=1e-9)
    assert manifest["quality"]["onnx-fp32"]["perplexity"] == pytest.approx(federated, rel=1e-5)
    assert set(manifest["quality"]) == {"torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int4"}
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = np.array([[2, 10, 11, 12, 13, 14]], dtype=np.int64)
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
                  - reference).max() <= 1e-4
    assert verify_model(str(out), "--run", str(run_dir)).returncode == 0
    result = run_cli("bench", str(run_dir), "--quick", "--format", "json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads(result.stdout)
    rows = {row["model"]: row for row in bench["rows"]}
    assert bench["headline_metric"] == "perplexity" and bench["lower_is_better"]
    assert rows["teacher"]["headline"] == pytest.approx(summary["models"]["teacher"]["overall"]["perplexity"],
                                                        rel=1e-9)
    assert all(row["tokens_per_s"] > 0 and row["latency_per_token_ms"] > 0 for row in rows.values())
