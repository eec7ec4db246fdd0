"""The site's privacy policy and budget: what it has spent, what a round would cost, and whether it may train.

The unit of privacy is one record of this site's training split. Every record-level update the site sends
comes from Poisson-sampled DP-SGD (:mod:`client.privacy`); the site keeps every spend it made, as
``(noise_multiplier, sample_rate, steps)`` per round, and any epsilon it states is recomputed from that
history with an Opacus accountant. Only the site decides: before every round it computes the epsilon it
would have after the round and refuses when that would pass a cap of its policy. A refusal trains nothing
and spends nothing.

    <state-dir>/policy.json     the site's caps (per run, lifetime), delta and accountant (written by the site)
    <state-dir>/privacy.json    calibrations per run, every spend, every refusal (appended atomically)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from protocols.canonical import atomic_write_json
from protocols.errors import ConfigError

SCHEMA_VERSION = 1
POLICY_FILE = "policy.json"
PRIVACY_FILE = "privacy.json"
ACCOUNTANTS = ("prv", "rdp")
DEFAULT_DELTA = 1e-5
log = logging.getLogger("fedistill.site.budget")


def _cap(raw: Mapping[str, Any], name: str, where: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: field '{name}' must be a positive number (or null for no cap), got {value!r}.")
    return float(value)


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

    def __post_init__(self) -> None:
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
        unknown = sorted(set(raw) - {"schema_version", *cls.__dataclass_fields__})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}.")
        delta = raw.get("delta")
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))):
            raise ConfigError(f"{where}: field 'delta' must be a number or null, got {delta!r}.")
        return cls(epsilon_per_run=_cap(raw, "epsilon_per_run", where),
                   epsilon_lifetime=_cap(raw, "epsilon_lifetime", where),
                   delta=None if delta is None else float(delta),
                   accountant=str(raw.get("accountant", "prv")))

    def save(self, state_dir: Path) -> None:
        atomic_write_json(Path(state_dir) / POLICY_FILE, self.to_dict())

    @classmethod
    def load(cls, state_dir: Path) -> SitePolicy:
        path = Path(state_dir) / POLICY_FILE
        if not path.is_file():
            raise ConfigError(f"{path} is missing: every site needs a privacy policy (caps, delta, accountant). "
                              "Write one before joining a federation.")
        return cls.from_dict(json.loads(path.read_text()), where=str(path))


@dataclass(frozen=True)
class Spend:
    """One round of DP-SGD at this site, as its accountant counted it (noise_multiplier 0: no DP at all)."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    empty_batches: int = 0


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
    records: int
    accountant: str


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


@functools.lru_cache(maxsize=256)
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


def make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if name == "prv" else RDPAccountant()


def sample_rate(records: int, batch_size: int) -> float:
    """Poisson sampling rate: Opacus uses 1 / (number of batches of ``batch_size`` in the dataset)."""
    return 1.0 / math.ceil(records / batch_size)


def calibrate(run_id: str, target_epsilon: float, delta: float, records: int, batch_size: int, planned_steps: int,
              max_grad_norm: float, accountant: str) -> Calibration:
    from opacus.accountants.utils import get_noise_multiplier

    rate = sample_rate(records, batch_size)
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                     steps=planned_steps, accountant=accountant)
    return Calibration(run_id=run_id, target_epsilon=target_epsilon, delta=delta, noise_multiplier=float(sigma),
                       sample_rate=rate, planned_steps=planned_steps, batch_size=batch_size,
                       max_grad_norm=max_grad_norm, records=records, accountant=accountant)


@dataclass(frozen=True)
class Decision:
    """The site's answer to a round: accept or refuse, with the epsilons that justify it."""

    accept: bool
    reason: str
    delta: float
    epsilon_run_before: float
    epsilon_run_after: float
    epsilon_lifetime_before: float
    epsilon_lifetime_after: float
    cap_per_run: float | None
    cap_lifetime: float | None

    def to_dict(self) -> dict[str, Any]:
        return {key: json_epsilon(value) if isinstance(value, float) else value
                for key, value in asdict(self).items()}


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
                "unit_of_privacy": "one record of this site's training split",
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


def planned_spend(run_id: str, server_round: int, steps: int, calibration: Calibration | None) -> Spend:
    """What one round will cost: ``steps`` Poisson-sampled DP-SGD steps, or a non-private round (sigma 0)."""
    if calibration is None:
        return Spend(run_id, server_round, 0.0, 1.0, steps)
    return Spend(run_id, server_round, calibration.noise_multiplier, calibration.sample_rate, steps)


def decide(policy: SitePolicy, state: PrivacyState, spend: Spend, delta: float) -> Decision:
    """Accept the round only if the epsilon after it stays within every cap of the policy."""
    run_before = state.epsilon(delta, policy.accountant, spend.run_id)
    life_before = state.epsilon(delta, policy.accountant)
    run_after = epsilon_of([*state.run_spends(spend.run_id), spend], delta, policy.accountant)
    life_after = epsilon_of([*state.spends, spend], delta, policy.accountant)
    reason = "within budget"
    accept = True
    if spend.noise_multiplier <= 0 and (policy.epsilon_per_run is not None or policy.epsilon_lifetime is not None):
        accept, reason = False, "the round is not differentially private and this site's policy has a cap"
    elif policy.epsilon_per_run is not None and run_after > policy.epsilon_per_run:
        accept, reason = False, (f"epsilon for run {spend.run_id} would reach {run_after:.4g} after round "
                                 f"{spend.round}, above the per-run cap {policy.epsilon_per_run:g}")
    elif policy.epsilon_lifetime is not None and life_after > policy.epsilon_lifetime:
        accept, reason = False, (f"lifetime epsilon would reach {life_after:.4g} after round {spend.round}, above "
                                 f"the lifetime cap {policy.epsilon_lifetime:g}")
    return Decision(accept, reason, delta, run_before, run_after, life_before, life_after,
                    policy.epsilon_per_run, policy.epsilon_lifetime)


def record_refusal(state_dir: Path, state: PrivacyState, site: str, run_id: str, server_round: int,
                   decision: Decision) -> bool:
    """A refusal is a normal, logged outcome, kept with the spends; True when this round's refusal is new."""
    entry = {"run_id": run_id, "round": server_round, "time": datetime.now(timezone.utc).isoformat(),
             **decision.to_dict()}
    log.warning("site %s refuses round %d of run %s: %s", site, server_round, run_id, decision.reason)
    if any(r["run_id"] == run_id and r["round"] == server_round for r in state.refusals):
        return False
    state.refusals.append(entry)
    state.save(state_dir)
    return True


def record_spend(state_dir: Path, state: PrivacyState, spend: Spend) -> None:
    """Written before the update leaves the site: a crash after this line over-counts, never under-counts."""
    state.spends.append(spend)
    state.save(state_dir)
