"""The site's live privacy decisions: what a round would cost, whether it may train, and recording the outcome.

Every record-level update the site sends comes from Poisson-sampled DP-SGD (:mod:`client.privacy`). Only the
site decides: on the run's first round it calibrates its noise multiplier (:func:`calibrate`); before every
round it computes the epsilon it would have after the round and refuses when that would pass a cap of its
policy (:func:`decide`). A refusal trains nothing and spends nothing. The files it keeps (``policy.json``,
``privacy.json``) and the accountant that recomputes epsilon from them are in :mod:`protocols.accounting`,
which an auditor uses too.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from protocols.accounting import Calibration, PrivacyState, SitePolicy, Spend, epsilon_of, json_epsilon
from protocols.errors import BudgetExhausted

log = logging.getLogger("fedistill.site.budget")


def sample_rate(records: int, batch_size: int) -> float:
    """Poisson sampling rate: Opacus uses 1 / (number of batches of ``batch_size`` in the dataset)."""
    return 1.0 / math.ceil(records / batch_size)


# Opacus's own calibration stops within this much of the target epsilon; the composed one does the same.
CALIBRATION_TOLERANCE = 0.01


def calibrate(run_id: str, target_epsilon: float, delta: float, records: int, batch_size: int, planned_steps: int,
              max_grad_norm: float, accountant: str, also_planned: Sequence[Spend] = (),
              unit: str = "record") -> Calibration:
    """Sigma for the run's planned DP-SGD steps; with ``also_planned`` (a PATE release), sigma such that those
    events composed with the steps reach ``target_epsilon``. Raises ``BudgetExhausted`` when they alone pass it.
    ``records`` counts the units of privacy (``unit``: persons or records), which the sampling rate is over."""
    rate = sample_rate(records, batch_size)
    if also_planned:
        sigma = _composed_noise_multiplier(run_id, target_epsilon, delta, rate, planned_steps, accountant,
                                           list(also_planned))
    else:
        sigma = _noise_multiplier(target_epsilon, delta, rate, planned_steps, accountant)
    return Calibration(run_id=run_id, target_epsilon=target_epsilon, delta=delta, noise_multiplier=float(sigma),
                       sample_rate=rate, planned_steps=planned_steps, batch_size=batch_size,
                       max_grad_norm=max_grad_norm, records=records, accountant=accountant, unit=unit)


@functools.lru_cache(maxsize=1024)
def _noise_multiplier(target_epsilon: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    """Opacus's calibration, a pure function of its arguments: each costs a bisection of PRV evaluations (about
    3 s), and in a simulation hundreds of banks share a few sampling rates (docs/performance.md, "Scale")."""
    from opacus.accountants.utils import get_noise_multiplier

    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                          steps=steps, accountant=accountant))


def _composed_noise_multiplier(run_id: str, target_epsilon: float, delta: float, rate: float, steps: int,
                               accountant: str, fixed: list[Spend]) -> float:
    """The smallest sigma (within Opacus's tolerance) whose DP-SGD steps, composed with ``fixed``, stay at or
    under the target: bisection on the same accountant every later decision uses."""
    alone = epsilon_of(fixed, delta, accountant)
    if alone >= target_epsilon:
        raise BudgetExhausted(f"the run's other privacy events ({', '.join(s.mechanism for s in fixed)}) alone cost "
                              f"epsilon {alone:.4g} at delta {delta:.2g}, at or above the run's target "
                              f"{target_epsilon:g}, leaving nothing for DP-SGD; raise the PATE noise multiplier or the "
                              "target. Nothing is trained or spent.", {"epsilon_fixed": alone})

    def cost(sigma: float) -> float:
        return epsilon_of([*fixed, Spend(run_id, 0, sigma, rate, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while cost(high) > target_epsilon:
        low, high = high, 2 * high
    while cost(high) < target_epsilon - CALIBRATION_TOLERANCE and high - low > 1e-6:
        middle = (low + high) / 2
        if cost(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


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


def planned_spend(run_id: str, server_round: int, steps: int, calibration: Calibration | None) -> Spend:
    """What one round will cost: ``steps`` Poisson-sampled DP-SGD steps, or a non-private round (sigma 0)."""
    if calibration is None:
        return Spend(run_id, server_round, 0.0, 1.0, steps)
    return Spend(run_id, server_round, calibration.noise_multiplier, calibration.sample_rate, steps)


def decide(policy: SitePolicy, state: PrivacyState, spend: Spend, delta: float,
           also: Sequence[Spend] = ()) -> Decision:
    """Accept the round only if the epsilon after it (its DP-SGD ``spend`` and any other event it makes, ``also``:
    a PATE release) stays within every cap of the policy."""
    run_before = state.epsilon(delta, policy.accountant, spend.run_id)
    life_before = state.epsilon(delta, policy.accountant)
    run_after = epsilon_of([*state.run_spends(spend.run_id), *also, spend], delta, policy.accountant)
    life_after = epsilon_of([*state.spends, *also, spend], delta, policy.accountant)
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
