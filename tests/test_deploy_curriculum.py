"""A curriculum's coordinator stage in deployment: run.toml's [coordinator_stage] (the public records and the public
teacher on the coordinator machine), the stage `fedistill run` runs before submitting, the ServerApp that starts the
rounds from it (and again on resume), and one run through real processes: coordinator stage, a federated round,
the site-local stage, then `fedistill verify` and `fedistill report`.
"""

from __future__ import annotations

import json
import pickle
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression

from client.records import RecordSchema, load_records
from coordinator.launch import APP_PYPROJECT, CoordinatorStageFile, RunFile, prepare_coordinator_stage
from protocols.canonical import digest_arrays
from protocols.errors import ConfigError, DataError, LedgerTampered
from tests.deployment import FEATURES, Processes, fedistill, free_port, make_site, records_table

CURRICULUM = """curriculum = [
  {where = "coordinator", steps = 60, batch_size = 64, optimizer = "adam", learning_rate = 0.01, synthetic_records = 400},
  {where = "federated"},
  {where = "site-local", steps = 4, batch_size = 16, learning_rate = 0.05},
]
"""
MLP = '[federation.student]\nfamily = "mlp"\nsettings = { input_dim = 5, hidden = [16], num_classes = 2 }\n'
CAUSAL_LM = ('[federation.student]\nfamily = "causal_lm"\n\n[federation.student.settings]\nbase = "base-student"\n'
             f'base_digest = "{"0" * 64}"\ntop_k = 8\ntemperatures = [2.0]\nmax_length = 8\n')
TABLE = f"""[coordinator_stage]
records = "public.csv"
label = "outcome"
classes = ["negative", "positive"]
features = {json.dumps(FEATURES)}
person_id = "patient"
teacher = "public-teacher.pkl"
"""
RUN = """schema_version = 1
coordinator = "coordinator"
out_dir = "runs"
wait_for_sites = 3
timeout_minutes = 12

[federation]
rounds = 1
local_steps = 2
batch_size = 32
learning_rate = 0.03
target_epsilon = 6.0
max_grad_norm = 0.5
secure_aggregation = false
{curriculum}
{student}
{table}"""


def run_toml(curriculum: str = CURRICULUM, student: str = MLP, table: str = TABLE) -> str:
    return RUN.format(curriculum=curriculum, student=student, table=table)


def write_public(root: Path) -> None:
    """The coordinator's public records and a public teacher fitted on them (what the sites' teacher learnt from)."""
    public = records_table(600, 99)
    public.to_csv(root / "public.csv", index=False)
    teacher = LogisticRegression().fit(public[FEATURES].to_numpy(), public["outcome"] == "positive")
    (root / "public-teacher.pkl").write_bytes(pickle.dumps(teacher))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from coordinator.operator import init_coordinator

    root = tmp_path_factory.mktemp("deploy").resolve()
    init_coordinator(root / "coordinator", ["127.0.0.1"], 9558)
    write_public(root)
    return root


def load(root: Path, text: str) -> RunFile:
    (root / "run.toml").write_text(text)
    return RunFile.load(root / "run.toml")


def read_with_sites_reader(table: CoordinatorStageFile):
    return load_records(table.records, RecordSchema(table.label, table.classes, table.features, table.person_id))


# --------------------------------------------------------------------------------------------- run.toml
def test_the_table_is_read_relative_to_run_toml_and_travels_in_the_run_config(root: Path) -> None:
    run = load(root, run_toml())
    table = run.coordinator_stage
    assert table == CoordinatorStageFile(root / "public.csv", "outcome", ("negative", "positive"), tuple(FEATURES),
                                         "patient", root / "public-teacher.pkl")
    # Keyed by the configuration, not by a Flower run id (there is none before submitting).
    assert run.stage_dir == root / "coordinator" / "stages" / run.federation.config_hash()[:16]
    config = run.run_config(None, run.stage_dir)
    assert config["coordinator-stage"] == str(run.stage_dir) and run.run_config("7")["coordinator-stage"] == ""
    # Every key fedistill run overrides has a default in the FAB's pyproject.toml, as Flower requires.
    assert set(config) <= set(tomllib.loads(APP_PYPROJECT)["tool"]["flwr"]["app"]["config"])
    # No coordinator stage, no table: the run config key stays empty.
    plain = load(root, run_toml(curriculum="", table=""))
    assert plain.coordinator_stage is None and plain.run_config(None)["coordinator-stage"] == ""


def _replace(old: str, new: str) -> str:
    assert old in TABLE, old
    return run_toml(table=TABLE.replace(old, new))


@pytest.mark.parametrize(("text", "named"), [
    (run_toml(curriculum=""), ["[coordinator_stage]", "curriculum has no coordinator stage"]),
    (run_toml(table=""), ["[federation] curriculum names a coordinator stage", "[coordinator_stage] is missing"]),
    (run_toml(curriculum="", student=CAUSAL_LM), ["[coordinator_stage]", "causal-LM", "base-student ... --public"]),
    (_replace('features = ["f0", ', 'features = ['), ["[coordinator_stage]", "features lists 4", "input_dim is 5"]),
    (_replace('classes = ["negative", "positive"]', 'classes = ["negative", "positive", "unsure"]'),
     ["[coordinator_stage]", "classes lists 3", "num_classes is 2"]),
    (_replace('"public.csv"', '"nowhere.csv"'), ["[coordinator_stage]", "records", "nowhere.csv", "is not a file"]),
    (_replace('"public-teacher.pkl"', '"no-teacher.pkl"'), ["[coordinator_stage]", "teacher", "no-teacher.pkl",
                                                            "does not exist"]),
    (_replace('label = "outcome"', 'labl = "outcome"'), ["[coordinator_stage]", "'labl'", "did you mean 'label'"]),
    (_replace('label = "outcome"\n', ""), ["[coordinator_stage]", "field 'label' must be set"]),
    (_replace('person_id = "patient"', "person_id = 3"), ["[coordinator_stage]", "person_id must be a column name"]),
    (run_toml().replace("[coordinator_stage]", "[coordinator_stages]"),
     ["unknown field 'coordinator_stages'", "did you mean 'coordinator_stage'"]),
])
def test_run_toml_refuses_an_inconsistent_coordinator_stage_naming_the_field(root: Path, text: str,
                                                                             named: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        load(root, text)
    message = str(refused.value)
    assert str(root / "run.toml") in message
    for part in named:
        assert part in message, message


def test_a_logits_file_teacher_is_refused(root: Path) -> None:
    (root / "logits.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"\[coordinator_stage\]: teacher .*logits.npz' is a logits file"):
        load(root, _replace('"public-teacher.pkl"', '"logits.npz"'))


def test_fedistill_run_refuses_before_submitting(root: Path) -> None:
    (root / "run.toml").write_text(run_toml(table=""))
    done = fedistill("run", "run.toml", cwd=root)
    assert done.returncode == 1 and "[coordinator_stage] is missing" in done.stderr.replace("\n", " ")
    assert not (root / "coordinator" / "app-run-config.toml").exists()  # nothing was handed to Flower


# --------------------------------------------------------------------------------------------- the stage
def _context(run: RunFile, run_id: int, resume: str | None, stage: Path | None) -> Context:
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                   run_config=run.run_config(resume, stage))


def test_the_stage_runs_on_public_records_and_the_server_app_starts_from_it_and_resumes(root: Path) -> None:
    from coordinator.app import coordinator_from_run_config
    from distill.models import teacher_digest

    run = load(root, run_toml())
    stage = prepare_coordinator_stage(run, read_with_sites_reader)
    record = json.loads((stage.directory / "record.json").read_text())
    assert record["schema_version"] == 1 and record["site_records_read"] == 0 and record["epsilon"] == 0.0
    assert record["teacher_digest"] == teacher_digest(root / "public-teacher.pkl")
    # The held-out persons' records are not trained on.
    assert stage.records == record["public_records"] and stage.records + stage.held_out == 600 and stage.held_out > 0
    assert (stage.steps, stage.synthetic_records) == (60, 400) and stage.student_digest == record["student_digest"]
    manifest = json.loads((stage.directory / "student" / "checkpoint.json").read_text())
    assert (manifest["stage"], manifest["student_digest"]) == ("coordinator", record["student_digest"])

    coordinator, min_sites = coordinator_from_run_config(_context(run, 41, None, stage.directory))
    run_dir = run.out_dir / "41"
    kept = run_dir / "stages" / "coordinator" / "model.safetensors"
    assert min_sites == 3 and digest_arrays(coordinator.state) == record["student_digest"]
    assert digest_arrays(load_file(str(kept))) == record["student_digest"]  # where fedistill verify hashes it
    assert coordinator.ledger.head[0] == 1  # run-started, and the checkpoint that signs it
    events = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert events[0]["payload"]["coordinator_stage"] == record

    # Resume: the run directory's copy again, checked against the signed record (no round was checkpointed yet).
    resumed, _ = coordinator_from_run_config(_context(run, 42, "41", None))
    assert resumed.completed_round == 0 and digest_arrays(resumed.state) == record["student_digest"]
    state = load_file(str(kept))
    state[next(iter(state))] += 1.0
    save_file(state, str(kept))
    with pytest.raises(LedgerTampered, match="digest mismatch"):
        coordinator_from_run_config(_context(run, 43, "41", None))


def test_the_server_app_refuses_a_stage_missing_or_made_for_another_configuration(root: Path) -> None:
    from coordinator.app import coordinator_from_run_config

    run = load(root, run_toml())
    with pytest.raises(ConfigError, match="'coordinator-stage' is empty"):
        coordinator_from_run_config(_context(run, 51, None, None))
    other = load(root, run_toml().replace("rounds = 1", "rounds = 2"))
    made = prepare_coordinator_stage(other, read_with_sites_reader)
    with pytest.raises(ConfigError, match="made for configuration"):
        coordinator_from_run_config(_context(run, 52, None, made.directory))


def test_a_records_problem_names_run_toml_and_the_column(root: Path) -> None:
    run = load(root, _replace('label = "outcome"', 'label = "result"'))
    with pytest.raises(DataError, match=r"run.toml \[coordinator_stage\]: .*no column\(s\) 'result'"):
        prepare_coordinator_stage(run, read_with_sites_reader)


# --------------------------------------------------------------------------------------------- end to end
SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    """One deployed run through the CLI with real processes over TLS: three sites, the run.toml above (coordinator
    stage, one plain-aggregation round, site-local stage); every process is stopped when the module's tests end."""
    root = tmp_path_factory.mktemp("deployed").resolve()
    port = free_port()
    done = fedistill("coordinator", "init", "coordinator", "--host", "127.0.0.1", "--port", str(port), cwd=root)
    assert done.returncode == 0, done.stderr
    address = f"127.0.0.1:{port}"
    site_files = {name: make_site(root, name, root / "coordinator", address, seed, free_port())
                  for seed, name in enumerate(SITES)}
    for name in SITES:
        done = fedistill("coordinator", "add-site", name, str(root / name / "node_key.pub"), "--dir", "coordinator",
                         cwd=root)
        assert done.returncode == 0, done.stderr
    write_public(root)
    (root / "run.toml").write_text(run_toml())
    processes = Processes(root / "logs")
    try:
        processes.start("coordinator", "coordinator", "start", "coordinator", cwd=root)
        processes.wait_for_log("coordinator", "coordinator ready", timeout=90)
        for name, site_file in site_files.items():
            processes.start(name, "site", "start", str(site_file), cwd=root)
            processes.wait_for_log(name, "connects to", timeout=60)
        launched = fedistill("run", "run.toml", "--format", "json", cwd=root, timeout=720)
        assert launched.returncode == 0, launched.stderr + processes.log("coordinator")
        outcome = json.loads(launched.stdout)
        run_dir = Path(outcome["run_dir"])
        # The auditor gathers each site's evidence (never its records), as docs/deploy.md tells.
        for name, site_file in site_files.items():
            done = fedistill("site", "evidence", str(site_file.parent / "state"), str(run_dir / "sites" / name),
                             cwd=root)
            assert done.returncode == 0, done.stderr
        yield {"root": root, "launched": launched, "outcome": outcome, "run_dir": run_dir, "sites": site_files}
    finally:
        processes.stop_all()


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_three_stage_curriculum_runs_deployed_verifies_and_reports(deployed: dict) -> None:
    root, launched, run_dir = deployed["root"], deployed["launched"], deployed["run_dir"]
    assert "coordinator stage ran:" in launched.stderr and "no site record read" in launched.stderr
    assert deployed["outcome"]["status"] == "finished:completed"

    events = _events(run_dir / "ledger.jsonl")
    assert [e["kind"] for e in events if e["kind"] != "checkpoint"] == ["run-started", "round", "site-evaluation",
                                                                          "site-local-stage", "run-finished"]
    record = events[0]["payload"]["coordinator_stage"]
    assert record["site_records_read"] == 0 and record["epsilon"] == 0 and record["settings"]["where"] == "coordinator"
    kept = run_dir / "stages" / "coordinator" / "model.safetensors"
    assert digest_arrays(load_file(str(kept))) == record["student_digest"]
    rounds = _events(run_dir / "metrics.jsonl")
    assert [(r["status"], r["aggregation"], r["participants"]) for r in rounds] == [
        ("aggregated", "plain", sorted(SITES))]

    verified = fedistill("verify", str(run_dir), "--format", "json", cwd=root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checks = json.loads(verified.stdout)["checks"]
    assert any(c.startswith("coordinator stage: ") and "no site record, epsilon 0" in c for c in checks), checks
    assert any(c.startswith("site-local stage: ") for c in checks), checks

    reported = fedistill("report", str(run_dir), "--format", "json,html", "--signing-key",
                         str(root / "coordinator" / "coordinator_key.pem"), cwd=root)
    assert reported.returncode == 0, reported.stderr
    report = json.loads((run_dir / "report" / "report.json").read_text())
    stages = report["model_card"]["distillation"]["stages"]
    assert [s["stage"] for s in stages] == ["coordinator", "federated", "site-local"]
    assert stages[1]["starts_from"] == "the coordinator stage's student"
    assert (run_dir / "report" / "report.html").is_file()


@pytest.mark.slow
def test_every_deployed_site_runs_its_site_local_stage(deployed: dict) -> None:
    run_dir = deployed["run_dir"]
    local = [e["payload"] for e in _events(run_dir / "ledger.jsonl") if e["kind"] == "site-local-stage"][-1]
    assert local["failures"] == {} and sorted(local["sites"]) == sorted(SITES), local["failures"]
    for name in SITES:
        own = [e["payload"] for e in _events(run_dir / "sites" / name / "ledger.jsonl")
               if e["kind"] == "site-local-stage"]
        # A deployed classification site trains on its whole table: it keeps its copy, with nothing to score on.
        assert own and own[-1]["metrics"]["local_student"]["n"] == 0
        kept = deployed["sites"][name].parent / "state" / own[-1]["kept_at"] / "model.safetensors"
        assert digest_arrays(load_file(str(kept))) == own[-1]["local_student_digest"]


@pytest.mark.slow
def test_a_deployed_run_continues_a_verified_run_and_the_sites_budgets_compose(deployed: dict) -> None:
    """`fedistill run --from RUN_DIR` against the same coordinator and sites: the earlier run verifies first, the new
    one starts from its final student, and each site's lifetime account holds both runs."""
    root, first = deployed["root"], deployed["run_dir"]
    incremental = 'curriculum = [{where = "federated", records = "new", replay_min_entropy = 0.5}]\n'
    (root / "run2.toml").write_text(run_toml(curriculum="", table=""))
    launched = fedistill("run", "run2.toml", "--from", str(first), "--format", "json", cwd=root, timeout=720)
    assert launched.returncode == 0, launched.stderr
    assert "continuing run" in launched.stderr and "it verifies" in launched.stderr
    run_dir = Path(json.loads(launched.stdout)["run_dir"])
    config = json.loads((run_dir / "config.json").read_text())["federation"]
    finished = [e for e in _events(first / "ledger.jsonl") if e["kind"] == "run-finished"][-1]["payload"]
    assert config["continues"]["student_digest"] == finished["student_digest"]
    kept = run_dir / "stages" / "start" / "model.safetensors"
    assert digest_arrays(load_file(str(kept))) == finished["student_digest"]
    for name, site_file in deployed["sites"].items():
        privacy = json.loads((site_file.parent / "state" / "privacy.json").read_text())
        assert {s["run_id"] for s in privacy["spends"]} == {finished["run_id"], run_dir.name}
        done = fedistill("site", "evidence", str(site_file.parent / "state"), str(run_dir / "sites" / name), cwd=root)
        assert done.returncode == 0, done.stderr
    verified = fedistill("verify", str(run_dir), "--format", "json", cwd=root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert any(c.startswith(f"continues run {finished['run_id']}") and "holds the recorded head" in c
               for c in json.loads(verified.stdout)["checks"])
    # An incremental run: the sites have no new record since, so each fails the round by name and spends nothing.
    (root / "run3.toml").write_text(run_toml(curriculum=incremental, table=""))
    again = fedistill("run", "run3.toml", "--from", str(run_dir), "--format", "json", cwd=root, timeout=720)
    third = Path(json.loads(again.stdout)["run_dir"])
    rounds = _events(third / "metrics.jsonl")
    assert rounds[0]["status"] == "stopped" and all("no training record is new" in reason
                                                    for reason in rounds[0]["failures"].values()), rounds[0]
    for site_file in deployed["sites"].values():
        privacy = json.loads((site_file.parent / "state" / "privacy.json").read_text())
        assert third.name not in {s["run_id"] for s in privacy["spends"]}
