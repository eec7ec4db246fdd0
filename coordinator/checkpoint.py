"""Atomic checkpoints of the global student: written into a temporary folder, then renamed into place.

A crash mid-write leaves the previous checkpoint intact. Each checkpoint carries the resolved run
configuration and its hash; transformers classifiers are written with ``save_pretrained``; a causal LM's
trainable tensors, and other students, as safetensors with the student spec beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.models import build_student, load_student_state, student_state
from protocols.canonical import atomic_directory, atomic_write_json
from protocols.config import FederationConfig, StudentSpec
from protocols.errors import ConfigError

SCHEMA_VERSION = 1
MANIFEST = "checkpoint.json"


def save_student(model: nn.Module, spec: StudentSpec, directory: Path, config: FederationConfig,
                 extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        if spec.family == "causal_lm":
            # The trainable tensors only: the frozen base is the spec's digest-pinned folder (hundreds of MB for a
            # real LLM), and an exported, standalone student is distill.causal_lm.export_causal_lm_student's job.
            save_file({name: torch.from_numpy(value) for name, value in student_state(model, spec.family).items()},
                      str(staging / "model.safetensors"))
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(str(staging))
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
        atomic_write_json(staging / MANIFEST, {
            "schema_version": SCHEMA_VERSION,
            "student": spec.to_dict(),
            "config": config.to_dict(),
            "config_hash": config.config_hash(),
            **(extra or {}),
        })
    return directory


def load_student(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"'{directory}' is not a fedistill checkpoint (no {MANIFEST}).")
    manifest = json.loads(manifest_path.read_text())
    spec = StudentSpec.from_dict(manifest["student"])
    if spec.family == "bert":
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification.from_pretrained(str(directory), local_files_only=True), manifest
    model = build_student(spec)
    if spec.family == "causal_lm":
        load_student_state(model, spec.family, {name: tensor.numpy() for name, tensor in
                                                load_file(str(directory / "model.safetensors")).items()})
    else:
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model, manifest
