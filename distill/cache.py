"""The teacher-logit cache: a site runs its teacher once over its training records and reuses the logits.

From the second round on, training costs zero teacher forward passes. The cache is keyed by the
teacher's digest and the data's digest, so a new teacher or new data recomputes it, and it lives in the
site's state directory (deployment runs every round in a fresh process).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distill.data import SplitData
from distill.models import Teacher
from distill.token_kd import TopKTargets
from protocols.errors import DataError
from protocols.canonical import atomic_write_bytes, atomic_write_json, sha256_hex

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CachedTeacherOutputs:
    logits: np.ndarray
    hidden: np.ndarray | None


class TeacherLogitCache:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.arrays_path = self.directory / "teacher_cache.npz"
        self.meta_path = self.directory / "teacher_cache.json"

    def metadata(self) -> dict:
        if not self.meta_path.is_file():
            return {"schema_version": SCHEMA_VERSION, "teacher_forward_passes": 0}
        return json.loads(self.meta_path.read_text())

    @property
    def teacher_forward_passes(self) -> int:
        """How many times the teacher has been run over the site's data, over the cache's whole life."""
        return int(self.metadata().get("teacher_forward_passes", 0))

    def outputs(self, data: SplitData, teacher_digest: str, load_teacher: Callable[[], Teacher]) -> CachedTeacherOutputs:
        """The teacher's outputs on ``data``; the teacher is loaded and run only when the cache misses."""
        meta = self.metadata()
        data_digest = data.digest()
        if (meta.get("teacher_digest") == teacher_digest and meta.get("data_digest") == data_digest
                and self.arrays_path.is_file()):
            with np.load(self.arrays_path) as archive:
                return CachedTeacherOutputs(archive["logits"], archive["hidden"] if "hidden" in archive else None)
        teacher = load_teacher()
        logits = np.asarray(teacher.logits(data.inputs), dtype=np.float32)
        hidden = teacher.hidden(data.inputs)
        buffer = io.BytesIO()
        np.savez(buffer, logits=logits, **({"hidden": hidden} if hidden is not None else {}))
        atomic_write_bytes(self.arrays_path, buffer.getvalue())
        atomic_write_json(self.meta_path, {
            "schema_version": SCHEMA_VERSION,
            "teacher_kind": teacher.kind,
            "teacher_digest": teacher_digest,
            "data_digest": data_digest,
            "records": len(data),
            "teacher_forward_passes": int(meta.get("teacher_forward_passes", 0)) + 1,
            "computed_at": datetime.now(timezone.utc).isoformat(),
        })
        return CachedTeacherOutputs(logits, hidden)


@dataclass(frozen=True)
class CachedTopK:
    targets: TopKTargets
    # What the site records in its ledger: set only when this call computed the cache (the teacher ran).
    computed: dict | None


class TopKTargetCache:
    """A causal-LM teacher's top-k targets on a site's training texts (distill.token_kd), computed once.

    Keyed by the teacher's digest, the data's digest, k and the temperature grid: any change recomputes it.
    The arrays stay in the site's state directory; only their digest and size go into the site's ledger.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.arrays_path = self.directory / "teacher_topk.npz"
        self.meta_path = self.directory / "teacher_topk.json"

    def metadata(self) -> dict:
        if not self.meta_path.is_file():
            return {"schema_version": SCHEMA_VERSION, "teacher_forward_passes": 0}
        return json.loads(self.meta_path.read_text())

    def targets(self, data: SplitData, teacher_digest: str, k: int, temperatures: tuple[float, ...],
                compute: Callable[[], TopKTargets], hidden_layers: tuple[int, ...] = ()) -> CachedTopK:
        key = {"teacher_digest": teacher_digest, "data_digest": data.digest(), "k": k,
               "temperatures": [float(t) for t in temperatures], "hidden_layers": list(hidden_layers)}
        arrays, record = _verified_archive(self.arrays_path, self.meta_path, key, lambda: compute().to_arrays())
        targets = TopKTargets.from_arrays(arrays)
        if record is not None:
            record = {**record, "sequences": targets.sequences, "positions": int(len(targets.token_ids))}
            _write_meta(self.meta_path, record, "teacher_forward_passes")
        return CachedTopK(targets, record)


def _verified_archive(arrays_path: Path, meta_path: Path, key: dict,
                      compute: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict | None]:
    """The arrays cached at ``arrays_path`` when ``meta_path`` names the same ``key`` and their SHA-256 matches;
    otherwise ``compute()``'s, written atomically, with the record a site puts in its ledger (the key, bytes, SHA-256;
    the caller adds its counts and writes the metadata with :func:`_write_meta`)."""
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if all(meta.get(name) == value for name, value in key.items()) and arrays_path.is_file():
        payload = arrays_path.read_bytes()
        if sha256_hex(payload) == meta.get("sha256"):
            with np.load(io.BytesIO(payload)) as archive:
                return dict(archive), None
    arrays = compute()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    atomic_write_bytes(arrays_path, payload)
    return arrays, {**key, "bytes": len(payload), "sha256": sha256_hex(payload)}


def _write_meta(meta_path: Path, record: dict, counter: str) -> None:
    """The cache's metadata after a computation: the record, and ``counter``, how many times the teacher has run for
    this cache over its whole life, one more than the metadata it replaces says."""
    previous = json.loads(meta_path.read_text()).get(counter, 0) if meta_path.is_file() else 0
    atomic_write_json(meta_path, {"schema_version": SCHEMA_VERSION, **record, counter: int(previous) + 1,
                                  "computed_at": datetime.now(timezone.utc).isoformat()})


@dataclass(frozen=True)
class CachedContinuations:
    data: SplitData  # the training split, each document followed by its teacher continuation
    # What the site records in its ledger: set only when this call computed the continuations (the teacher ran).
    computed: dict | None


class ContinuationCache:
    """A causal-LM teacher's continuations of a site's training documents (sequence-level KD), generated once.

    Keyed by the teacher's digest, the documents' digest and the number of new tokens. The sequences stay in the
    site's state directory, like the top-k cache; only their digest and size go into the site's ledger.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.arrays_path = self.directory / "teacher_continuations.npz"
        self.meta_path = self.directory / "teacher_continuations.json"

    def metadata(self) -> dict:
        if not self.meta_path.is_file():
            return {"schema_version": SCHEMA_VERSION, "teacher_generations": 0}
        return json.loads(self.meta_path.read_text())

    def continued(self, data: SplitData, teacher_digest: str, new_tokens: int,
                  generate: Callable[[], dict[str, np.ndarray]]) -> CachedContinuations:
        key = {"teacher_digest": teacher_digest, "data_digest": data.digest(), "new_tokens": int(new_tokens)}
        arrays, record = _verified_archive(self.arrays_path, self.meta_path, key, generate)
        if record is not None:
            record = {**record, "sequences": len(arrays["input_ids"]), "new_tokens_total": int(new_tokens) * len(data)}
            _write_meta(self.meta_path, record, "teacher_generations")
        if len(arrays["input_ids"]) != len(data):
            raise DataError(f"{self.arrays_path}: {len(arrays['input_ids'])} continued sequences for {len(data)} "
                             "documents; delete the file to have it generated again.")
        continued = {name: arrays[name] for name in ("input_ids", "attention_mask")}
        return CachedContinuations(SplitData({**data.inputs, **continued}, data.labels, data.groups), record)
