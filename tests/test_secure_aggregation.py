"""Flower SecAgg+ end to end: the secure mean equals the plain weighted mean within the stated bound, and
dropouts, halted rounds and bad aggregates are loud and leave the student alone."""

import json

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from client.site import create_site
from coordinator.rounds import Coordinator
from distill.models import save_sklearn_teacher
from protocols.errors import ConfigError
from protocols.secagg import SecureAggregationSettings, decode_aggregate, encode_update, error_bound, site_weight
from simulations.engine import FaultPlan, run_federation
from tests.helpers import PUBLIC_TEACHER, federation, tabular_split

SIZES = {"north": 40, "south": 64, "east": 100}


def three_sites(directory, sizes=SIZES):
    from sklearn.linear_model import LogisticRegression

    teacher_data = tabular_split(200, 99)
    save_sklearn_teacher(LogisticRegression().fit(teacher_data.inputs["x"], teacher_data.labels),
                         directory / "teacher.pkl")
    return [create_site(directory / name, name, {"train": tabular_split(n, i), "val": tabular_split(16, 10 + i),
                                                 "test": tabular_split(16, 20 + i)}, directory / "teacher.pkl",
                         teacher_declaration=PUBLIC_TEACHER).state_dir
            for i, (name, n) in enumerate(sizes.items())]


def federate(directory, rounds=1, faults=None, sizes=SIZES, **overrides):
    config = federation(rounds=rounds, local_steps=3, batch_size=16, **overrides)
    return run_federation(three_sites(directory / "sites", sizes),
                          lambda: Coordinator(config, "run-secagg", directory / "run"), faults=faults)


def test_quantization_error_stays_within_the_stated_bound():
    settings = SecureAggregationSettings(1.0, 0.6, clipping_range=1.0, quantization_range=2**16, weight_scale=100)
    rng = np.random.default_rng(0)
    global_state = {"w": rng.normal(size=(20, 30)).astype(np.float32)}
    updates = [{"w": global_state["w"] + rng.normal(scale=0.2, size=(20, 30)).astype(np.float32)} for _ in range(4)]
    records = [10, 37, 80, 250]
    encoded = [encode_update(u, global_state, ["w"], n, 0.5, settings.clipping_range, settings.weight_scale).vectors
               for u, n in zip(updates, records)]
    # What Flower does with them: clip, quantize stochastically, sum, dequantize, take the mean.
    summed = [sum(quantize([v[i]], settings.clipping_range, settings.quantization_range)[0].astype(np.int64)
                  for v in encoded) for i in range(3)]
    mean = [dequantize([s], settings.clipping_range, settings.quantization_range)[0] / 4
            - settings.clipping_range * 3 / 4 for s in summed]
    decoded = decode_aggregate(mean, ["w"], global_state, settings, 1)
    weights = np.array([site_weight(n, 100) for n in records])
    exact = global_state["w"] + sum(w * (u["w"] - global_state["w"]) for w, u in zip(weights, updates)) / weights.sum()
    error = np.max(np.abs(decoded.state["w"] - exact))
    assert 0 < error <= decoded.error_bound
    assert decoded.error_bound == pytest.approx(error_bound(settings, weights.mean(), np.max(np.abs(
        exact - global_state["w"]))), rel=0.05)
    assert decoded.train_loss == pytest.approx(0.5, abs=1e-3)


def test_values_beyond_the_clipping_range_are_counted():
    settings = SecureAggregationSettings(1.0, 0.6, clipping_range=1.0, quantization_range=2**16, weight_scale=1)
    state = {"w": np.zeros(6, dtype=np.float32)}
    update = {"w": np.linspace(-2.5, 2.5, 6).astype(np.float32)}
    encoded = encode_update(update, state, ["w"], 5, 0.2, settings.clipping_range, settings.weight_scale)
    assert encoded.clipped_values == 4


def test_the_secure_aggregate_equals_the_plain_weighted_mean_within_the_bound(tmp_path):
    secure = federate(tmp_path / "secure")
    plain = federate(tmp_path / "plain", secure_aggregation=False)
    [secure_record], [plain_record] = secure.records, plain.records
    assert secure_record["aggregation"] == "secagg+" and plain_record["aggregation"] == "plain"
    assert secure_record["participants"] == plain_record["participants"] == sorted(SIZES)
    bound = secure_record["quantization_error_bound"]
    assert 0 < bound < 1e-4
    difference = max(float(np.max(np.abs(secure.state[k] - plain.state[k]))) for k in plain.state)
    assert difference <= bound
    assert secure_record["train_loss"] == pytest.approx(plain_record["train_loss"], abs=1e-3)
    # The coordinator's record holds no example count and no per-site update, only the sites' own epsilon report.
    assert "num-examples" not in json.dumps(secure_record)
    assert set(secure_record["privacy"]["north"]) <= {"epsilon-run", "epsilon-lifetime", "accountant", "steps",
                                                      "ledger-seq", "ledger-hash"}


def test_each_site_sharing_with_fewer_neighbours_than_the_cohort_still_sums_exactly(tmp_path):
    # num_shares=3 in a cohort of 5: each site's keys go to the one site on either side of it in SecAgg+'s ring.
    sizes = SIZES | {"west": 52, "centre": 76}
    assert SecureAggregationSettings(3, 0.6, 1.0, 2**16, 100).shares_for(len(sizes)) == 3
    secure = federate(tmp_path / "secure", sizes=sizes, num_shares=3)
    plain = federate(tmp_path / "plain", sizes=sizes, secure_aggregation=False)
    [secure_record], [plain_record] = secure.records, plain.records
    assert secure_record["status"] == "aggregated" and secure_record["participants"] == sorted(sizes)
    difference = max(float(np.max(np.abs(secure.state[k] - plain.state[k]))) for k in plain.state)
    assert difference <= secure_record["quantization_error_bound"]


def test_a_share_count_at_least_the_cohort_means_every_site_and_an_even_count_is_refused():
    settings = SecureAggregationSettings(33, 0.6, 1.0, 2**16, 100)
    assert settings.shares_for(33) == settings.shares_for(5) == 1.0 and settings.shares_for(100) == 33
    assert SecureAggregationSettings(0.25, 0.6, 1.0, 2**16, 100).shares_for(100) == 0.25
    with pytest.raises(ConfigError, match="'num_shares' must be .* odd number of sites"):
        federation(num_shares=32)
    with pytest.raises(ConfigError, match="'num_shares'"):
        federation(num_shares=1.5)


def test_a_site_that_fails_mid_round_leaves_the_round_to_the_survivors(tmp_path):
    # Two survivors are enough only where the cohort allows it (test_site_and_coordinator: fewer are not used).
    coordinator = federate(tmp_path, rounds=2, faults=FaultPlan(failures=frozenset({("south", 2)})), min_cohort=2)
    first, second = coordinator.records
    assert first["participants"] == sorted(SIZES) and first["status"] == "aggregated"
    assert second["status"] == "aggregated" and second["participants"] == ["east", "north"]
    [reason] = second["failures"].values()
    assert "dropped out during SecAgg+" in reason and "injected failure: site south crashed in round 2" in reason


def test_fewer_live_sites_than_the_threshold_fails_the_round_and_keeps_the_student(tmp_path):
    faults = FaultPlan(failures=frozenset({("south", 2), ("east", 2)}))
    coordinator = federate(tmp_path, rounds=2, faults=faults)
    first, second = coordinator.records
    assert first["status"] == "aggregated"
    assert second["status"] == "failed" and second["participants"] == []
    assert "SecAgg+ halted" in second["aggregate_rejected"]
    assert second["student_digest"] == first["student_digest"]


def test_a_cohort_smaller_than_min_cohort_is_refused_before_any_round(tmp_path):
    from simulations.runner import SimulationOptions, simulate

    with pytest.raises(ConfigError, match="min_cohort=3"):
        simulate(SimulationOptions(sites=2, rounds=1, subsample=0.1, out=tmp_path, stages=("federated",)))
