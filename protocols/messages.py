"""Message layouts between coordinator and sites, and their validation.

Flower records are built in the thin apps; here the content is plain Python and numpy, so both sides
validate the same way without importing Flower. A message with an unknown fragment, a missing or extra
tensor, or a wrong shape is refused with an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols.config import StudentSpec
from protocols.errors import UpdateRejected
from protocols.fragments import FragmentSpec

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TrainInstruction:
    """What the coordinator asks of a site in one round (the arrays travel beside it)."""

    server_round: int
    total_rounds: int
    fragments: tuple[str, ...]
    temperature: float
    alpha: float
    local_steps: int
    batch_size: int
    optimizer: str
    learning_rate: float
    hidden_alignment_weight: float
    seed: int
    run_id: str
    config_hash: str
    student: StudentSpec
    target_epsilon: float | None = None
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "ghost"
    secure_aggregation: bool = False
    clipping_range: float = 4.0
    weight_scale: int = 10_000

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None

    def to_config(self) -> dict[str, Any]:
        """Flat scalars and lists, the shape of a Flower ConfigRecord."""
        optional = {key: value for key, value in (("target-epsilon", self.target_epsilon),
                                                  ("target-delta", self.target_delta)) if value is not None}
        return optional | {
            "schema-version": SCHEMA_VERSION,
            "server-round": self.server_round,
            "total-rounds": self.total_rounds,
            "fragments": list(self.fragments),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "optimizer": self.optimizer,
            "learning-rate": self.learning_rate,
            "hidden-alignment-weight": self.hidden_alignment_weight,
            "seed": self.seed,
            "run-id": self.run_id,
            "config-hash": self.config_hash,
            "student": json.dumps(self.student.to_dict(), sort_keys=True),
            "max-grad-norm": self.max_grad_norm,
            "grad-sample-mode": self.grad_sample_mode,
            "secure-aggregation": self.secure_aggregation,
            "clipping-range": self.clipping_range,
            "weight-scale": self.weight_scale,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstruction:
        required = ("server-round", "total-rounds", "fragments", "temperature", "alpha", "local-steps", "batch-size",
                    "optimizer", "learning-rate", "hidden-alignment-weight", "seed", "run-id", "config-hash", "student", "max-grad-norm", "grad-sample-mode", "secure-aggregation", "clipping-range",
                    "weight-scale")
        missing = [key for key in required if key not in config]
        if missing:
            raise UpdateRejected(f"train instruction is missing {', '.join(missing)}; coordinator and site run "
                                 "different fedistill versions?")
        if config.get("schema-version") != SCHEMA_VERSION:
            raise UpdateRejected(f"train instruction schema-version {config.get('schema-version')!r} is not "
                                 f"{SCHEMA_VERSION}; upgrade the older side.")
        return cls(
            server_round=int(config["server-round"]),
            total_rounds=int(config["total-rounds"]),
            fragments=tuple(str(f) for f in config["fragments"]),
            temperature=float(config["temperature"]),
            alpha=float(config["alpha"]),
            local_steps=int(config["local-steps"]),
            batch_size=int(config["batch-size"]),
            optimizer=str(config["optimizer"]),
            learning_rate=float(config["learning-rate"]),
            hidden_alignment_weight=float(config["hidden-alignment-weight"]),
            seed=int(config["seed"]),
            run_id=str(config["run-id"]),
            config_hash=str(config["config-hash"]),
            student=StudentSpec.from_dict(json.loads(str(config["student"]))),
            target_epsilon=float(config["target-epsilon"]) if "target-epsilon" in config else None,
            target_delta=float(config["target-delta"]) if "target-delta" in config else None,
            max_grad_norm=float(config["max-grad-norm"]),
            grad_sample_mode=str(config["grad-sample-mode"]),
            secure_aggregation=bool(config["secure-aggregation"]),
            clipping_range=float(config["clipping-range"]),
            weight_scale=int(config["weight-scale"]),
        )


def check_tensors(arrays: Mapping[str, np.ndarray], expected_shapes: Mapping[str, tuple[int, ...]],
                  what: str) -> None:
    """The arrays must be exactly the expected tensors, with the expected shapes and finite values."""
    missing = [name for name in expected_shapes if name not in arrays]
    extra = [name for name in arrays if name not in expected_shapes]
    if missing:
        raise UpdateRejected(f"{what}: tensor(s) missing: {', '.join(missing)}.")
    if extra:
        raise UpdateRejected(f"{what}: unexpected tensor(s): {', '.join(extra)}; they belong to no planned fragment.")
    for name, shape in expected_shapes.items():
        got = tuple(np.shape(arrays[name]))
        if got != tuple(shape):
            raise UpdateRejected(f"{what}: tensor '{name}' has shape {got}, expected {tuple(shape)}.")
        if np.issubdtype(np.asarray(arrays[name]).dtype, np.floating) and not np.all(np.isfinite(arrays[name])):
            raise UpdateRejected(f"{what}: tensor '{name}' contains non-finite values.")


def check_fragment_update(arrays: Mapping[str, np.ndarray], spec: FragmentSpec, fragments: tuple[str, ...],
                          parameter_shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """A site's reply must carry exactly the tensors of the planned fragments (unknown fragments refused)."""
    expected = {name: parameter_shapes[name] for name in spec.parameters_of_all(fragments)}
    check_tensors(arrays, expected, what)
