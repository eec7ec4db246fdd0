"""The sites' evaluation of the global student on their own test splits: when it happens, what is asked, and what a
site's answer may hold. The same messages run in a simulation and in a deployment, so both report the same numbers.

After each round of the run's schedule (:func:`evaluation_rounds`) the coordinator sends every site an
:class:`EvaluationRequest` naming the round's student by digest. A site answers once per round with a
:class:`EvaluationRelease`: a histogram of its test records, never a record. For a binary task the histogram counts
the test records by true class and by the student's log-odds of class 1 in ``bins`` equal bins over
[-LOG_ODDS_RANGE, LOG_ODDS_RANGE], the tails in the end bins (equal bins of the probability would put every score of a
rare outcome, such as in-hospital death, into the first bin); the ROC-AUC, and the accuracy, macro-F1 and kappa at 0.5
(a bin edge), follow from it. Otherwise the histogram is the confusion matrix (true by predicted class).
In a person-level run each record weighs 1 / (its person's test records), so one person adds at most 1 to the
histogram, whatever their number of records: its L2 sensitivity is 1 in both units.

The site's policy decides how the histogram leaves: ``noised`` (the default: Gaussian noise of the policy's
multiplier on every cell, charged to the site's budget and planned into its calibration), ``clear`` (exact, an
unprotected quantity the report names), or ``none`` (nothing but the refusal to release).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols.accounting import TEST_METRICS_RELEASES as RELEASES
from protocols.config import StudentSpec
from protocols.errors import UpdateRejected

EVALUATION_KEY = "evaluate-test"
# Binary histograms bin the log-odds over [-6, 6]: probabilities from 0.0025 to 0.9975, 0.5 in the middle.
LOG_ODDS_RANGE = 6.0
# The coordinator's ledger event of one evaluation: every site's release, its metrics and the pooled metrics.
SITE_EVALUATION_EVENT = "site-evaluation"
# A site's own ledger event of each test evaluation it answered (client/evaluation.py).
TEST_EVALUATION_EVENT = "test-evaluation"


def evaluation_rounds(total_rounds: int, every: int) -> tuple[int, ...]:
    """The rounds after which the sites evaluate: every ``every``-th and the last (``every`` 0: the last only)."""
    rounds = {total_rounds} | ({r for r in range(1, total_rounds + 1) if r % every == 0} if every else set())
    return tuple(sorted(rounds))


def histogram_shape(classes: int, bins: int) -> tuple[int, int]:
    """[true class, probability bin] for a binary task; [true class, predicted class] otherwise."""
    return (2, bins) if classes == 2 else (classes, classes)


@dataclass(frozen=True)
class EvaluationRequest:
    """Score this student (by digest) on your test split, after ``round``."""

    run_id: str
    config_hash: str
    student: StudentSpec
    round: int
    student_digest: str
    classes: int
    bins: int
    nonce: str

    def to_config(self) -> dict[str, str]:
        return {EVALUATION_KEY: json.dumps({"run_id": self.run_id, "config_hash": self.config_hash,
                                            "student": self.student.to_dict(), "round": self.round,
                                            "student_digest": self.student_digest, "classes": self.classes,
                                            "bins": self.bins, "nonce": self.nonce}, sort_keys=True)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvaluationRequest:
        try:
            raw = json.loads(str(config[EVALUATION_KEY]))
            request = cls(run_id=str(raw["run_id"]), config_hash=str(raw["config_hash"]),
                          student=StudentSpec.from_dict(raw["student"]), round=int(raw["round"]),
                          student_digest=str(raw["student_digest"]), classes=int(raw["classes"]),
                          bins=int(raw["bins"]), nonce=str(raw["nonce"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UpdateRejected(f"evaluation request: malformed ({type(err).__name__}: {err}).") from None
        if not (2 <= request.classes <= 1000 and 2 <= request.bins <= 1000 and request.bins % 2 == 0):
            raise UpdateRejected(f"evaluation request: {request.classes} classes and {request.bins} bins; bins must be "
                                 "even (0.5 is a bin edge) and both in [2, 1000].")
        return request

    def binding(self) -> dict[str, str | int]:
        return {"run-id": self.run_id, "round": self.round, "nonce": self.nonce}


@dataclass(frozen=True)
class EvaluationRelease:
    """What a site's evaluation answer may hold: how it released, the histogram (absent for ``none``), its noise."""

    released: str
    histogram: np.ndarray | None = None
    noise_std: float = 0.0
    weighted_by: str = "record"

    def to_dict(self) -> dict[str, Any]:
        return {"released": self.released, "noise_std": self.noise_std, "weighted_by": self.weighted_by,
                "histogram": None if self.histogram is None else self.histogram.tolist()}

    @classmethod
    def from_dict(cls, raw: Any, request: EvaluationRequest) -> EvaluationRelease:
        """A site's answer, screened: anything else is rejected by name and the run goes on without it."""
        if not isinstance(raw, dict) or set(raw) != {"released", "noise_std", "weighted_by", "histogram"}:
            raise ValueError("the evaluation release holds something other than released, noise_std, weighted_by "
                             "and histogram")
        released, noise, weighted = raw["released"], raw["noise_std"], raw["weighted_by"]
        if released not in RELEASES or weighted not in ("person", "record"):
            raise ValueError(f"released {released!r} / weighted_by {weighted!r} is not a known kind")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise_std {noise!r} is not a non-negative number")
        if released == "none":
            if raw["histogram"] is not None:
                raise ValueError("a site that releases nothing sent a histogram")
            return cls("none", None, 0.0, weighted)
        if (released == "clear") != (noise == 0):
            raise ValueError(f"a {released} release with noise std {noise}")
        try:
            histogram = np.asarray(raw["histogram"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("the histogram is not an array of numbers") from None
        shape = histogram_shape(request.classes, request.bins)
        if histogram.shape != shape or not np.isfinite(histogram).all() or np.abs(histogram).max(initial=0) > 1e9:
            raise ValueError(f"the histogram is not a finite {shape[0]} x {shape[1]} array of counts")
        if released == "clear" and histogram.min(initial=0) < 0:
            raise ValueError("a clear histogram has negative counts")
        return cls(released, histogram, float(noise), weighted)


def metrics_of_histogram(histogram: np.ndarray) -> dict[str, float | None]:
    """ROC-AUC (binary: binned, a tie within a bin counting one half), accuracy, macro-F1 and Cohen's kappa from a
    (possibly noised) histogram; negative noised counts are read as 0 (post-processing). A metric whose denominator
    is empty is None."""
    counts = np.clip(np.asarray(histogram, dtype=np.float64), 0.0, None)
    rows, columns = counts.shape
    if rows == 2:
        # Binary: bins of the log-odds of class 1 (two bins: the confusion matrix itself); predicted positive from
        # the bin at log-odds 0 (probability 0.5) on.
        negatives, positives = counts
        below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
        pairs = positives.sum() * negatives.sum()
        auc = float((positives * (below + 0.5 * negatives)).sum() / pairs) if pairs > 0 else None
        half = columns // 2
        confusion = np.array([[negatives[:half].sum(), negatives[half:].sum()],
                              [positives[:half].sum(), positives[half:].sum()]])
    else:
        auc, confusion = None, counts
    total = confusion.sum()
    if total <= 0:
        return {"roc_auc": auc, "accuracy": None, "macro_f1": None, "kappa": None, "n": 0.0}
    diagonal = np.diag(confusion)
    accuracy = float(diagonal.sum() / total)
    actual, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    f1 = [2 * d / (a + p) for d, a, p in zip(diagonal, actual, predicted) if a + p > 0]
    chance = float((actual * predicted).sum() / total ** 2)
    kappa = (accuracy - chance) / (1 - chance) if chance < 1 else None
    return {"roc_auc": auc, "accuracy": accuracy, "macro_f1": float(np.mean(f1)) if f1 else None,
            "kappa": kappa, "n": float(total)}


# The spread the noise alone gives a metric: its known std re-drawn this many times on the released histogram.
NOISE_DRAWS = 200


def noise_interval(histogram: np.ndarray, noise_std: float, seed: int = 0) -> dict[str, list[float] | None]:
    """Each metric's 5th and 95th percentiles when noise of the release's own std is added again to the released
    histogram: post-processing of the release (no privacy cost), a reading of how much the noise moves each figure.
    Empty for an exact (clear) release."""
    if noise_std <= 0:
        return {}
    rng = np.random.default_rng(seed)
    draws = [metrics_of_histogram(histogram + rng.normal(0.0, noise_std, histogram.shape)) for _ in range(NOISE_DRAWS)]
    interval: dict[str, list[float] | None] = {}
    for metric in ("roc_auc", "accuracy", "macro_f1", "kappa"):
        values = [d[metric] for d in draws if d[metric] is not None]
        interval[metric] = ([float(np.percentile(values, 5)), float(np.percentile(values, 95))]
                            if len(values) >= NOISE_DRAWS // 2 else None)
    return interval


def pooled_metrics(releases: Sequence[EvaluationRelease]) -> dict[str, Any]:
    """The metrics of the sum of every released histogram: the pooled test splits' figures (noise included), with
    the spread the noise gives them (:func:`noise_interval`)."""
    kept = [r.histogram for r in releases if r.histogram is not None]
    if not kept:
        return {"sites": 0}
    total = np.sum(kept, axis=0)
    noise = math.sqrt(sum(r.noise_std ** 2 for r in releases if r.histogram is not None))
    return {"sites": len(kept), "noise_std_per_cell": noise, **metrics_of_histogram(total),
            "noise_interval_90": noise_interval(total, noise)}
