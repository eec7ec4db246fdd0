"""The run curriculum: stages validated at the boundary, the coordinator stage on public records, and the
public-only baseline, end to end through the CLI with verify and report."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression

from client.local_stage import run_site_local_stage
from coordinator.curriculum import mixup_records, run_coordinator_stage, split_public
from coordinator.rounds import Coordinator
from distill.data import SplitData
from distill.models import SklearnTeacher, build_student, student_state
from distill.train import predict_proba
from protocols.config import FederationConfig, StudentSpec
from protocols.curriculum import Stage, parse_curriculum
from protocols.canonical import digest_arrays
from protocols.errors import ConfigError, LedgerTampered, UpdateRejected
from protocols.ledger import ledger_in, read_events
from protocols.messages import LocalStageRequest
from tests.helpers import federation, make_site
from tests.test_cli_simulate import run_cli

MLP = StudentSpec("mlp", {"input_dim": 4, "hidden": [8], "num_classes": 2})
LOCAL = {"where": "site-local", "steps": 20, "batch_size": 16, "learning_rate": 0.05}
COORDINATOR = {"where": "coordinator", "steps": 300, "batch_size": 64, "optimizer": "adam", "learning_rate": 0.01,
               "alpha": 0.0, "synthetic_records": 2000}


@pytest.mark.parametrize("stages, message", [
    ([{"where": "site-local", "steps": 1, "batch_size": 1, "learning_rate": 0.1}, {"where": "federated"}],
     "in that order"),
    ([COORDINATOR], "exactly one federated stage"),
    ([{"where": "federated", "rounds": 3}], "rounds"),
    ([{"where": "coordinator", "steps": 0, "batch_size": 1, "learning_rate": 0.1}, {"where": "federated"}],
     "'steps'"),
    ([{"where": "coordinator", "steps": 1, "batch_size": 1, "learning_rate": 0.1, "synthetic": 3},
      {"where": "federated"}], "synthetic"),
    ([{"where": "public", "steps": 1}, {"where": "federated"}], "'where'"),
])
def test_a_malformed_curriculum_names_the_stage_and_field(stages, message):
    with pytest.raises(ConfigError, match=message):
        FederationConfig.from_dict({"student": MLP, "curriculum": stages})


def test_stages_that_a_student_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="synthetic_records"):
        parse_curriculum([COORDINATOR, {"where": "federated"}], "bert")
    with pytest.raises(ConfigError, match="base-student"):
        parse_curriculum([COORDINATOR | {"synthetic_records": 0}, {"where": "federated"}], "causal_lm")


def test_a_curriculum_is_part_of_the_config_hash_and_a_single_stage_config_is_unchanged():
    single = FederationConfig.from_dict({"student": MLP})
    assert "curriculum" not in single.to_dict()
    staged = FederationConfig.from_dict({"student": MLP, "curriculum": [COORDINATOR, {"where": "federated"}]})
    assert staged.config_hash() != single.config_hash()
    assert FederationConfig.from_dict(staged.to_dict()) == staged
    assert staged.curriculum[0] == Stage.from_dict(COORDINATOR, "here")


def _public_problem(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.5).astype(np.int64)
    return SplitData({"x": x}, y, np.arange(n)), SklearnTeacher(LogisticRegression().fit(x, y))


def test_the_coordinator_stage_distils_on_public_records_only_and_records_it():
    public, teacher = _public_problem()
    transfer, holdout = split_public(public, seed=0)
    assert not set(transfer.groups) & set(holdout.groups) and len(holdout) == pytest.approx(0.2 * len(public), abs=2)
    stage = Stage.from_dict(COORDINATOR, "test")
    result = run_coordinator_stage(MLP, transfer, teacher, "t" * 64, stage, seed=0)
    record = result.record
    assert record["site_records_read"] == 0 and record["epsilon"] == 0.0
    assert record["public_records"] == len(transfer) and record["synthetic_records"] == 2000
    assert record["public_digest"] == transfer.digest() and record["settings"] == stage.to_dict()
    # The distilled student agrees with its teacher on held-out public records far better than a fresh one.
    torch.manual_seed(0)
    fresh = build_student(MLP)
    teacher_labels = teacher.logits(holdout.inputs).argmax(axis=1)

    def agreement(model):
        return float((predict_proba(model, "mlp", holdout).argmax(axis=1) == teacher_labels).mean())

    assert agreement(result.model) > 0.9 > agreement(fresh)


def test_mixup_records_lie_between_two_public_records():
    x = np.array([[0.0, 0.0], [1.0, 2.0]], dtype=np.float32)
    mixed = mixup_records(x, 500, seed=1)
    assert mixed.shape == (500, 2) and np.allclose(mixed[:, 1], 2 * mixed[:, 0], atol=1e-6)
    assert mixed.min() >= 0.0 and mixed[:, 0].max() <= 1.0


def test_a_stage_trains_only_its_fragments():
    public, teacher = _public_problem(400)
    stage = Stage.from_dict(COORDINATOR | {"fragments": ["layers.2"], "steps": 50}, "test")
    torch.manual_seed(0)
    before = student_state(build_student(MLP), "mlp")
    after = run_coordinator_stage(MLP, public, teacher, "t" * 64, stage, seed=0).state
    assert np.array_equal(before["layers.0.weight"], after["layers.0.weight"])
    assert not np.array_equal(before["layers.2.weight"], after["layers.2.weight"])
    with pytest.raises(ConfigError, match="layers.9"):
        run_coordinator_stage(MLP, public, teacher, "t" * 64, Stage.from_dict(COORDINATOR | {"fragments": ["layers.9"]},
                                                                               "test"), seed=0)


def test_the_coordinator_refuses_a_start_that_is_not_the_recorded_one(tmp_path):
    public, teacher = _public_problem(300)
    config = FederationConfig.from_dict({"student": MLP, "curriculum": [COORDINATOR, {"where": "federated"}]})
    result = run_coordinator_stage(MLP, public, teacher, "t" * 64, config.curriculum[0], seed=0)
    started = Coordinator(config, "run", tmp_path / "a", coordinator_stage=result.record, initial_state=result.state)
    assert started.state["layers.0.weight"].tobytes() == result.state["layers.0.weight"].tobytes()
    swapped = {k: v + 1.0 for k, v in result.state.items()}
    with pytest.raises(LedgerTampered, match="digest"):
        Coordinator(config, "run", tmp_path / "b", coordinator_stage=result.record, initial_state=swapped)
    with pytest.raises(ConfigError, match="layers.7"):
        Coordinator(FederationConfig.from_dict({"student": MLP, "curriculum": [
            {"where": "federated", "fragments": ["layers.7"]}]}), "run", tmp_path / "c")


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = run_cli("simulate", "--scenario", "hospitals", "--stages", "coordinator,federated,site-local", "--sites",
                     "3", "--rounds", "2", "--subsample", "0.25", "--local-steps", "10", "--epsilon", "3", "--seed", "1",
                     "--format", "json", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_hospitals_runs_its_three_stages(staged_run):
    summary = staged_run
    run_dir = Path(summary["paths"]["run_dir"])
    federation = json.loads((run_dir / "config.json").read_text())["federation"]
    assert [s["where"] for s in federation["curriculum"]] == ["coordinator", "federated", "site-local"]
    stages = {s["stage"]: s for s in summary["stages"]}
    coordinator = stages["coordinator"]
    assert coordinator["record"]["site_records_read"] == 0 and coordinator["record"]["synthetic_records"] == 50_000
    # The public stage alone already beats the budget-matched public-only student by a wide margin.
    assert coordinator["evaluation"]["roc_auc"] > summary["comparison"]["public_only"] + 0.03
    assert stages["federated"]["evaluation"]["roc_auc"] == summary["comparison"]["federated"]
    assert 0.5 < stages["federated"]["public_holdout"]["roc_auc"] <= 1.0
    assert summary["comparison"]["federated_minus_public_only"] == pytest.approx(
        summary["comparison"]["federated"] - summary["comparison"]["public_only"])
    events = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["kind"] == "run-started")
    assert started["payload"]["coordinator_stage"] == coordinator["record"]
    # Site-local: every site kept its own copy and released only metrics, which the coordinator signed.
    local = stages["site-local"]
    assert set(local["released"]) == set(summary["sites"]) and local["failures"] == {} and local["rejected"] == {}
    for site, released in local["released"].items():
        assert released["released"] and set(released) == {"released", "federated_student", "local_student"}
        assert 0.0 <= released["local_student"]["accuracy"] <= 1.0 and released["local_student"]["n"] > 0
        assert (run_dir / "sites" / site / "site-local" / summary["run_id"] / "model.safetensors").is_file()
    assert 0.5 < local["evaluation"]["roc_auc"] <= 1.0
    kinds = [e["kind"] for e in events]
    assert kinds.index("site-local-stage") < kinds.index("run-finished")
    # What left each site in that stage: a reply that carries no tensor.
    transfers = [json.loads(line)["payload"] for line in
                 (run_dir / "sites" / next(iter(summary["sites"])) / "ledger.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "transfer"]
    assert any(t["message_type"] == "evaluate" for t in transfers)


@pytest.mark.slow
def test_verify_and_report_cover_the_coordinator_stage(staged_run, tmp_path):
    run_dir = Path(staged_run["paths"]["run_dir"])
    verified = run_cli("verify", str(run_dir), "--format", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert any("coordinator stage" in check for check in json.loads(verified.stdout)["checks"])
    reported = run_cli("report", str(run_dir), "--format", "html,json")
    assert reported.returncode == 0, reported.stderr
    report = json.loads((run_dir / "report" / "report.json").read_text())
    stages = report["model_card"]["distillation"]["stages"]
    assert [s["stage"] for s in stages] == ["coordinator", "federated", "site-local"]
    assert stages[0]["epsilon"] == 0.0 and stages[0]["site_records_read"] == 0
    assert stages[2]["withheld_by"] == [] and len(stages[2]["released_by"]) == 3
    assert any("site-local stage" in check for check in json.loads(verified.stdout)["checks"])
    labels = [row["model"] for row in report["evaluation"]["overall"]]
    assert any(label.startswith("public-only student") for label in labels)
    # A swapped starting student is caught.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    weights = copy / "stages" / "coordinator" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v + 1.0 for k, v in tensors.items()}, str(weights))
    tampered = run_cli("verify", str(copy))
    assert tampered.returncode != 0 and "coordinator stage" in tampered.stdout + tampered.stderr
    # So is a site's swapped local copy.
    shutil.copy(run_dir / "stages" / "coordinator" / "model.safetensors", weights)
    site = next(iter(staged_run["sites"]))
    local = copy / "sites" / site / "site-local" / staged_run["run_id"] / "model.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(str(local)).items()}, str(local))
    tampered = run_cli("verify", str(copy))
    assert tampered.returncode != 0 and "local student" in tampered.stdout + tampered.stderr


def test_a_site_fine_tunes_locally_only_for_a_run_it_accepted_and_withholds_by_default(tmp_path):
    site = make_site(tmp_path)
    config = federation(curriculum=[{"where": "federated"}, LOCAL])
    model = build_student(config.student)
    state = student_state(model, "mlp")
    request = LocalStageRequest("run-1", config.config_hash(), config.student, config.curriculum[1],
                                digest_arrays(state), 2, 0, "n" * 32)
    assert LocalStageRequest.from_config(request.to_config()) == request
    with pytest.raises(UpdateRejected, match="never accepted"):
        run_site_local_stage(site, request, state)
    ledger_in(site.state_dir, site.name).append("run-accepted", {"run_id": "run-1",
                                                                 "config_hash": config.config_hash()})
    with pytest.raises(UpdateRejected, match="does not hash"):
        run_site_local_stage(site, request, {k: v + 1 for k, v in state.items()})
    outcome = run_site_local_stage(site, request, state)
    # The default policy releases nothing; the site's own ledger keeps the metrics, the copy stays on site.
    assert outcome == {"released": False, "metrics": None}
    event = [e for e in read_events(site.state_dir / "ledger.jsonl") if e["kind"] == "site-local-stage"][-1]
    assert event["payload"]["released"] is False and "local_student" in event["payload"]["metrics"]
    kept = site.state_dir / "site-local" / "run-1" / "model.safetensors"
    assert digest_arrays(load_file(str(kept))) == event["payload"]["local_student_digest"] != request.student_digest


def test_an_unknown_stage_is_refused_naming_the_ones_offered(tmp_path):
    unknown = run_cli("simulate", "--scenario", "hospitals", "--stages", "coordinator,federated,local",
                      "--out", str(tmp_path))
    assert unknown.returncode == 2 and "no local stage" in unknown.stderr and "site-local" in unknown.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_site_local_stage_can_isolate_other_parameters_at_each_site(tmp_path):
    site = make_site(tmp_path, "site-a")
    stage = LOCAL | {"fragments": [], "site_fragments": {"site-a": ["layers.2"]}}
    config = federation(curriculum=[{"where": "federated"}, stage])
    local = config.curriculum[1]
    assert local.fragments_at("site-a") == ("layers.2",) and local.fragments_at("site-b") == ()
    assert FederationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="site_fragments"):
        federation(curriculum=[{"where": "federated"}, LOCAL | {"site_fragments": ["layers.2"]}])
    with pytest.raises(ConfigError, match="layers.9"):
        Coordinator(federation(curriculum=[{"where": "federated"},
                                           LOCAL | {"site_fragments": {"site-a": ["layers.9"]}}]), "r", tmp_path / "r")
    state = student_state(build_student(config.student), "mlp")
    ledger_in(site.state_dir, site.name).append("run-accepted", {"run_id": "run-1",
                                                                 "config_hash": config.config_hash()})
    run_site_local_stage(site, LocalStageRequest("run-1", config.config_hash(), config.student, local,
                                                 digest_arrays(state), 2, 0, "n" * 32), state)
    kept = load_file(str(site.state_dir / "site-local" / "run-1" / "model.safetensors"))
    # Only site-a's own fragment moved; every other parameter is the federated student's.
    changed = {name for name in state if not np.array_equal(kept[name], state[name])}
    assert changed and all(name.startswith("layers.2") for name in changed)
