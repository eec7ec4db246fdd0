"""DP-SGD at a site: calibration, accounting, persistence, refusals, and an independent replay of epsilon."""

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from client.budget import calibrate, decide, planned_spend, sample_rate
from client.site import Site, create_site
from client.train import train_round
from coordinator.rounds import Coordinator
from protocols.accounting import PrivacyState, SitePolicy, Spend, epsilon_of, pld_epsilon
from protocols.errors import BudgetExhausted, ConfigError
from tests.helpers import TINY_BERT, federation, make_site, tabular_split, text_site


def private_federation(**overrides):
    return federation(**{"target_epsilon": 4.0, "rounds": 3, "local_steps": 5, **overrides})


# One coordinator directory per test session: its ledger key is the one every site of these tests pins.
COORDINATOR_DIR = Path(tempfile.mkdtemp(prefix="fedistill-test-coordinator-"))


def instruction_for(config, server_round, run_id="run-a"):
    return Coordinator(config, run_id, COORDINATOR_DIR / run_id).instruction(server_round)


def global_state(config):
    return Coordinator(config, "run-a", COORDINATOR_DIR / "run-a").state


def test_a_private_round_spends_what_was_calibrated_and_persists_it(tmp_path):
    site = make_site(tmp_path)
    SitePolicy(epsilon_per_run=4.0).save(site.state_dir)
    config = private_federation()
    before = global_state(config)
    update = train_round(site, instruction_for(config, 1), before)
    state = PrivacyState.load(site.state_dir)
    calibration = state.calibrations["run-a"]
    assert calibration.planned_steps == 15 and calibration.sample_rate == sample_rate(64, 16) == 0.25
    assert calibration.delta == pytest.approx(min(1e-5, 1 / 640))
    assert state.spends == [Spend("run-a", 1, calibration.noise_multiplier, 0.25, 5, state.spends[0].empty_batches)]
    assert 0 < update.privacy["epsilon-run"] < 4.0
    assert update.privacy["epsilon-run"] == pytest.approx(state.epsilon(calibration.delta, "prv", "run-a"))
    assert any(not np.array_equal(before[k], v) for k, v in update.arrays.items())
    # Sigma is calibrated once per run: round 2 reuses it.
    train_round(site, instruction_for(config, 2), before)
    state = PrivacyState.load(site.state_dir)
    assert [s.noise_multiplier for s in state.spends] == [calibration.noise_multiplier] * 2


def test_the_accountant_survives_a_process_restart(tmp_path):
    site = make_site(tmp_path)
    config = private_federation()
    train_round(site, instruction_for(config, 1), global_state(config))
    state = PrivacyState.load(site.state_dir)
    delta = state.calibrations["run-a"].delta
    here = state.epsilon(delta, "prv")
    script = ("import sys, json; from protocols.accounting import PrivacyState; "
              f"print(json.dumps(PrivacyState.load(sys.argv[1]).epsilon({delta!r}, 'prv')))")
    fresh = subprocess.run([sys.executable, "-c", script, str(site.state_dir)], capture_output=True, text=True,
                           check=True)
    assert json.loads(fresh.stdout) == here > 0


def test_the_full_run_lands_at_the_target_and_dp_accounting_agrees_within_two_percent():
    calibration = calibrate("run-b", 3.0, 1e-5, 3056, 64, 4000, 1.0, "prv")
    spends = [Spend("run-b", r, calibration.noise_multiplier, calibration.sample_rate, 100) for r in range(1, 41)]
    opacus_prv = epsilon_of(spends, 1e-5, "prv")
    assert 2.9 < opacus_prv <= 3.0
    assert pld_epsilon(spends, 1e-5) == pytest.approx(opacus_prv, rel=0.02)
    # RDP is a looser bound on the same history.
    assert epsilon_of(spends, 1e-5, "rdp") > opacus_prv


def test_a_refused_round_trains_nothing_and_spends_nothing(tmp_path):
    site = make_site(tmp_path)
    # Per-run cap far below the first round's cost at this target.
    SitePolicy(epsilon_per_run=0.05).save(site.state_dir)
    config = private_federation()
    with pytest.raises(BudgetExhausted, match="per-run cap 0.05") as refusal:
        train_round(site, instruction_for(config, 1), global_state(config))
    assert refusal.value.details["accept"] is False
    state = PrivacyState.load(site.state_dir)
    assert state.spends == [] and [r["round"] for r in state.refusals] == [1]


def test_a_capped_site_refuses_a_non_private_round(tmp_path):
    site = make_site(tmp_path)
    SitePolicy(epsilon_lifetime=10.0).save(site.state_dir)
    config = federation()
    with pytest.raises(BudgetExhausted, match="not differentially private"):
        train_round(site, instruction_for(config, 1), global_state(config))


def test_an_uncapped_site_that_trains_without_dp_has_infinite_epsilon(tmp_path):
    site = make_site(tmp_path)
    config = federation()
    update = train_round(site, instruction_for(config, 1), global_state(config))
    assert update.privacy["epsilon-run"] == "inf"
    assert math.isinf(PrivacyState.load(site.state_dir).epsilon(1e-5, "prv"))


def test_the_lifetime_cap_holds_across_runs():
    policy = SitePolicy(epsilon_lifetime=3.0)
    calibration = calibrate("old", 2.5, 1e-5, 1000, 50, 100, 1.0, "prv")
    state = PrivacyState(spends=[Spend("old", r, calibration.noise_multiplier, calibration.sample_rate, 25)
                                 for r in range(1, 5)])
    assert 2.4 < state.epsilon(1e-5, "prv") <= 2.5
    # A second run at the same target: the site trains until its lifetime epsilon would pass 3.
    for server_round in range(1, 5):
        decision = decide(policy, state, planned_spend("new", server_round, 25, calibration), 1e-5)
        if not decision.accept:
            break
        state.spends.append(planned_spend("new", server_round, 25, calibration))
    assert not decision.accept and "lifetime" in decision.reason and server_round > 1
    assert decision.epsilon_lifetime_before <= 3.0 < decision.epsilon_lifetime_after
    assert decision.epsilon_run_after < 2.5 and state.epsilon(1e-5, "prv") <= 3.0


def test_empty_poisson_batches_take_an_accounted_noise_only_step(tmp_path):
    teacher_site = make_site(tmp_path)
    splits = {"train": tabular_split(4, 5), "val": tabular_split(8, 6), "test": tabular_split(8, 7)}
    site = create_site(tmp_path / "tiny", "tiny", splits, teacher_site.teacher_path,
                       teacher_declaration=teacher_site.teacher_declaration)
    config = private_federation(batch_size=1, local_steps=40, rounds=1, target_epsilon=50.0)
    update = train_round(site, instruction_for(config, 1), global_state(config))
    spend = PrivacyState.load(site.state_dir).spends[0]
    # q = 1/4: a batch is empty with probability 0.75^4 = 0.32, so 40 steps almost surely include some.
    assert spend.steps == 40 and spend.empty_batches > 0
    assert update.privacy["empty-batches"] == spend.empty_batches


def test_a_split_of_93_batches_trains_although_opacus_counts_92(tmp_path):
    # 1 / (1 / 93) is 92.99... in floating point, so Opacus's DP loader has 92 batches at the calibrated rate 1/93.
    teacher_site = make_site(tmp_path)
    splits = {"train": tabular_split(93, 5), "val": tabular_split(8, 6), "test": tabular_split(8, 7)}
    site = create_site(tmp_path / "odd", "odd", splits, teacher_site.teacher_path,
                       teacher_declaration=teacher_site.teacher_declaration)
    config = private_federation(batch_size=1, local_steps=3, rounds=1)
    update = train_round(site, instruction_for(config, 1), global_state(config))
    spend = PrivacyState.load(site.state_dir).spends[0]
    assert spend.sample_rate == sample_rate(93, 1) == 1 / 93 and spend.steps == 3
    assert 0 < update.privacy["epsilon-run"] < 4.0


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_a_bert_style_student_trains_under_dp_in_both_clipping_modes(tmp_path, mode):
    site = text_site(tmp_path)
    config = federation(student=TINY_BERT, target_epsilon=8.0, grad_sample_mode=mode, local_steps=3, batch_size=8)
    update = train_round(site, instruction_for(config, 1), global_state(config))
    assert update.steps == 3 and 0 < update.privacy["epsilon-run"] < 8.0
    assert all(np.all(np.isfinite(v)) for v in update.arrays.values())


def test_policy_files_are_validated_naming_the_field(tmp_path):
    (tmp_path / "policy.json").write_text(json.dumps({"schema_version": 1, "epsilon_per_run": -1}))
    with pytest.raises(ConfigError, match="epsilon_per_run"):
        SitePolicy.load(tmp_path)
    with pytest.raises(ConfigError, match="accountant"):
        SitePolicy(accountant="gdp")
    with pytest.raises(ConfigError, match="policy.json is missing"):
        SitePolicy.load(tmp_path / "nowhere")
    (tmp_path / "policy.json").write_text(json.dumps({"schema_version": 1, "epsilon_per_rnu": 1.0}))
    with pytest.raises(ConfigError, match="unknown field 'epsilon_per_rnu' \\(did you mean 'epsilon_per_run'\\?\\)"):
        SitePolicy.load(tmp_path)


def test_dp_and_hidden_alignment_are_refused_together():
    with pytest.raises(ConfigError, match="hidden_alignment_weight"):
        federation(target_epsilon=3.0, hidden_alignment_weight=0.5)


def test_site_noise_secret_is_private_and_stable(tmp_path):
    site = make_site(tmp_path)
    secret = site.noise_secret()
    assert len(secret) == 32 and Site.load(site.state_dir).noise_secret() == secret
    assert (site.state_dir / "noise.key").stat().st_mode & 0o077 == 0
