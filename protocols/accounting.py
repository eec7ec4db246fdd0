"""What a site and an auditor both read: the privacy files' formats and the accountant that replays them.

The unit of privacy is each run's calibration's ``unit``: one person (all of their records in the site's
training split) or one record. A site keeps every spend it made, as
``(noise_multiplier, sample_rate, steps)`` per round, and any epsilon it states is recomputed from that
history with an Opacus accountant (:func:`epsilon_of`); an auditor replays the same history with Google's
dp-accounting (:func:`pld_epsilon`). The site's live decisions (calibration, accept or refuse) are in
:mod:`client.budget`.

    <state-dir>/policy.json     the site's caps (per run, lifetime), delta and accountant (:class:`SitePolicy`)
    <state-dir>/privacy.json    calibrations per run, every spend, every refusal (:class:`PrivacyState`)

A site's evidence for an auditor (``fedistill site evidence``) is the files in :data:`EVIDENCE_FILES`.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.canonical import atomic_write_json
from protocols.errors import ConfigError
from protocols.fields import reject_unknown_fields

SCHEMA_VERSION = 1
POLICY_FILE = "policy.json"
PRIVACY_FILE = "privacy.json"
# What an auditor needs from a site to verify a run, and nothing more: no records, no teacher, no secrets.
EVIDENCE_FILES = ("ledger.jsonl", "ledger_key.pub.pem", PRIVACY_FILE, POLICY_FILE, "site.json")
ACCOUNTANTS = ("prv", "rdp")
DEFAULT_DELTA = 1e-5


def _cap(raw: Mapping[str, Any], name: str, where: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: field '{name}' must be a positive number (or null for no cap), got {value!r}.")
    return float(value)


TEST_METRICS_RELEASES = ("noised", "clear", "none")


@dataclass(frozen=True)
class SitePolicy:
    """The site's own privacy rules; the coordinator can ask, only this policy decides.

    A cap of ``None`` means no cap. A site without any cap also accepts non-private rounds (its epsilon
    then becomes infinite); a site with a cap refuses them.
    """

    epsilon_per_run: float | None = None
    epsilon_lifetime: float | None = None
    delta: float | None = None
    accountant: str = "prv"
    # A curriculum's site-local stage: whether the site's local student's test metrics (aggregate figures on its own
    # records, not DP-protected) may leave the site. Off unless the site says so; the fine-tuned copy never leaves.
    release_local_metrics: bool = False
    # A run that keeps its best round: whether the site's validation ROC-AUC of each round's student (an aggregate
    # figure on its own validation records, not DP-protected) may leave the site. Off unless the site says so.
    release_validation_metrics: bool = False
    # How the site's test metrics of the global student leave it (protocols/evaluation.py): "noised" (Gaussian noise
    # of this multiplier on a histogram of L2 sensitivity 1, charged to the budget), "clear" (an unprotected
    # quantity) or "none".
    test_metrics: str = "noised"
    evaluation_noise_multiplier: float = 10.0

    def __post_init__(self) -> None:
        if self.test_metrics not in TEST_METRICS_RELEASES:
            raise ConfigError(f"site policy: field 'test_metrics' must be one of {', '.join(TEST_METRICS_RELEASES)}, "
                              f"got {self.test_metrics!r}.")
        noise = self.evaluation_noise_multiplier
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.1 <= noise <= 1e6:
            raise ConfigError("site policy: field 'evaluation_noise_multiplier' must be a number in [0.1, 1e6] (the "
                              f"noise std on each histogram cell), got {noise!r}.")
        for name in ("release_local_metrics", "release_validation_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"site policy: field '{name}' must be true or false, got {getattr(self, name)!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"site policy: field 'accountant' must be one of {', '.join(ACCOUNTANTS)}, "
                              f"got {self.accountant!r}.")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ConfigError(f"site policy: field 'delta' must be in (0, 1), got {self.delta!r}.")

    def delta_for(self, records: int, requested: float | None = None) -> float:
        """The delta this site states: at most 1/(10 n) for its n records, and no more than policy or run ask.

        Without a policy delta the site uses at most 1e-5, the customary choice for datasets of this size.
        """
        own = DEFAULT_DELTA if self.delta is None else self.delta
        candidates = [1.0 / (10.0 * records), own] + ([requested] if requested is not None else [])
        return min(candidates)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "site policy") -> SitePolicy:
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{where}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
        reject_unknown_fields(raw, {"schema_version", *cls.__dataclass_fields__}, where)
        delta = raw.get("delta")
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))):
            raise ConfigError(f"{where}: field 'delta' must be a number or null, got {delta!r}.")
        return cls(epsilon_per_run=_cap(raw, "epsilon_per_run", where),
                   epsilon_lifetime=_cap(raw, "epsilon_lifetime", where),
                   delta=None if delta is None else float(delta),
                   accountant=str(raw.get("accountant", "prv")),
                   release_local_metrics=raw.get("release_local_metrics", False),
                   release_validation_metrics=raw.get("release_validation_metrics", False),
                   test_metrics=raw.get("test_metrics", cls.test_metrics),
                   evaluation_noise_multiplier=raw.get("evaluation_noise_multiplier",
                                                       cls.evaluation_noise_multiplier))

    def save(self, state_dir: Path) -> None:
        atomic_write_json(Path(state_dir) / POLICY_FILE, self.to_dict())

    @classmethod
    def load(cls, state_dir: Path) -> SitePolicy:
        path = Path(state_dir) / POLICY_FILE
        if not path.is_file():
            raise ConfigError(f"{path} is missing: every site needs a privacy policy (caps, delta, accountant). "
                              "Write one before joining a federation.")
        return cls.from_dict(json.loads(path.read_text()), where=str(path))


# What a spend was: a round's Poisson-sampled DP-SGD steps, or a PATE release (client/pate.py), one Gaussian
# mechanism without subsampling (sample_rate 1, one step) whose noise multiplier is relative to its L2 sensitivity.
MECHANISMS = ("dp-sgd", "pate", "evaluation")


@dataclass(frozen=True)
class Spend:
    """One privacy event at this site, as its accountant counted it (noise_multiplier 0: no DP at all): a round of
    DP-SGD, or a PATE release. Both are subsampled Gaussian mechanisms, so one accountant composes them."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    empty_batches: int = 0
    mechanism: str = "dp-sgd"


@dataclass(frozen=True)
class Calibration:
    """Sigma for one run, computed once from the run's target and this site's delta, sample rate and plan."""

    run_id: str
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    batch_size: int
    max_grad_norm: float
    # How many units of privacy the sampling rate was computed over: persons when ``unit`` is "person", else records.
    records: int
    accountant: str
    # "person": each Poisson-sampled unit is all of one person's records, clipped as one; "record": one record.
    # Calibrations stored before units existed were record-level.
    unit: str = "record"


def _history(spends: Iterable[Spend]) -> tuple[tuple[float, float, int], ...] | None:
    """``(sigma, q, steps)`` per distinct mechanism, steps of equal ones summed (composition does not depend on
    order, and one self-composition is far cheaper than many); None when a spend was not private."""
    merged: dict[tuple[float, float], int] = {}
    for spend in spends:
        if spend.steps == 0:
            continue
        if spend.noise_multiplier <= 0:
            return None
        key = (spend.noise_multiplier, spend.sample_rate)
        merged[key] = merged.get(key, 0) + spend.steps
    return tuple(sorted((sigma, q, steps) for (sigma, q), steps in merged.items()))


def epsilon_of(spends: Iterable[Spend], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of ``spends``, recomputed from scratch with Opacus."""
    history = _history(spends)
    if history is None:
        return math.inf
    return _accountant_epsilon(history, delta, accountant) if history else 0.0


@functools.lru_cache(maxsize=4096)
def _accountant_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """A pure function of the history (a PRV evaluation costs ~0.2 s; each round asks for the same ones twice)."""
    accountant_instance = make_accountant(accountant)
    accountant_instance.history = list(history)
    # PRV takes log(1 - q), -inf at q = 1 (no subsampling), harmlessly; RDP warns when its best order is the
    # largest it tries, which is the case for the unamplified sites (q = 1) and only loosens the bound.
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant_instance.get_epsilon(delta=delta))


def pld_epsilon(spends: Iterable[Spend], delta: float) -> float:
    """The same history replayed with Google's dp-accounting (privacy loss distributions): an independent check."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent, pld

    history = _history(spends)
    if history is None:
        return math.inf
    if not history:
        return 0.0
    accountant = pld.PLDAccountant()
    accountant.compose(ComposedDpEvent([SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
                                        for sigma, q, steps in history]))
    return float(accountant.get_epsilon(delta))


def json_epsilon(value: float) -> float | str:
    """JSON has no infinity: an unbounded epsilon (a non-private round) is written as the string "inf"."""
    return "inf" if math.isinf(value) else value


def unit_of_privacy(unit: str, item: str = "record", whose: str = "a site's") -> str:
    """The unit of privacy in words, as every statement names it (``item``: a record, or a document of a text site)."""
    return (f"one person (all of their {item}s in {whose} training split)" if unit == "person"
            else f"one {item} of {whose} training split")


def group_privacy(k: int, epsilon: float, delta: float) -> dict[str, Any]:
    """What a record-level (epsilon, delta) guarantee says about a person with ``k`` records, by group privacy:
    (k epsilon, k e^((k-1) epsilon) delta). It is vacuous when that delta reaches 1: the bound then excludes nothing."""
    exponent = (k - 1) * epsilon + math.log(k * delta)
    group_delta = 1.0 if exponent >= 0 else math.exp(exponent)
    return {"k": k, "epsilon": k * epsilon, "delta": group_delta, "by": "group privacy", "vacuous": group_delta >= 1.0}


def make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if name == "prv" else RDPAccountant()


@dataclass
class PrivacyState:
    """Everything the site's accountant needs, persisted after every change so a new process continues it."""

    calibrations: dict[str, Calibration] = field(default_factory=dict)
    spends: list[Spend] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)

    def run_spends(self, run_id: str) -> list[Spend]:
        return [s for s in self.spends if s.run_id == run_id]

    def epsilon(self, delta: float, accountant: str, run_id: str | None = None) -> float:
        return epsilon_of(self.spends if run_id is None else self.run_spends(run_id), delta, accountant)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION,
                "unit_of_privacy": {run: c.unit for run, c in self.calibrations.items()},
                "calibrations": {run: asdict(c) for run, c in self.calibrations.items()},
                "spends": [asdict(s) for s in self.spends],
                "refusals": self.refusals}

    def save(self, state_dir: Path) -> None:
        atomic_write_json(Path(state_dir) / PRIVACY_FILE, self.to_dict())

    @classmethod
    def load(cls, state_dir: Path) -> PrivacyState:
        path = Path(state_dir) / PRIVACY_FILE
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{path}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
        return cls(calibrations={run: Calibration(**c) for run, c in raw["calibrations"].items()},
                   spends=[Spend(**s) for s in raw["spends"]], refusals=list(raw["refusals"]))
