"""A site's PATE release (Papernot et al., ICLR 2018): the knowledge of teachers trained on its private records.

The one way a teacher that saw the site's records may speak (protocols/knowledge.py). The site splits its training
records **by person** into ``pate_teachers`` disjoint partitions: a person's teacher is a hash of the run id and
the person's key alone (:func:`teacher_of_person`), so adding or removing one person changes one partition and no
other. Each partition trains a clone of the site's own scikit-learn teacher (same estimator, same
hyperparameters). The release is, on the run's proxy inputs, the mean of the teachers' temperature-scaled
probability vectors plus Gaussian noise, projected back onto the probability simplex (post-processing).

Why it is private: one person changes one teacher, so the summed probability vectors move by at most
``sqrt(2)`` per proxy record in L2, ``sqrt(2 * proxy_records)`` in all; Gaussian noise of ``pate_noise_multiplier``
times that on every entry makes the release a Gaussian mechanism with that noise multiplier. Its guarantee is
per person, so also per record, the unit the site's DP-SGD accounts in: the site's accountant composes it with
the DP-SGD steps, as one more event (``Spend(mechanism="pate", sample_rate=1, steps=1)``).

The release is made once per run, when the site first trains for it, after its budget accepted the round with the
release included; it is charged before it is computed, and kept in the state directory. Later rounds re-send the
same noisy release, which is post-processing and costs nothing. The noise is drawn from the site's secret.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from client.budget import record_spend
from client.site import Site
from distill.data import SplitData
from distill.evaluate import softmax
from distill.models import SklearnTeacher, load_teacher
from protocols.accounting import PrivacyState, Spend
from protocols.canonical import atomic_write_bytes, digest_arrays, sha256_hex
from protocols.errors import UpdateRejected
from protocols.knowledge import PROXY_FILE, KnowledgeSettings, load_proxy
from protocols.ledger import ledger_in
from protocols.messages import TrainInstruction

log = logging.getLogger("fedistill.site.pate")

PARTITION_RULE = "by person: teacher = SHA-256(run id, person key) mod pate_teachers"


def teacher_of_person(person_keys: np.ndarray, teachers: int, run_id: str) -> np.ndarray:
    """Each record's teacher, a function of the run id and the record's person key only."""
    return np.array([int(sha256_hex(f"{run_id}:{key}")[:15], 16) % teachers for key in person_keys], dtype=np.int64)


def person_keys(train: SplitData) -> np.ndarray:
    """The person of every training record; without person ids each record is its own person, keyed by its
    content (a function of the record alone, so one record's presence moves no other)."""
    if len(train.groups):
        return np.asarray([str(group) for group in train.groups])
    rows = [b"".join(np.ascontiguousarray(train.inputs[name][index]).tobytes() for name in sorted(train.inputs))
            + np.int64(train.labels[index]).tobytes() for index in range(len(train))]
    return np.asarray([sha256_hex(row) for row in rows])


def ensemble_probability_sum(estimator: Any, train: SplitData, assignment: np.ndarray, settings: KnowledgeSettings,
                             proxy: dict[str, np.ndarray]) -> np.ndarray:
    """The sum over teachers of their temperature-scaled class probabilities on the proxy inputs. A partition without records says the uniform distribution; one with a single class says that
    class: each teacher's output depends on its own partition only."""
    from sklearn.base import clone

    classes = settings.classes
    total = np.zeros(settings.soft_label_shape, dtype=np.float64)
    for teacher in range(settings.pate_teachers):
        index = np.flatnonzero(assignment == teacher)
        labels = train.labels[index]
        present = np.unique(labels)
        if len(index) == 0:
            total += 1.0 / classes
        elif len(present) == 1:
            total[:, int(present[0])] += 1.0
        else:
            model = clone(estimator).fit(train.inputs["x"][index], labels)
            logits = np.full(settings.soft_label_shape, -np.inf)
            logits[:, np.asarray(model.classes_, dtype=np.int64)] = SklearnTeacher(model).logits(proxy)
            total += softmax(logits / settings.temperature)
    return total


def project_to_simplex(rows: np.ndarray) -> np.ndarray:
    """Each row's Euclidean projection onto the probability simplex (Duchi et al., 2008): post-processing."""
    ordered = -np.sort(-rows, axis=1)
    cumulative = np.cumsum(ordered, axis=1) - 1.0
    ranks = np.arange(1, rows.shape[1] + 1)
    support = np.sum(ordered - cumulative / ranks > 0, axis=1)
    shift = cumulative[np.arange(len(rows)), support - 1] / support
    return np.maximum(rows - shift[:, None], 0.0)


def pate_noise(settings: KnowledgeSettings, seed: int) -> np.ndarray:
    """The Gaussian mechanism's noise on the summed probabilities: std ``pate_noise_std`` on every entry."""
    return np.random.default_rng(seed).normal(0.0, settings.pate_noise_std, size=settings.soft_label_shape)


def pate_noised_mean(probability_sum: np.ndarray, settings: KnowledgeSettings, seed: int) -> np.ndarray:
    """The noised sum as a mean over the teachers, projected onto the simplex (post-processing)."""
    return project_to_simplex((probability_sum + pate_noise(settings, seed)) / settings.pate_teachers)


def _cache_path(site: Site, run_id: str):
    return site.state_dir / f"pate-release-{sha256_hex(run_id)[:16]}.npz"


def pate_spend(instruction: TrainInstruction) -> Spend:
    knowledge = instruction.knowledge
    assert knowledge is not None
    return Spend(instruction.run_id, instruction.server_round, knowledge.pate_noise_multiplier, 1.0, 1,
                 mechanism="pate")


def pending_pate_spend(site: Site, instruction: TrainInstruction) -> Spend | None:
    """The PATE release this round would make and charge: the run's first, when no release of it is kept here."""
    knowledge = instruction.knowledge
    if knowledge is None or knowledge.source != "pate" or _cache_path(site, instruction.run_id).is_file():
        return None
    return pate_spend(instruction)


def check_pate_teacher(site: Site, who: str) -> SklearnTeacher:
    teacher = load_teacher(site.teacher_path)
    if not isinstance(teacher, SklearnTeacher):
        raise UpdateRejected(f"{who}: a PATE release trains an ensemble of clones of the site's teacher, which is "
                             f"built for scikit-learn teachers only; this site's teacher is a {teacher.kind}. Use "
                             "source local-student. Nothing is trained or spent.")
    return teacher


def make_pate_release(site: Site, instruction: TrainInstruction, state: PrivacyState, spend: Spend,
                      seed: int) -> None:
    """Charge the release (before it exists), compute it and keep it; the site's ledger records what it was."""
    knowledge = instruction.knowledge
    assert knowledge is not None
    who = f"site {site.name}, round {instruction.server_round}"
    estimator = check_pate_teacher(site, who).estimator
    proxy = load_proxy(site.state_dir / PROXY_FILE, knowledge, who)
    train = site.splits()["train"]
    record_spend(site.state_dir, state, spend)
    assignment = teacher_of_person(person_keys(train), knowledge.pate_teachers, instruction.run_id)
    total = ensemble_probability_sum(estimator, train, assignment, knowledge, proxy)
    release = pate_noised_mean(total, knowledge, seed)
    buffer = io.BytesIO()
    np.savez(buffer, soft_labels=release, round=np.int64(instruction.server_round))
    atomic_write_bytes(_cache_path(site, instruction.run_id), buffer.getvalue())
    log.info("site %s: PATE release of run %s made in round %d (%d teachers, noise std %.4g on the sum)", site.name,
             instruction.run_id, instruction.server_round, knowledge.pate_teachers, knowledge.pate_noise_std)
    ledger_in(site.state_dir, site.name).append("pate-release", {
        "run_id": instruction.run_id, "round": instruction.server_round, "config_hash": instruction.config_hash,
        "mechanism": "Gaussian noise on the sum of the teachers' probability vectors (PATE)",
        "dp": {"noise-multiplier": spend.noise_multiplier, "sample-rate": spend.sample_rate, "steps": spend.steps},
        "teachers": knowledge.pate_teachers, "partition": PARTITION_RULE,
        "sensitivity_l2": knowledge.pate_sensitivity,
        "noise_std": knowledge.pate_noise_std, "temperature": knowledge.temperature,
        "proxy_digest": knowledge.proxy_digest, "shape": list(release.shape),
        "digest": digest_arrays({"soft_labels": release})})


def kept_pate_release(site: Site, instruction: TrainInstruction) -> tuple[np.ndarray, dict[str, Any]]:
    """The run's release as this site made it, and what the round's ledger entry says of it."""
    path = _cache_path(site, instruction.run_id)
    if not path.is_file():
        raise UpdateRejected(f"site {site.name}, round {instruction.server_round}: the run's PATE release is not in "
                             f"{path}; nothing is sent.")
    with np.load(path) as kept:
        release, made_in = np.asarray(kept["soft_labels"], dtype=np.float64), int(kept["round"])
    knowledge = instruction.knowledge
    assert knowledge is not None
    return release, {"teachers": knowledge.pate_teachers, "noise_multiplier": knowledge.pate_noise_multiplier,
                     "released_in_round": made_in, "charged_this_round": made_in == instruction.server_round}
