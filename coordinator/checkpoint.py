"""Atomic checkpoints of the global student: written into a temporary folder, then renamed into place.

A crash mid-write leaves the previous checkpoint intact. Each checkpoint carries the resolved run
configuration and its hash; transformers students are written with ``save_pretrained``, others as
safetensors with the student spec beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from distill.models import build_student
from protocols.canonical import atomic_directory, atomic_write_json
from protocols.config import FederationConfig, StudentSpec
from protocols.errors import ConfigError

SCHEMA_VERSION = 1
MANIFEST = "checkpoint.json"


def save_student(model: nn.Module, spec: StudentSpec, directory: Path, config: FederationConfig,
                 extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        if hasattr(model, "save_pretrained"):
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
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model, manifest
