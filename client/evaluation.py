"""A site's evaluation of the global student on its own test split, released as its policy decides
(protocols/evaluation.py has the formats and the schedule).

The site answers only for a run it accepted with that config hash, only for a student with the digest named, only
after a round of the schedule it accepted (recorded in its run-accepted event, and planned into its calibration when
its release is noised), and each round once. A noised release is charged before it is made, with a Gaussian
mechanism of the policy's noise multiplier on a histogram of L2 sensitivity 1 (one unit of privacy moves at most one
unit of weight); a release that would pass a cap is refused and spends nothing, and a site that trained no round
of the run, or holds no test split, releases nothing for it. Everything is recorded in the site's ledger: how it
released, the noise, the histogram's digest; the histogram itself only leaves in the reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from client.budget import decide, record_spend
from client.local_stage import requested_student
from client.site import Site
from distill.train import predict_proba
from protocols.accounting import PrivacyState, SitePolicy, Spend, json_epsilon
from protocols.canonical import digest_arrays
from protocols.errors import UpdateRejected
from protocols.evaluation import (LOG_ODDS_RANGE, TEST_EVALUATION_EVENT, EvaluationRelease, EvaluationRequest,
                                  histogram_shape)
from protocols.ledger import ledger_in, read_events


def evaluation_histogram(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """The weighted histogram of protocols.evaluation: binary by true class and bin of the log-odds of class 1,
    else the confusion matrix (true by arg-max class)."""
    classes = probabilities.shape[1]
    histogram = np.zeros(histogram_shape(classes, bins), dtype=np.float64)
    if classes == 2:
        p1 = np.clip(probabilities[:, 1].astype(np.float64), 1e-12, 1 - 1e-12)
        log_odds = np.log(p1) - np.log1p(-p1)
        scaled = (log_odds + LOG_ODDS_RANGE) / (2 * LOG_ODDS_RANGE) * bins
        columns = np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)
    else:
        columns = probabilities.argmax(axis=1)
    np.add.at(histogram, (np.asarray(labels, dtype=np.int64), columns), weights)
    return histogram


def unit_weights(groups: np.ndarray, unit: str, n: int) -> np.ndarray:
    """Each test record's weight: 1 / (its person's test records) in a person-level run whose records name persons,
    so that one person adds at most 1 to the histogram; 1 per record otherwise."""
    if unit != "person" or not len(groups):
        return np.ones(n, dtype=np.float64)
    _, owner, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[owner]


def evaluation_spend(policy: SitePolicy, run_id: str, server_round: int) -> Spend:
    return Spend(run_id, server_round, policy.evaluation_noise_multiplier, 1.0, 1, mechanism="evaluation")


def planned_evaluation_spends(policy: SitePolicy, run_id: str, rounds: Sequence[int]) -> list[Spend]:
    """What the run's evaluations will cost this site: one Gaussian release per scheduled round when it noises them,
    nothing when it releases them in the clear or not at all."""
    if policy.test_metrics != "noised":
        return []
    return [evaluation_spend(policy, run_id, server_round) for server_round in rounds]


def _accepted_schedule(site: Site, run_id: str) -> tuple[list[int], list[int]]:
    """(the evaluation rounds the site accepted for the run, the rounds it has evaluated already)."""
    path = site.state_dir / "ledger.jsonl"
    events = read_events(path) if path.is_file() else []
    accepted = [e["payload"] for e in events if e["kind"] == "run-accepted" and e["payload"]["run_id"] == run_id]
    done = [e["payload"]["round"] for e in events
            if e["kind"] == TEST_EVALUATION_EVENT and e["payload"]["run_id"] == run_id]
    return (list(accepted[0].get("evaluation_rounds", [])) if accepted else []), done


def evaluate_student(site: Site, request: EvaluationRequest, global_state: Mapping[str, np.ndarray]
                     ) -> EvaluationRelease:
    """Score, release as the policy says (charging a noised release first), record; returns what leaves."""
    what = f"site {site.name}, test evaluation after round {request.round} of run {request.run_id}"
    model = requested_student(site, what, request.run_id, request.config_hash, request.student,
                              request.student_digest, global_state)
    schedule, done = _accepted_schedule(site, request.run_id)
    if request.round not in schedule:
        raise UpdateRejected(f"{what}: round {request.round} is not in the evaluation schedule {schedule} this site "
                             "accepted for the run; it evaluates only those rounds.")
    if request.round in done:
        raise UpdateRejected(f"{what}: this site evaluated round {request.round} already; it answers each round once.")
    policy = SitePolicy.load(site.state_dir)
    state = PrivacyState.load(site.state_dir)
    calibration = state.calibrations.get(request.run_id)
    trained = any(s.mechanism == "dp-sgd" for s in state.run_spends(request.run_id))
    unit = calibration.unit if calibration else "record"
    test = site.splits().get("test")
    held_out = test is not None and len(test) > 0
    histogram = None
    if held_out:
        with torch.no_grad():
            probabilities = predict_proba(model, request.student.family, test)
        if probabilities.shape[1] != request.classes:
            raise UpdateRejected(f"{what}: the student predicts {probabilities.shape[1]} classes, the request says "
                                 f"{request.classes}.")
        histogram = evaluation_histogram(test.labels, probabilities, unit_weights(test.groups, unit, len(test)),
                                         request.bins)
    payload = {"run_id": request.run_id, "config_hash": request.config_hash, "round": request.round,
               "student_digest": request.student_digest, "records": len(test) if held_out else 0,
               "weighted_by": unit}
    # Nothing to evaluate on ([data] test_share = 0), or a run this site refused every round of: it releases nothing
    # and spends nothing on it.
    mode = policy.test_metrics if trained and held_out else "none"
    if mode == "none" and policy.test_metrics != "none":
        payload["refused"] = "this site holds no test split" if not held_out else "this site trained no round of the run"
    release = EvaluationRelease(mode, histogram if mode == "clear" else None, weighted_by=unit)
    if mode == "noised":
        spend = evaluation_spend(policy, request.run_id, request.round)
        delta = calibration.delta if calibration else policy.delta_for(len(test))
        assert histogram is not None
        decision = decide(policy, state, spend, delta)
        if not decision.accept:
            release = EvaluationRelease("none", weighted_by=unit)
            payload["refused"] = decision.reason
        else:
            record_spend(site.state_dir, state, spend)
            noise = torch.normal(0.0, spend.noise_multiplier, histogram.shape, generator=torch.Generator().manual_seed(
                site.noise_seed(request.run_id, "evaluation", request.round)),
                dtype=torch.float64).numpy()
            release = EvaluationRelease("noised", histogram + noise, spend.noise_multiplier, unit)
            payload["dp"] = {"noise-multiplier": spend.noise_multiplier, "sample-rate": spend.sample_rate,
                             "steps": spend.steps, "delta": delta, "sensitivity_l2": 1.0}
            payload["epsilon_run"] = json_epsilon(state.epsilon(delta, policy.accountant, request.run_id))
    payload |= {"released": release.released, "noise_std": release.noise_std,
                "digest": None if release.histogram is None else digest_arrays({"histogram": release.histogram})}
    ledger = ledger_in(site.state_dir, site.name)
    ledger.append(TEST_EVALUATION_EVENT, payload)
    ledger.checkpoint({"run_id": request.run_id, "after": f"test evaluation of round {request.round}"})
    return release
