"""Message layouts between coordinator and sites, and their validation.

Flower records are built in the thin apps; here the content is plain Python and numpy, so both sides
validate the same way without importing Flower. A message with an unknown fragment, a missing or extra
tensor, or a wrong shape is refused with an error that names it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols.config import PRIVACY_UNITS, StudentSpec
from protocols.curriculum import Stage
from protocols.errors import UpdateRejected
from protocols.fragments import FragmentSpec
from protocols.knowledge import KnowledgeSettings

SCHEMA_VERSION = 1
MAX_EXAMPLES = 10**9
ACCOUNTANT_NAMES = ("prv", "rdp")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# What a site reports in the clear under SecAgg+: its own epsilon, never its sampling rate, noise multiplier or
# delta, from which its record count could be read (its own state keeps them all); and the head of its ledger.
PUBLIC_PRIVACY_FIELDS = ("epsilon-run", "epsilon-lifetime", "accountant", "steps", "ledger-seq", "ledger-hash")
# A plain reply's privacy report: the DP parameters of its round too.
PLAIN_PRIVACY_FIELDS = ("delta", "noise-multiplier", "sample-rate", "steps", "empty-batches", "accountant",
                        "max-grad-norm", "epsilon-run", "epsilon-lifetime", "ledger-seq", "ledger-hash")


@dataclass(frozen=True)
class CoordinatorAnchor:
    """The coordinator's latest signed ledger checkpoint, sent with every instruction so that sites record it.

    ``seq`` and ``hash`` are the head the checkpoint signs; ``signature`` is the checkpoint's Ed25519 signature of
    ``hash``; ``public_key`` is the coordinator's ledger key (PEM), which a site pins when it accepts the run.
    """

    seq: int
    hash: str
    signature: str
    public_key: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "signature": self.signature, "public_key": self.public_key}

    @classmethod
    def from_dict(cls, raw: Any) -> CoordinatorAnchor:
        if not isinstance(raw, Mapping) or set(raw) != {"seq", "hash", "signature", "public_key"}:
            raise UpdateRejected("train instruction: 'coordinator-anchor' must hold exactly seq, hash, signature and "
                                 "public_key.")
        seq, head = raw["seq"], raw["hash"]
        if type(seq) is not int or seq < 0 or not isinstance(head, str) or not _HEX_DIGEST.fullmatch(head) \
                or not isinstance(raw["signature"], str) or not isinstance(raw["public_key"], str):
            raise UpdateRejected("train instruction: 'coordinator-anchor' has a malformed seq, hash, signature or key.")
        return cls(seq, head, raw["signature"], raw["public_key"])


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
    privacy_unit: str = "person"
    # After which rounds the coordinator will ask for the sites' test evaluation (a noised one is planned into the
    # site's calibration, so the schedule is fixed with the run).
    evaluation_rounds: tuple[int, ...] = ()
    secure_aggregation: bool = False
    clipping_range: float = 4.0
    weight_scale: int = 10_000
    max_update_norm: float = math.inf
    # Binds every reply to this run and round: a reply must echo the nonce (see check_binding).
    nonce: str = ""
    anchor: CoordinatorAnchor | None = None
    # The federated stage's training records ("all", or "new" for an incremental run) and replay threshold.
    training_records: str = "all"
    replay_min_entropy: float | None = None
    # The run's knowledge channel (protocols/knowledge.py); None: the site sends its fragment update only.
    knowledge: KnowledgeSettings | None = None
    # The SHA-256 of the run's preprocessor file (FederationConfig.preprocessing_digest): a site whose own copy is
    # another file, or that has one when the run pins none (or the reverse), refuses the run. None: none pinned.
    preprocessing_digest: str | None = None

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None

    def to_config(self) -> dict[str, Any]:
        """Flat scalars and lists, the shape of a Flower ConfigRecord."""
        optional = {key: value for key, value in (("target-epsilon", self.target_epsilon),
                                                  ("target-delta", self.target_delta),
                                                  ("replay-min-entropy", self.replay_min_entropy),
                                                  ("preprocessing-digest", self.preprocessing_digest),
                                                  ("knowledge", None if self.knowledge is None else json.dumps(
                                                      self.knowledge.to_dict(), sort_keys=True)))
                    if value is not None}
        return optional | {
            "training-records": self.training_records,
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
            "privacy-unit": self.privacy_unit,
            "evaluation-rounds": list(self.evaluation_rounds),
            "secure-aggregation": self.secure_aggregation,
            "clipping-range": self.clipping_range,
            "weight-scale": self.weight_scale,
            "max-update-norm": self.max_update_norm,
            "nonce": self.nonce,
            "coordinator-anchor": json.dumps(self.anchor.to_dict() if self.anchor else None, sort_keys=True),
        }

    def binding(self) -> dict[str, str | int]:
        """What every reply to this instruction echoes (in the clear metadata under SecAgg+)."""
        return {"run-id": self.run_id, "round": self.server_round, "nonce": self.nonce}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstruction:
        required = ("server-round", "total-rounds", "fragments", "temperature", "alpha", "local-steps", "batch-size",
                    "optimizer", "learning-rate", "hidden-alignment-weight", "seed", "run-id", "config-hash", "student", "max-grad-norm", "grad-sample-mode", "privacy-unit", "evaluation-rounds", "secure-aggregation", "clipping-range",
                    "weight-scale", "max-update-norm", "nonce", "coordinator-anchor")
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
            privacy_unit=_privacy_unit(config["privacy-unit"]),
            evaluation_rounds=_rounds(config["evaluation-rounds"], int(config["total-rounds"])),
            secure_aggregation=bool(config["secure-aggregation"]),
            clipping_range=float(config["clipping-range"]),
            weight_scale=int(config["weight-scale"]),
            max_update_norm=float(config["max-update-norm"]),
            nonce=str(config["nonce"]),
            anchor=_anchor_from(config["coordinator-anchor"]),
            training_records=str(config.get("training-records", "all")),
            replay_min_entropy=float(config["replay-min-entropy"]) if "replay-min-entropy" in config else None,
            knowledge=(KnowledgeSettings.from_dict(json.loads(str(config["knowledge"])), "train instruction 'knowledge'")
                       if "knowledge" in config else None),
            preprocessing_digest=_preprocessing_digest(config.get("preprocessing-digest")),
        )


def _preprocessing_digest(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value):
        raise UpdateRejected("train instruction: 'preprocessing-digest' must be a hex SHA-256 (64 characters).")
    return value


def _rounds(value: Any, total: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= total for r in value):
        raise UpdateRejected(f"train instruction: 'evaluation-rounds' must be a list of rounds in [1, {total}].")
    return tuple(sorted(set(value)))


def _privacy_unit(value: Any) -> str:
    if value not in PRIVACY_UNITS:
        raise UpdateRejected(f"train instruction: 'privacy-unit' is {value!r}, not one of {', '.join(PRIVACY_UNITS)}.")
    return str(value)


def _anchor_from(text: Any) -> CoordinatorAnchor | None:
    try:
        raw = json.loads(str(text))
    except ValueError:
        raise UpdateRejected("train instruction: 'coordinator-anchor' is not JSON.") from None
    return None if raw is None else CoordinatorAnchor.from_dict(raw)


def check_binding(echo: Mapping[str, Any], instruction: TrainInstruction, what: str) -> None:
    """A reply belongs to this run and round only if it echoes exactly their binding (run id, round, nonce)."""
    expected = instruction.binding()
    for key, value in expected.items():
        if key not in echo:
            raise UpdateRejected(f"{what}: the reply does not echo '{key}'; it is not bound to round "
                                 f"{instruction.server_round} of run {instruction.run_id}.")
        if echo[key] != value or type(echo[key]) is not type(value):
            kind = "cross-run" if key == "run-id" else "replayed or stale"
            raise UpdateRejected(f"{what}: {kind} reply: it echoes {key}={echo[key]!r}, this round's is {value!r}.")


def check_site_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise UpdateRejected(f"{what}: the site name must be a printable string of 1-200 characters, got "
                             f"{str(name)[:40]!r}.")
    return name


def _number(value: Any, name: str, what: str, low: float, high: float, integer: bool = False) -> float | int:
    numeric = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not numeric or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a finite number"
        raise UpdateRejected(f"{what}: '{name}' must be {kind} in [{low:g}, {high:g}], got {str(value)[:40]!r}.")
    return value


def check_train_metrics(num_examples: Any, train_loss: Any, what: str) -> tuple[int, float]:
    """A plain reply's example count and mean loss: what the weighted average and the record rest on."""
    return (int(_number(num_examples, "num-examples", what, 1, MAX_EXAMPLES, integer=True)),
            float(_number(train_loss, "train-loss", what, 0.0, 1e9)))


def _epsilon(value: Any, name: str, what: str) -> float | str:
    return "inf" if value == "inf" else _number(value, name, what, 0.0, math.inf)


# What each field of a site's privacy report may hold; every report the coordinator records is checked first,
# so that the ledger (canonical JSON, no NaN) and the report only ever see well-formed values.
_PRIVACY_FIELDS: dict[str, Any] = {
    "delta": lambda v, n, w: _number(v, n, w, 0.0, 1.0),
    "noise-multiplier": lambda v, n, w: _number(v, n, w, 0.0, 1e6),
    "sample-rate": lambda v, n, w: _number(v, n, w, 0.0, 1.0),
    "steps": lambda v, n, w: _number(v, n, w, 0, 10**9, integer=True),
    "empty-batches": lambda v, n, w: _number(v, n, w, 0, 10**9, integer=True),
    "max-grad-norm": lambda v, n, w: _number(v, n, w, 0.0, 1e6),
    "epsilon-run": _epsilon,
    "epsilon-lifetime": _epsilon,
    "ledger-seq": lambda v, n, w: _number(v, n, w, 0, 2**62, integer=True),
}


def check_privacy_report(report: Mapping[str, Any], required: Iterable[str], what: str) -> dict[str, Any]:
    """Exactly the ``required`` fields, each well-formed; returns them as a plain dict."""
    required = tuple(required)
    missing = [key for key in required if key not in report]
    extra = [str(key) for key in report if key not in required]
    if missing or extra:
        raise UpdateRejected(f"{what}: the privacy report must hold exactly {', '.join(required)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unexpected {', '.join(extra)}" if extra else "") + ".")
    clean: dict[str, Any] = {}
    for key in required:
        value = report[key]
        if key == "accountant":
            if value not in ACCOUNTANT_NAMES:
                raise UpdateRejected(f"{what}: 'accountant' must be one of {', '.join(ACCOUNTANT_NAMES)}.")
        elif key == "ledger-hash":
            if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value):
                raise UpdateRejected(f"{what}: 'ledger-hash' must be a SHA-256 hex digest.")
        else:
            value = _PRIVACY_FIELDS[key](value, key, what)
        clean[key] = value
    return clean


def check_tensors(arrays: Mapping[str, Any], reference: Mapping[str, np.ndarray], what: str) -> None:
    """The arrays must be exactly the reference's tensors: same names, shapes and dtypes (never cast), finite values."""
    missing = [name for name in reference if name not in arrays]
    extra = [str(name) for name in arrays if name not in reference]
    if missing:
        raise UpdateRejected(f"{what}: tensor(s) missing: {', '.join(missing)}.")
    if extra:
        raise UpdateRejected(f"{what}: unexpected tensor(s): {', '.join(extra)}; they belong to no planned fragment.")
    for name, expected in reference.items():
        value = arrays[name]
        if not isinstance(value, np.ndarray):
            raise UpdateRejected(f"{what}: tensor '{name}' is a {type(value).__name__}, not an array.")
        if value.shape != expected.shape:
            raise UpdateRejected(f"{what}: tensor '{name}' has shape {value.shape}, expected {expected.shape}.")
        if value.dtype != expected.dtype:
            raise UpdateRejected(f"{what}: tensor '{name}' has dtype {value.dtype}, expected exactly {expected.dtype} "
                                 "(nothing is cast).")
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"{what}: tensor '{name}' contains non-finite values.")


def check_fragment_update(arrays: Mapping[str, Any], spec: FragmentSpec, fragments: tuple[str, ...],
                          global_state: Mapping[str, np.ndarray], what: str) -> None:
    """A site's reply must carry exactly the tensors of the planned fragments (unknown fragments refused)."""
    check_tensors(arrays, {name: global_state[name] for name in spec.parameters_of_all(fragments)}, what)


def fragment_change_norms(arrays: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray],
                          spec: FragmentSpec, fragments: tuple[str, ...]) -> dict[str, float]:
    """The L2 norm of each fragment's change from the global student (float64, whatever the tensors' dtype)."""
    norms = {}
    for fragment in fragments:
        squared = sum(float(np.sum((np.asarray(arrays[name], dtype=np.float64)
                                    - global_state[name].astype(np.float64)) ** 2))
                      for name in spec.parameters_of(fragment))
        norms[fragment] = math.sqrt(squared)
    return norms


def clip_fragment_changes(arrays: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray],
                          spec: FragmentSpec, fragments: tuple[str, ...],
                          bound: float) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Scale each fragment's change down to L2 norm ``bound`` (a site's own update, before it leaves).

    Returns the clipped arrays (in their own dtype) and the fragments that were scaled. The scale leaves a margin
    below the bound so that rounding back to float32 cannot push the norm over it.
    """
    clipped_arrays, clipped = dict(arrays), []
    for fragment, norm in fragment_change_norms(arrays, global_state, spec, fragments).items():
        if norm <= bound:
            continue
        scale = bound / norm * (1.0 - 1e-6)
        for name in spec.parameters_of(fragment):
            current = global_state[name].astype(np.float64)
            change = np.asarray(arrays[name], dtype=np.float64) - current
            clipped_arrays[name] = (current + scale * change).astype(global_state[name].dtype)
        clipped.append(fragment)
    return clipped_arrays, tuple(clipped)


@dataclass(frozen=True)
class LocalStageRequest:
    """What the coordinator asks once the federated rounds are over: fine-tune this student (by digest) locally."""

    run_id: str
    config_hash: str
    student: StudentSpec
    stage: Stage
    student_digest: str
    final_round: int
    seed: int
    nonce: str

    def to_config(self) -> dict[str, str]:
        return {"site-local": json.dumps({"run_id": self.run_id, "config_hash": self.config_hash,
                                          "student": self.student.to_dict(), "stage": self.stage.to_dict(),
                                          "student_digest": self.student_digest, "final_round": self.final_round,
                                          "seed": self.seed, "nonce": self.nonce}, sort_keys=True)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalStageRequest:
        raw = json.loads(str(config["site-local"]))
        stage = Stage.from_dict(raw["stage"], "site-local request stage")
        if stage.where != "site-local":
            raise UpdateRejected(f"the site-local request carries a {stage.where} stage.")
        return cls(run_id=str(raw["run_id"]), config_hash=str(raw["config_hash"]),
                   student=StudentSpec.from_dict(raw["student"]), stage=stage,
                   student_digest=str(raw["student_digest"]), final_round=int(raw["final_round"]),
                   seed=int(raw["seed"]), nonce=str(raw["nonce"]))

    def binding(self) -> dict[str, str]:
        return {"run-id": self.run_id, "nonce": self.nonce}


@dataclass(frozen=True)
class ValidationRequest:
    """What a run that keeps its best round asks after a round: score this student (by digest) on your validation
    split. ``round`` 0 is the student the rounds started from."""

    run_id: str
    config_hash: str
    student: StudentSpec
    round: int
    student_digest: str
    nonce: str

    def to_config(self) -> dict[str, str]:
        return {"validate": json.dumps({"run_id": self.run_id, "config_hash": self.config_hash,
                                        "student": self.student.to_dict(), "round": self.round,
                                        "student_digest": self.student_digest, "nonce": self.nonce}, sort_keys=True)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ValidationRequest:
        raw = json.loads(str(config["validate"]))
        return cls(run_id=str(raw["run_id"]), config_hash=str(raw["config_hash"]),
                   student=StudentSpec.from_dict(raw["student"]), round=int(raw["round"]),
                   student_digest=str(raw["student_digest"]), nonce=str(raw["nonce"]))

    def binding(self) -> dict[str, str | int]:
        return {"run-id": self.run_id, "round": self.round, "nonce": self.nonce}
