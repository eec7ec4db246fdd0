"""A site's training set for one run: every record, or (an incremental run) its new records plus a replay buffer.

A site that gains records between runs need not train its earlier ones again: a run whose federated stage says
``records = "new"`` trains each site on the records it has not trained on in any earlier run, plus its **replay
buffer**: the earlier records its teacher finds hard, whose predictive entropy at temperature 1 is at least
``replay_min_entropy`` of its maximum, log(classes). Those are the records near the teacher's decision boundary,
whose soft targets carry the most of what distillation transfers; replaying them guards against forgetting. The
buffer never leaves the site.

Which records a site trained on is kept on the site only, in ``training_sets.json``, as keyed digests (HMAC with
the site's noise secret, so the file cannot be matched against a guessed record) of each record's inputs and label.
The set is chosen when the site first considers a run (its calibration is for that many records) and kept for the
run's later rounds and a resumed run.

Why this keeps the DP statement: whether a record joins the run's training set depends on that record alone (its
key, and the teacher's output on it; the teacher never saw private records, client/teacher.py) and never on the
other records. Two neighbouring datasets therefore give training sets that differ in at most that one record, and
DP-SGD, calibrated on the training set's size, protects each record as before. Records left out of a run are still
charged that run's spend in the site's lifetime account: the composition stays conservative.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.data import SplitData
from protocols.canonical import atomic_write_json
from protocols.curriculum import TRAINING_RECORDS
from protocols.errors import ConfigError, UpdateRejected

SCHEMA_VERSION = 1
TRAINING_SETS_FILE = "training_sets.json"


@dataclass(frozen=True)
class TrainingSet:
    """The indices into the site's training split that one run trains on, and how they were chosen."""

    indices: np.ndarray
    mode: str
    new: int
    replay: int

    def summary(self) -> dict[str, Any]:
        """What the site's own ledger records: counts, never the records."""
        return {"records": "all" if self.mode == "all" else "new", "training_records": int(len(self.indices)),
                "new_records": self.new, "replay_records": self.replay}


def record_keys(data: SplitData, secret: bytes) -> list[str]:
    """A keyed digest of each record's inputs and label, in order."""
    names = sorted(data.inputs)
    keys = []
    for i in range(len(data)):
        mac = hmac.new(secret, digestmod=hashlib.sha256)
        for name in names:
            row = np.ascontiguousarray(data.inputs[name][i])
            mac.update(name.encode() + str(row.dtype).encode() + str(row.shape).encode() + row.tobytes())
        mac.update(np.asarray(data.labels[i]).tobytes())
        keys.append(mac.hexdigest()[:32])
    return keys


def _load(state_dir: Path) -> dict[str, Any]:
    path = state_dir / TRAINING_SETS_FILE
    if not path.is_file():
        return {"schema_version": SCHEMA_VERSION, "runs": {}}
    raw = json.loads(path.read_text())
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
    return raw


def teacher_entropy(teacher_logits: np.ndarray) -> np.ndarray:
    """The teacher's predictive entropy on each record at temperature 1, as a share of its maximum."""
    z = teacher_logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=1) / np.log(teacher_logits.shape[1])


def training_set(state_dir: Path, site: str, run_id: str, records: str, replay_min_entropy: float | None,
                 train: SplitData, secret: bytes, trained_runs: set[str],
                 teacher_logits: Callable[[], np.ndarray]) -> TrainingSet:
    """This run's training set, chosen the first time the site considers the run and kept for its later rounds.

    A record counts as trained on when it was in the training set of a run in ``trained_runs`` (those in which
    the site spent on at least one round: a run it refused throughout trained nothing). ``teacher_logits`` gives the
    teacher's logits on every training record; it is called only when the replay buffer is chosen.
    """
    if records not in TRAINING_RECORDS:
        raise UpdateRejected(f"site {site}: the instruction asks for training records {records!r}; this site knows "
                             f"{', '.join(TRAINING_RECORDS)}. Coordinator and site run different fedistill versions?")
    store = _load(state_dir)
    keys = record_keys(train, secret)
    kept = store["runs"].get(run_id)
    if kept is not None:
        # A list, not a set: identical records (the same key) may each be in the split, and each was chosen.
        chosen = set(kept["keys"])
        indices = np.array([i for i, key in enumerate(keys) if key in chosen], dtype=np.int64)
        if len(indices) != len(kept["keys"]):
            raise UpdateRejected(f"site {site}: the training split holds {len(indices)} of the {len(kept['keys'])} "
                                 f"records it chose for run {run_id}; the data changed mid-run. Restore it, or start "
                                 "a new run.")
        return TrainingSet(indices, kept["mode"], kept["new"], kept["replay"])
    if records == "all":
        indices, new, replay = np.arange(len(keys), dtype=np.int64), len(keys), 0
    else:
        seen = {key for run_key, run in store["runs"].items() if run_key in trained_runs for key in run["keys"]}
        is_new = np.array([key not in seen for key in keys], dtype=bool)
        if not is_new.any():
            raise UpdateRejected(f"site {site}: no training record is new since its earlier runs, so it has nothing "
                                 f"to train on in incremental run {run_id} (nothing is spent).")
        chosen_mask = is_new.copy()
        if replay_min_entropy is not None and (~is_new).any():
            chosen_mask |= ~is_new & (teacher_entropy(teacher_logits()) >= replay_min_entropy)
        indices = np.flatnonzero(chosen_mask).astype(np.int64)
        new, replay = int(is_new.sum()), int(len(indices) - is_new.sum())
    store["runs"][run_id] = {"mode": records, "new": new, "replay": replay,
                             "keys": sorted(keys[i] for i in indices)}
    atomic_write_json(state_dir / TRAINING_SETS_FILE, store)
    return TrainingSet(indices, records, new, replay)
