"""PATE releases (client/pate.py): one person moves one teacher, the summed probabilities move by at most the
stated sensitivity, the noise is what the ledger says, the site's accountant composes the release with its DP-SGD
steps (and refuses past its cap without spending), and a hybrid PATE run verifies through the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from client.budget import calibrate, decide
from client.pate import (ensemble_probability_sum, pate_noise, pate_noised_mean, person_keys, project_to_simplex,
                         teacher_of_person)
from distill.data import SplitData
from fedistill.cli import app
from protocols.accounting import PrivacyState, SitePolicy, Spend, epsilon_of, pld_epsilon
from protocols.errors import BudgetExhausted, ConfigError
from protocols.knowledge import KnowledgeSettings
from tests.helpers import tabular_split


def pate_settings(**changes) -> KnowledgeSettings:
    return KnowledgeSettings(**({"mode": "hybrid", "source": "pate", "proxy_digest": "ab" * 32,
                                 "proxy_records": 50, "classes": 2, "pate_teachers": 5} | changes))


def test_pate_settings_are_refused_outside_their_place_and_travel_only_with_source_pate():
    with pytest.raises(ConfigError, match="mode 'knowledge' with source 'pate'.*use mode 'hybrid'"):
        pate_settings(mode="knowledge")
    with pytest.raises(ConfigError, match="pate_teachers apply to source 'pate' only"):
        pate_settings(source="local-student")
    with pytest.raises(ConfigError, match="field 'pate_teachers' must be an integer >= 2"):
        pate_settings(pate_teachers=1)
    assert "pate_teachers" not in pate_settings(source="local-student", pate_teachers=16).to_dict()
    settings = pate_settings(pate_noise_multiplier=3.0)
    assert KnowledgeSettings.from_dict(settings.to_dict()) == settings
    assert settings.pate_sensitivity == pytest.approx(10.0) and settings.pate_noise_std == pytest.approx(30.0)


def test_a_person_lands_on_one_teacher_and_a_newcomer_moves_no_one_else():
    keys = np.array([f"patient-{i}" for i in range(600)])
    before = teacher_of_person(keys, 8, "run-a")
    after = teacher_of_person(np.append(keys, "newcomer"), 8, "run-a")
    assert np.array_equal(after[:600], before)
    assert set(before) == set(range(8)) and np.bincount(before).min() > 40
    records = SplitData({"x": np.zeros((6, 2), np.float32)}, np.zeros(6, np.int64), np.array([7, 7, 7, 9, 9, 4]))
    assignment = teacher_of_person(person_keys(records), 8, "run-a")
    assert len(set(assignment[:3])) == 1 and len(set(assignment[3:5])) == 1
    # Without person ids every record is its own person, keyed by its content, not by its position.
    plain = SplitData({"x": np.arange(8, dtype=np.float32).reshape(4, 2)}, np.array([0, 1, 0, 1]))
    shuffled = plain.subset(np.array([2, 0, 3, 1]))
    assert sorted(person_keys(plain)) == sorted(person_keys(shuffled)) and len(set(person_keys(plain))) == 4


def test_removing_one_person_moves_the_summed_probabilities_by_at_most_the_sensitivity():
    train = tabular_split(400, 1)
    train = SplitData(train.inputs, train.labels, np.arange(400) // 4)  # four records per person
    proxy = tabular_split(50, 2).inputs
    settings = pate_settings()

    def summed(records: SplitData) -> np.ndarray:
        assignment = teacher_of_person(person_keys(records), settings.pate_teachers, "run-s")
        return ensemble_probability_sum(LogisticRegression(), records, assignment, settings, proxy)

    total = summed(train)
    np.testing.assert_allclose(total.sum(axis=1), settings.pate_teachers)
    for person in (3, 57, 99):
        moved = np.linalg.norm(total - summed(train.subset(np.flatnonzero(train.groups != person))))
        assert 0 < moved <= settings.pate_sensitivity


def test_the_noise_has_the_recorded_std_and_the_release_is_the_projection_onto_the_simplex():
    settings = pate_settings(proxy_records=4000, pate_noise_multiplier=0.5)
    noise = pate_noise(settings, seed=3)
    assert noise.std() / settings.pate_noise_std == pytest.approx(1.0, abs=0.03)
    assert abs(noise.mean()) < 0.05 * settings.pate_noise_std
    assert not np.array_equal(noise, pate_noise(settings, seed=4))
    release = pate_noised_mean(np.full(settings.soft_label_shape, 2.5), settings, seed=3)
    assert release.min() >= 0 and np.allclose(release.sum(axis=1), 1.0)

    rng = np.random.default_rng(0)
    rows = 2.0 * rng.normal(size=(40, 3))
    projected = project_to_simplex(rows)
    candidates = rng.dirichlet(np.ones(3), size=20_000)
    for row, point in zip(rows, projected):
        assert np.linalg.norm(row - point) <= np.linalg.norm(candidates - row, axis=1).min() + 1e-9
    on_simplex = rng.dirichlet(np.ones(3), size=5)
    np.testing.assert_allclose(project_to_simplex(on_simplex), on_simplex, atol=1e-12)


def test_the_site_calibrates_dp_sgd_for_its_composition_with_the_release_and_refuses_past_its_cap():
    release = Spend("run-c", 1, 4.0, 1.0, 1, mechanism="pate")
    composed = calibrate("run-c", 3.0, 1e-5, 2000, 256, 200, 1.0, "prv", also_planned=[release])
    alone = calibrate("run-c", 3.0, 1e-5, 2000, 256, 200, 1.0, "prv")
    assert composed.noise_multiplier > alone.noise_multiplier
    steps = Spend("run-c", 1, composed.noise_multiplier, composed.sample_rate, 200)
    epsilon = epsilon_of([release, steps], 1e-5, "prv")
    assert 3.0 - 0.02 <= epsilon <= 3.0
    assert pld_epsilon([release, steps], 1e-5) == pytest.approx(epsilon, rel=0.02)
    with pytest.raises(BudgetExhausted, match="alone cost epsilon 0.9.*Nothing is trained or spent"):
        calibrate("run-c", 0.5, 1e-5, 2000, 256, 200, 1.0, "prv", also_planned=[release])

    round_steps = Spend("run-c", 1, composed.noise_multiplier, composed.sample_rate, 20)
    without, with_release = (epsilon_of(spends, 1e-5, "prv") for spends in ([round_steps], [release, round_steps]))
    policy = SitePolicy(epsilon_per_run=(without + with_release) / 2)
    assert decide(policy, PrivacyState(), round_steps, 1e-5).accept
    refused = decide(policy, PrivacyState(), round_steps, 1e-5, also=[release])
    assert not refused.accept and refused.epsilon_run_after == pytest.approx(with_release)


runner = CliRunner()


def _events(site_dir: Path, kind: str) -> list[dict]:
    return [event for event in map(json.loads, (site_dir / "ledger.jsonl").read_text().splitlines())
            if event["kind"] == kind]


@pytest.mark.slow
def test_simulate_hybrid_pate_charges_one_release_per_site_and_verify_replays_the_composed_epsilon(tmp_path):
    result = runner.invoke(app, ["simulate", "--scenario", "hospitals", "--subsample", "0.15", "--rounds", "2",
                                 "--local-steps", "3", "--stages", "federated", "--epsilon", "3",
                                 "--knowledge-mode", "hybrid", "--knowledge-source", "pate", "--proxy-records", "128",
                                 "--pate-teachers", "4", "--site-cap", "picu=0.5", "--out", str(tmp_path),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = Path(summary["paths"]["run_dir"])
    knowledge = json.loads((run_dir / "config.json").read_text())["federation"]["knowledge"]
    assert knowledge["source"] == "pate" and knowledge["proxy_records"] == 128 and knowledge["pate_teachers"] == 4

    # picu's cap (0.5) is below what the release alone costs (about 0.9): it refuses, and spends nothing.
    picu = run_dir / "sites" / "picu"
    assert not PrivacyState.load(picu).spends and not _events(picu, "pate-release")
    assert not list(picu.glob("pate-release-*")) and summary["privacy"]["sites"]["picu"]["rounds_refused"] == [1, 2]
    # Not even the test evaluation of the final student: a site that trained no round releases nothing for the run.
    assert summary["site_evaluation"][-1]["sites"]["picu"]["released"] == "none"

    trained = [name for name in summary["privacy"]["sites"] if name != "picu"]
    assert len(trained) == 5
    for name in trained:
        site_dir = run_dir / "sites" / name
        spends = PrivacyState.load(site_dir).run_spends(summary["run_id"])
        # The release, the rounds' steps, and the noised test evaluation of the final student: one composition.
        assert [(s.round, s.mechanism) for s in spends] == [(1, "pate"), (1, "dp-sgd"), (2, "dp-sgd"),
                                                            (2, "evaluation")]
        (charged,) = _events(site_dir, "pate-release")
        assert charged["payload"]["dp"] == {"noise-multiplier": 4.0, "sample-rate": 1.0, "steps": 1}
        assert charged["payload"]["sensitivity_l2"] == pytest.approx(16.0)
        sent = _events(site_dir, "update-sent")
        assert [e["payload"]["knowledge"]["charged_this_round"] for e in sent] == [True, False]
        assert {e["payload"]["knowledge"]["released_in_round"] for e in sent} == {1}
        recorded = sent[-1]["payload"]["epsilon_run"]
        delta = sent[-1]["payload"]["dp"]["delta"]
        steps_only = epsilon_of([s for s in spends if s.mechanism == "dp-sgd"], delta, "prv")
        assert steps_only < recorded <= 3.0
        assert pld_epsilon(spends, delta) == pytest.approx(recorded, rel=0.02)
        assert summary["privacy"]["sites"][name]["rounds_trained"] == [1, 2]
        assert summary["privacy"]["sites"][name]["pate_releases"] == [1]

    verified = runner.invoke(app, ["verify", str(run_dir), "--format", "json"])
    assert verified.exit_code == 0, verified.output
    checks = json.loads(verified.stdout)["checks"]
    assert any("knowledge (hybrid, source pate): 10 site releases" in check for check in checks)

    reported = runner.invoke(app, ["report", str(run_dir), "--format", "json"])
    assert reported.exit_code == 0, reported.output
    privacy = json.loads((run_dir / "report" / "report.json").read_text())["privacy"]
    assert "PATE release, made once: the mean of 4 teachers" in privacy["federation"]["knowledge_releases"]
    statement = privacy["sites"][trained[0]]["statement"]
    assert "composed with the PATE release of round 1 (the mean of 4 teachers" in statement

    # A site that hid its release from its own spends is caught: privacy.json no longer matches its signed ledger.
    privacy_file = run_dir / "sites" / trained[0] / "privacy.json"
    stored = json.loads(privacy_file.read_text())
    stored["spends"] = [s for s in stored["spends"] if s.get("mechanism") != "pate"]
    privacy_file.write_text(json.dumps(stored))
    tampered = runner.invoke(app, ["verify", str(run_dir), "--format", "json"])
    assert tampered.exit_code != 0 and "the spends of run" in tampered.output
