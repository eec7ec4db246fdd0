"""``fedistill export``: a finished run's student as the files a serving team deploys, signed, with a model card.

    OUT/config.json, model.safetensors     the save_pretrained folder (tensors exactly as the ledger hashed them)
    OUT/modeling_fedistill_mlp.py          a tabular student's transformers code (loads with trust_remote_code)
    OUT/tokenizer files                    a text student's tokenizer (its teacher's)
    OUT/onnx/model.onnx                    fp32 ONNX; model.int8.onnx, model.int4.onnx where asked for
    OUT/README.md                          the model card (Hugging Face sections)
    OUT/fedistill_export.json              what was exported, parity, quantization and quality on held-out inputs
    OUT/provenance/                        the run's coordinator ledger, its key, and the key endorsement
    OUT/model.sig                          the OpenSSF model-signing bundle over every file above

The folder is built beside OUT and renamed into place only when every file is written and signed: an export that
fails leaves nothing half-written, and a folder that is not a fedistill export is never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compliance.model_card import model_card_markdown
from compliance.model_signature import DEFAULT_KEY_FILE, MANIFEST_FILE, sign_folder, write_provenance
from compliance.report import build_report
from protocols.canonical import atomic_directory, atomic_write_bytes, atomic_write_json, file_sha256
from protocols.errors import ConfigError
from protocols.pki import generate_model_signing_key
from serving.artefacts import (ONNX_DIR, ONNX_FILES, ONNX_TOLERANCE, HeldOut, RunStudent, causal_quality,
                               check_heldout, check_parity, classifier_quality, default_tokenizer, export_onnx,
                               finished_student, heldout_inputs, max_abs_difference, onnx_logits, onnx_session,
                               parity_inputs, quantize_int4, quantize_int8, torch_logits, write_pretrained)

SCHEMA_VERSION = 1
FORMATS = ("safetensors", "onnx")
QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class ExportRequest:
    """What ``fedistill export`` was asked for, validated at the boundary."""

    run_dir: Path
    out: Path
    formats: tuple[str, ...] = FORMATS
    quantize: tuple[str, ...] = ()
    signing_key: Path | None = None
    ledger_key: Path | None = None
    inputs: Path | None = None
    tokenizer: Path | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConfigError(f"--format: {', '.join(unknown) or 'nothing'} is not one of {', '.join(FORMATS)} "
                              "(comma-separated, e.g. safetensors,onnx).")
        if "safetensors" not in self.formats:
            raise ConfigError("--format must include safetensors: the safetensors weights are what the ledger vouches "
                              "for and what verify-model checks.")
        unknown = [q for q in self.quantize if q not in QUANTIZATIONS]
        if unknown:
            raise ConfigError(f"--quantize: {', '.join(unknown)} is not one of {', '.join(QUANTIZATIONS)}.")
        if self.quantize and "onnx" not in self.formats:
            raise ConfigError("--quantize needs --format onnx: the quantized students are onnxruntime models.")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
            raise ConfigError(f"--out {out} exists and is not an earlier fedistill export; choose an empty or new "
                              "folder (an earlier export there is replaced, anything else is never touched).")

    @staticmethod
    def parse_list(raw: str, option: str) -> tuple[str, ...]:
        values = tuple(v.strip().lower() for v in raw.split(",") if v.strip())
        if len(set(values)) != len(values):
            raise ConfigError(f"{option}: {raw!r} names a value twice.")
        return values


def _signing_key(request: ExportRequest) -> Path:
    """The coordinator's P-256 model-signing key: given, or a simulated run's own, made on its first export."""
    if request.signing_key is not None:
        return Path(request.signing_key)
    path = Path(request.run_dir) / DEFAULT_KEY_FILE
    if not path.is_file():
        if not (Path(request.run_dir) / "ledger_key.pem").is_file():
            raise ConfigError(f"--signing-key is required: {request.run_dir} is a deployed run, whose coordinator "
                              f"holds the model-signing key (COORDINATOR_DIR/{DEFAULT_KEY_FILE}).")
        generate_model_signing_key(path)
    return path


def _ledger_key(request: ExportRequest) -> Path:
    path = Path(request.ledger_key) if request.ledger_key else Path(request.run_dir) / "ledger_key.pem"
    if not path.is_file():
        raise ConfigError(f"--ledger-key {path} does not exist: the coordinator's ledger key endorses the "
                          "model-signing key (a deployed coordinator's is COORDINATOR_DIR/coordinator_key.pem).")
    return path


def _evaluate(student: RunStudent, heldout: HeldOut, session=None) -> dict[str, Any]:
    """Held-out metrics of the student (``session`` None) or of an onnxruntime copy: a classifier's with the binary
    decision threshold chosen on the validation inputs as the run does; a causal LM's perplexity."""
    if student.family == "causal_lm":
        return causal_quality(student, heldout.test.inputs, session)

    def logits(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return torch_logits(student, inputs) if session is None else onnx_logits(session, inputs)

    validation = heldout.validation
    return classifier_quality(heldout, logits(heldout.test.inputs),
                              lambda: logits(validation.inputs) if validation is not None else None)


def _variants(student: RunStudent, staging: Path, request: ExportRequest, heldout: HeldOut | None,
              progress) -> dict[str, Any]:
    """ONNX and its quantized forms, each with its parity against torch and its held-out quality."""
    sample = parity_inputs(student, heldout)
    reference = torch_logits(student, sample)
    variants: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    if "onnx" in request.formats:
        progress("ONNX")
        fp32 = staging / ONNX_DIR / ONNX_FILES["fp32"]
        record = export_onnx(student, fp32, sample)
        sessions["onnx-fp32"] = onnx_session(fp32)
        record["parity"] = {"max_abs_logit_difference": check_parity(reference, onnx_logits(sessions["onnx-fp32"],
                                                                                             sample), str(fp32.name)),
                            "tolerance": ONNX_TOLERANCE, "records": len(reference),
                            "inputs": "held-out" if heldout is not None else "synthetic (no held-out records)"}
        variants["onnx-fp32"] = record
        for level in request.quantize:
            progress(f"{level} quantization")
            target = staging / ONNX_DIR / ONNX_FILES[level]
            record = quantize_int8(fp32, target) if level == "int8" else quantize_int4(fp32, target)
            if record.get("file"):
                sessions[f"onnx-{level}"] = onnx_session(target)
                quantized = onnx_logits(sessions[f"onnx-{level}"], sample)
                record["max_abs_logit_difference_to_fp32"] = max_abs_difference(reference, quantized)
            variants[f"onnx-{level}"] = record
    quality: dict[str, Any] = {}
    if heldout is not None:
        progress("held-out quality of every file")
        quality["torch-fp32"] = _evaluate(student, heldout)
        quality |= {name: _evaluate(student, heldout, session) for name, session in sessions.items()}
    return {"variants": variants, "quality": quality}


def export_run(request: ExportRequest, progress=lambda step: None) -> dict[str, Any]:
    """Export, evaluate, card and sign; returns the manifest written as ``fedistill_export.json``."""
    progress("the run's student against its signed ledger")
    student = finished_student(request.run_dir)
    signing_key, ledger_key = _signing_key(request), _ledger_key(request)
    heldout = heldout_inputs(request.run_dir, request.inputs)
    check_heldout(student, heldout)
    tokenizer = request.tokenizer if request.tokenizer is not None else default_tokenizer(request.run_dir, student)
    if student.family != "mlp" and tokenizer is None:
        raise ConfigError(f"--tokenizer is required: the {student.family} student reads token ids, and the run's "
                          "teacher names no tokenizer folder; pass the folder of the tokenizer the sites used.")
    with atomic_directory(Path(request.out)) as staging:
        progress("save_pretrained")
        pretrained = write_pretrained(student, staging, tokenizer)
        evaluated = _variants(student, staging, request, heldout, progress)
        progress("model card")
        report = build_report(request.run_dir)
        headline = report["evaluation"]["headline_metric"]
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "run_id": student.run_id, "config_hash": student.config_hash,
            "family": student.family, "student_digest": student.final["student_digest"],
            "final_round": student.final["final_round"], "ledger_head": student.final["ledger_head"],
            "ledger_weights": pretrained["weights"], "class_names": student.class_names,
            "pretrained": pretrained, **evaluated, "headline_metric": headline,
            "heldout": heldout.source if heldout is not None else None,
        }
        manifest["signature"] = write_provenance(staging, Path(request.run_dir), student.run_id, signing_key,
                                                 ledger_key)
        atomic_write_bytes(staging / "README.md", model_card_markdown(report, manifest).encode("utf-8"))
        manifest["files"] = {str(p.relative_to(staging)): file_sha256(p)
                             for p in sorted(staging.rglob("*")) if p.is_file()}
        atomic_write_json(staging / MANIFEST_FILE, manifest)
        progress("signature")
        sign_folder(staging, signing_key)
    return manifest
