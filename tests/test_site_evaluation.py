"""The sites' evaluation of the global student on their test splits: the histogram and its metrics, the site's
release (noised and charged, clear, or none), the schedule it accepted, the coordinator's screening, and a run
through the CLI whose clear figures equal the central ones."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from client.budget import calibrate
from client.evaluation import evaluate_student, evaluation_histogram, planned_evaluation_spends, unit_weights
from client.site import Site
from client.train import train_round
from coordinator.checkpoint import load_student
from coordinator.rounds import Coordinator
from distill.train import predict_proba
from protocols.accounting import PrivacyState, SitePolicy, epsilon_of
from protocols.canonical import digest_arrays
from protocols.errors import UpdateRejected
from protocols.evaluation import EvaluationRelease, EvaluationRequest, evaluation_rounds, metrics_of_histogram
from protocols.ledger import read_events
from tests.helpers import make_site
from tests.test_cli_simulate import run_cli
from tests.test_privacy import COORDINATOR_DIR, private_federation


def test_the_schedule_is_every_nth_round_and_the_last():
    assert evaluation_rounds(5, 0) == (5,)
    assert evaluation_rounds(5, 2) == (2, 4, 5)


def test_a_clear_histogram_gives_the_exact_accuracy_f1_kappa_and_a_binned_roc_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    p1 = np.clip(0.3 * labels + rng.uniform(0, 0.7, 2000), 0, 1)
    probabilities = np.stack([1 - p1, p1], axis=1)
    metrics = metrics_of_histogram(evaluation_histogram(labels, probabilities, np.ones(2000), 1000))
    predicted = (p1 >= 0.5).astype(int)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(labels, predicted))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, p1), abs=1e-3)  # 1000 bins: nearly exact
    coarse = metrics_of_histogram(evaluation_histogram(labels, probabilities, np.ones(2000), 10))
    assert coarse["accuracy"] == metrics["accuracy"] and coarse["roc_auc"] == pytest.approx(metrics["roc_auc"],
                                                                                              abs=0.03)
    # Multi-class: the confusion matrix.
    labels3 = rng.integers(0, 3, 500)
    scores = rng.normal(size=(500, 3)) + np.eye(3)[labels3]
    three = metrics_of_histogram(evaluation_histogram(labels3, scores, np.ones(500), 10))
    assert three["accuracy"] == pytest.approx(accuracy_score(labels3, scores.argmax(1)))
    assert three["kappa"] == pytest.approx(cohen_kappa_score(labels3, scores.argmax(1))) and three["roc_auc"] is None


def test_in_a_person_level_run_one_person_weighs_one_whatever_their_records():
    weights = unit_weights(np.array([7, 7, 7, 7, 9]), "person", 5)
    assert weights.tolist() == [0.25] * 4 + [1.0]
    assert unit_weights(np.array([7, 7, 9]), "record", 3).tolist() == [1.0] * 3


def _accepted_site(tmp_path, policy: SitePolicy):
    site = make_site(tmp_path)
    policy.save(site.state_dir)
    config = private_federation(rounds=2)
    coordinator = Coordinator(config, "run-e", COORDINATOR_DIR / f"run-e-{tmp_path.name}")
    train_round(site, coordinator.instruction(1), coordinator.state)
    return site, coordinator


def _request(coordinator: Coordinator, server_round: int) -> EvaluationRequest:
    return EvaluationRequest(coordinator.run_id, coordinator.config_hash, coordinator.config.student, server_round,
                             digest_arrays(coordinator.state), 2, 10, "n")


def test_a_noised_release_was_planned_into_the_calibration_and_is_charged_once_before_it_is_made(tmp_path):
    site, coordinator = _accepted_site(tmp_path, SitePolicy(epsilon_per_run=4.0))
    state = PrivacyState.load(site.state_dir)
    calibration = state.calibrations["run-e"]
    planned = planned_evaluation_spends(SitePolicy(), "run-e", (2,))
    alone = calibrate("run-e", 4.0, calibration.delta, calibration.records, 16, 6, 1.0, "prv", unit=calibration.unit)
    assert calibration.noise_multiplier > alone.noise_multiplier  # the evaluation's share was set aside
    release = evaluate_student(site, _request(coordinator, 2), coordinator.state)
    assert release.released == "noised" and release.noise_std == 10.0 and release.histogram.shape == (2, 10)
    spends = PrivacyState.load(site.state_dir).run_spends("run-e")
    assert [s.mechanism for s in spends] == ["dp-sgd", "evaluation"] and spends[1] == planned[0]
    # Every planned step and the release together stay within the target.
    full = [*spends, *[spends[0]]]  # round 2's DP-SGD steps, not yet taken
    assert epsilon_of(full, calibration.delta, "prv") <= 4.0 + 1e-6
    with pytest.raises(UpdateRejected, match="evaluated round 2 already"):
        evaluate_student(site, _request(coordinator, 2), coordinator.state)
    with pytest.raises(UpdateRejected, match="not in the evaluation schedule"):
        evaluate_student(site, _request(coordinator, 1), coordinator.state)


@pytest.mark.parametrize("mode", ["clear", "none"])
def test_a_clear_release_is_exact_and_free_and_none_releases_nothing(tmp_path, mode):
    site, coordinator = _accepted_site(tmp_path, SitePolicy(test_metrics=mode))
    release = evaluate_student(site, _request(coordinator, 2), coordinator.state)
    assert release.released == mode and release.noise_std == 0.0
    assert [s.mechanism for s in PrivacyState.load(site.state_dir).run_spends("run-e")] == ["dp-sgd"]
    if mode == "none":
        assert release.histogram is None
    else:
        assert release.histogram.sum() == len(site.splits()["test"])


def test_the_coordinator_screens_each_release_and_refuses_a_bad_one_by_name():
    request = EvaluationRequest("r", "h", private_federation().student, 1, "d", 2, 10, "n")
    good = EvaluationRelease("noised", np.zeros((2, 10)), 10.0, "person").to_dict()
    assert EvaluationRelease.from_dict(good, request).released == "noised"
    for bad, why in (({**good, "histogram": np.zeros((2, 9)).tolist()}, "2 x 10"),
                     ({**good, "histogram": [[float("nan")] * 10] * 2}, "finite"),
                     ({**good, "released": "clear"}, "clear release with noise"),
                     ({**good, "extra": 1}, "something other"),
                     ({**good, "released": "clear", "noise_std": 0.0, "histogram": (-np.ones((2, 10))).tolist()},
                      "negative")):
        with pytest.raises(ValueError, match=why):
            EvaluationRelease.from_dict(bad, request)


def test_the_default_run_releases_noised_evaluations_charged_to_each_site_and_verify_replays_them(verified_run):
    """The shared small run (the CLI's defaults: person-level, noised test metrics): every site's final evaluation
    was charged as one Gaussian release, recorded in its ledger, and the run still verifies."""
    summary = json.loads((verified_run / "summary.json").read_text())
    [final] = summary["site_evaluation"]
    assert final["round"] == final["after_round"] == 2 and final["pooled"]["sites"] == 3
    assert set(final["pooled"]["noise_interval_90"]) == {"roc_auc", "accuracy", "macro_f1", "kappa"}
    for name, release in final["sites"].items():
        assert release["released"] == "noised" and release["noise_std"] == 10.0 and release["weighted_by"] == "person"
        site_dir = verified_run / "sites" / name
        [event] = [e for e in read_events(site_dir / "ledger.jsonl") if e["kind"] == "test-evaluation"]
        assert event["payload"]["dp"]["sensitivity_l2"] == 1.0 and event["payload"]["released"] == "noised"
        spends = PrivacyState.load(site_dir).run_spends(summary["run_id"])
        assert spends[-1].mechanism == "evaluation" and spends[-1].noise_multiplier == 10.0
        assert event["payload"]["epsilon_run"] == pytest.approx(summary["privacy"]["sites"][name]["epsilon"])
        assert summary["privacy"]["sites"][name]["epsilon"] <= summary["privacy"]["target_epsilon"] + 1e-6
    verified = run_cli("verify", str(verified_run), "--format", "json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["verified"] is True


@pytest.mark.slow
def test_a_simulation_reports_the_sites_clear_evaluation_equal_to_the_central_figures(tmp_path):
    result = run_cli("simulate", "--stages", "federated", "--sites", "3", "--rounds", "2", "--subsample", "0.25",
                     "--local-steps", "5", "--seed", "4", "--out", str(tmp_path), "--format", "json",
                     "--privacy-unit", "record", "--test-metrics", "clear", "--evaluate-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    run_dir = summary["paths"]["run_dir"]
    evaluations = summary["site_evaluation"]
    assert [e["round"] for e in evaluations] == [1, 2]
    final = evaluations[-1]
    assert all(s["released"] == "clear" for s in final["sites"].values()) and final["pooled"]["sites"] == 3
    model, _ = load_student(f"{run_dir}/student")
    labels, probabilities = [], []
    for name in final["sites"]:
        test = Site.load(f"{run_dir}/sites/{name}").splits()["test"]
        labels.append(test.labels)
        probabilities.append(predict_proba(model, "mlp", test))
    labels, probabilities = np.concatenate(labels), np.concatenate(probabilities)
    pooled = final["pooled"]
    assert pooled["n"] == len(labels) and pooled["noise_interval_90"] == {}
    assert pooled["accuracy"] == pytest.approx(accuracy_score(labels, (probabilities[:, 1] >= 0.5).astype(int)))
    # The sum of the sites' histograms, across the wire, is the histogram of the pooled test splits.
    central = metrics_of_histogram(evaluation_histogram(labels, probabilities, np.ones(len(labels)), 16))
    assert all(pooled[m] == pytest.approx(central[m]) for m in ("roc_auc", "macro_f1", "kappa"))


def test_a_deployed_site_holds_out_a_share_of_its_persons_as_its_test_split_and_keeps_it_as_records_arrive():
    from client.records import person_ids
    from client.sitefile import held_out_by_person
    from distill.data import SplitData

    persons = person_ids(pd.Series([f"patient-{i // 3}" for i in range(3000)]))
    records = SplitData({"x": np.zeros((3000, 1), dtype=np.float32)}, np.zeros(3000, dtype=np.int64), persons)
    splits = held_out_by_person(records, 0.2)
    train, test = set(splits["train"].groups.tolist()), set(splits["test"].groups.tolist())
    assert not train & test and 0.15 < len(test) / len(train | test) < 0.25
    # More records later: every person stays in the split it was in.
    grown = held_out_by_person(SplitData({"x": np.zeros((3300, 1), dtype=np.float32)}, np.zeros(3300, dtype=np.int64),
                                         person_ids(pd.Series(
                                             [f"patient-{i // 3}" for i in range(3300)]))), 0.2)
    assert test <= set(grown["test"].groups.tolist()) and not train & set(grown["test"].groups.tolist())
    assert list(held_out_by_person(records, 0.0)) == ["train"]
