"""Continuing runs (`--from RUN_DIR`) and incremental rounds with an on-site replay buffer."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from client.replay import TRAINING_SETS_FILE, record_keys, teacher_entropy, training_set
from distill.data import SplitData
from protocols.accounting import PrivacyState, epsilon_of
from protocols.config import FederationConfig, StudentSpec
from protocols.errors import ConfigError, UpdateRejected
from protocols.ledger import read_events
from tests.test_cli_simulate import run_cli

MLP = StudentSpec("mlp", {"input_dim": 4, "hidden": [8], "num_classes": 2})
SECRET = b"s" * 32
# A small, plain-aggregation hospitals run: the first sees half of each site's persons, the second continues it.
BASE = ("simulate", "--scenario", "hospitals", "--sites", "3", "--rounds", "1", "--subsample", "0.25",
        "--local-steps", "10", "--seed", "4", "--stages", "federated", "--no-secure-aggregation", "--format", "json")


def records(n: int, seed: int = 0) -> SplitData:
    rng = np.random.default_rng(seed)
    return SplitData({"x": rng.normal(size=(n, 4)).astype(np.float32)}, rng.integers(0, 2, n))


def choose(state_dir: Path, run_id: str, mode: str, train: SplitData, trained: set[str], replay=None, logits=None):
    return training_set(state_dir, "site-a", run_id, mode, replay, train, SECRET, trained,
                        lambda: logits if logits is not None else np.zeros((len(train), 2)))


def test_an_incremental_run_trains_on_new_records_plus_the_teacher_hard_earlier_ones(tmp_path):
    early, late = records(40, 0), records(10, 1)
    first = choose(tmp_path, "run-1", "all", early, set())
    assert len(first.indices) == 40 and first.summary()["records"] == "all"
    both = SplitData({"x": np.concatenate([early.inputs["x"], late.inputs["x"]])},
                     np.concatenate([early.labels, late.labels]))
    # The teacher is unsure (entropy at its maximum) on the first 5 earlier records only.
    logits = np.tile([[4.0, -4.0]], (50, 1))
    logits[:5] = 0.0
    second = choose(tmp_path, "run-2", "new", both, {"run-1"}, replay=0.9, logits=logits)
    assert (second.new, second.replay) == (10, 5)
    assert sorted(second.indices.tolist()) == [0, 1, 2, 3, 4, *range(40, 50)]
    # Kept for the run's later rounds, even if the threshold's inputs changed.
    again = choose(tmp_path, "run-2", "new", both, {"run-1"}, replay=0.0, logits=np.zeros((50, 2)))
    assert again.indices.tolist() == second.indices.tolist()
    stored = json.loads((tmp_path / TRAINING_SETS_FILE).read_text())
    assert stored["schema_version"] == 1 and len(stored["runs"]["run-2"]["keys"]) == 15
    # Keyed digests only: no record value is in the file.
    assert str(float(early.inputs["x"][0, 0]))[:6] not in (tmp_path / TRAINING_SETS_FILE).read_text()


def test_a_run_the_site_never_trained_in_does_not_make_its_records_old(tmp_path):
    data = records(20)
    choose(tmp_path, "refused-run", "all", data, set())
    assert len(choose(tmp_path, "run-2", "new", data, set()).indices) == 20
    with pytest.raises(UpdateRejected, match="no training record is new"):
        choose(tmp_path, "run-3", "new", data, {"run-2"})


def test_records_that_vanish_mid_run_and_unknown_modes_are_refused(tmp_path):
    data = records(20)
    # Identical records are each chosen, and each found again on the run's later rounds.
    twice = SplitData({"x": np.concatenate([data.inputs["x"], data.inputs["x"][:2]])},
                      np.concatenate([data.labels, data.labels[:2]]))
    assert len(choose(tmp_path, "run-0", "all", twice, set()).indices) == 22
    assert len(choose(tmp_path, "run-0", "all", twice, set()).indices) == 22
    choose(tmp_path, "run-1", "all", data, set())
    with pytest.raises(UpdateRejected, match="data changed mid-run"):
        choose(tmp_path, "run-1", "all", data.subset(np.arange(10)), set())
    with pytest.raises(UpdateRejected, match="training records 'some'"):
        choose(tmp_path, "run-2", "some", data, set())


def test_record_keys_depend_on_the_secret_and_the_record():
    data = records(3)
    assert record_keys(data, SECRET) == record_keys(data, SECRET)
    assert record_keys(data, SECRET) != record_keys(data, b"t" * 32)
    assert len(set(record_keys(data, SECRET))) == 3
    assert teacher_entropy(np.array([[0.0, 0.0], [50.0, -50.0]])) == pytest.approx([1.0, 0.0], abs=1e-9)


@pytest.mark.parametrize("raw, message", [
    ({"curriculum": [{"where": "federated", "replay_min_entropy": 0.5}]}, "set 'records' to \"new\""),
    ({"curriculum": [{"where": "federated", "records": "latest"}]}, "'records'"),
    ({"curriculum": [{"where": "federated", "records": "new", "replay_min_entropy": 2}]}, "replay_min_entropy"),
    ({"continues": {"run_id": "r"}}, "continues"),
    ({"continues": {"run_id": "r", "config_hash": "h", "student_digest": "d", "ledger_head": "l"},
      "curriculum": [{"where": "coordinator", "steps": 1, "batch_size": 1, "learning_rate": 0.1},
                     {"where": "federated"}]}, "no coordinator stage"),
])
def test_continuation_and_incremental_fields_are_validated(raw, message):
    with pytest.raises(ConfigError, match=message):
        FederationConfig.from_dict({"student": MLP, **raw})


def test_a_federated_stage_without_incremental_fields_keeps_its_hash():
    stage = FederationConfig.from_dict({"student": MLP, "curriculum": [{"where": "federated", "fragments": []}]})
    assert stage.to_dict()["curriculum"] == [{"where": "federated", "fragments": []}]
    assert "continues" not in stage.to_dict()


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    first = run_cli(*BASE, "--data-share", "0.5", "--out", str(out), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    first_dir = Path(json.loads(first.stdout)["paths"]["run_dir"])
    second = run_cli(*BASE, "--from", str(first_dir), "--incremental", "--replay-min-entropy", "0.8", "--keep-best",
                     "--out", str(out), timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    return first_dir, json.loads(first.stdout), json.loads(second.stdout)


@pytest.mark.slow
def test_a_continuing_run_starts_from_the_verified_student_and_the_budgets_compose(continued):
    first_dir, first, second = continued
    second_dir = Path(second["paths"]["run_dir"])
    config = json.loads((second_dir / "config.json").read_text())["federation"]
    finished = [e for e in read_events(first_dir / "ledger.jsonl") if e["kind"] == "run-finished"][-1]["payload"]
    assert config["continues"]["run_id"] == first["run_id"]
    assert config["continues"]["student_digest"] == finished["student_digest"]
    for name, site in second["privacy"]["sites"].items():
        state = PrivacyState.load(second_dir / "sites" / name)
        assert site["runs_in_account"] == 2 and len({s.run_id for s in state.spends}) == 2
        # The lifetime epsilon composes both runs' spends, as the site's own account recomputes it.
        assert site["epsilon_lifetime"] == pytest.approx(epsilon_of(state.spends, site["delta"], site["accountant"]),
                                                         rel=1e-6)
        assert site["epsilon_lifetime"] > max(site["epsilon"], first["privacy"]["sites"][name]["epsilon"])
        # Half the persons arrived after the first run: those records are new, and the replay buffer is earlier ones.
        chosen = site["training_set"]
        assert chosen["records"] == "new" and chosen["new"] > 0
        assert chosen["trained_on"] == chosen["new"] + chosen["replay"]
        accepted = [e["payload"] for e in read_events(second_dir / "sites" / name / "ledger.jsonl")
                    if e["kind"] == "run-accepted" and e["payload"]["run_id"] == second["run_id"]]
        assert accepted[0]["training_set"]["new_records"] == chosen["new"]
        # The calibration counts the chosen set's units: its records, or in a person-level run the persons they
        # belong to (fewer where a person has several).
        calibration = accepted[0]["calibration"]
        assert site["unit"] == calibration["unit"] and site["units"] == calibration["records"]
        if calibration["unit"] == "person":
            assert 0 < calibration["records"] <= chosen["trained_on"]
        else:
            assert calibration["records"] == chosen["trained_on"]


@pytest.mark.slow
def test_verify_and_report_cover_the_continuation(continued, tmp_path):
    first_dir, _, second = continued
    second_dir = Path(second["paths"]["run_dir"])
    verified = run_cli("verify", str(second_dir), "--format", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checks = json.loads(verified.stdout)["checks"]
    assert any(f"continues run {continued[1]['run_id']}" in check and "holds the recorded head" in check
               for check in checks)
    # The continuing run also kept its best round (of the start and its one round), as the sites' reports decide.
    assert second["kept_round"] in (0, 1) and set(second["validation_by_round"]) == {"0", "1"}
    assert any(check.startswith(f"keep-best: round {second['kept_round']}") for check in checks)
    assert any("match what each site's own ledger" in check for check in checks)
    if second["kept_round"] == 0:
        # The kept student is the start, the first run's student, on the same test splits: the same score.
        assert second["comparison"]["federated"] == pytest.approx(continued[1]["comparison"]["federated"], abs=1e-9)
    report = run_cli("report", str(second_dir), "--format", "json")
    assert report.returncode == 0, report.stderr[-2000:]
    card = json.loads((second_dir / "report" / "report.json").read_text())
    federated = next(s for s in card["model_card"]["distillation"]["stages"] if s["stage"] == "federated")
    assert continued[1]["run_id"] in federated["starts_from"] and "replay buffer" in federated["data"]
    # The earlier run's history rewritten after the fact: the continuing run no longer verifies.
    copy = tmp_path / "runs"
    shutil.copytree(first_dir.parent, copy)
    ledger = copy / first_dir.name / "ledger.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    tampered = run_cli("verify", str(copy / second_dir.name))
    assert tampered.returncode != 0 and "no longer holds the head" in tampered.stdout + tampered.stderr
    # The starting student swapped: refused as well.
    start = copy / second_dir.name / "stages" / "start" / "model.safetensors"
    save_file({name: value + 1.0 for name, value in load_file(str(start)).items()}, str(start))
    swapped = run_cli("verify", str(copy / second_dir.name))
    assert swapped.returncode != 0 and "starting student" in swapped.stdout + swapped.stderr


@pytest.mark.slow
def test_from_a_run_that_does_not_verify_is_refused_before_anything_runs(continued, tmp_path):
    first_dir = continued[0]
    broken = tmp_path / first_dir.name
    shutil.copytree(first_dir, broken)
    (broken / "student" / "model.safetensors").write_bytes(b"not a student")
    out = tmp_path / "out"
    result = run_cli(*BASE, "--from", str(broken), "--out", str(out))
    assert result.returncode == 2 and "does not verify" in result.stdout + result.stderr
    assert not out.exists() or not any(out.iterdir())
    missing = run_cli(*BASE, "--from", str(tmp_path / "nowhere"), "--out", str(out))
    assert missing.returncode == 2 and "no run ledger" in missing.stdout + missing.stderr
    other = run_cli(*BASE[:4], "2", *BASE[5:], "--from", str(first_dir), "--out", str(out))
    assert other.returncode == 2 and "same --scenario, --sites" in other.stdout + other.stderr
