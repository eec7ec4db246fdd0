"""Deployment end to end with real processes on 127.0.0.1: a TLS coordinator with SuperNode authentication,
three sites from their own site.toml and CSV files, DP-SGD and SecAgg+ over two rounds, and a coordinator
that crashes after round 1 and is resumed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from coordinator.operator import CoordinatorDir, flwr
from tests.deployment import RUN_TOML, Processes, fedistill, free_port, make_site

pytestmark = pytest.mark.slow
SITES = ("hospital-a", "hospital-b", "hospital-c")
PARTIES_TOML = """\
schema_version = 1

[coordinator]
legal_entity = "Example Health Data Consortium (fictional)"

[sites.hospital-a]
legal_entity = "Example Hospital A (fictional)"

[regimes.hipaa]
notes = "the member hospitals are covered entities"
"""


@pytest.fixture
def deployment(tmp_path: Path):
    port = free_port()
    done = fedistill("coordinator", "init", "coordinator", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    coordinator = tmp_path / "coordinator"
    address = f"127.0.0.1:{port}"
    site_files = {name: make_site(tmp_path, name, coordinator, address, seed, free_port())
                  for seed, name in enumerate(SITES)}
    for name in SITES:
        done = fedistill("coordinator", "add-site", name, str(tmp_path / name / "node_key.pub"), "--dir",
                         "coordinator", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    # The operator declares the parties and the regimes (docs/deploy.md, "Parties and governance"): the crosswalk maps
    # the declared regimes only.
    (tmp_path / "parties.toml").write_text(PARTIES_TOML)
    (tmp_path / "run.toml").write_text(RUN_TOML.format(minutes=12).replace(
        "timeout_minutes = 12\n", 'timeout_minutes = 12\nparties = "parties.toml"\n'))
    processes = Processes(tmp_path / "logs")
    try:
        yield tmp_path, address, site_files, processes
    finally:
        processes.stop_all()


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_sites_join_over_tls_and_a_crashed_coordinator_resumes(deployment) -> None:
    root, address, site_files, processes = deployment
    processes.start("coordinator", "coordinator", "start", "coordinator", cwd=root)
    processes.wait_for_log("coordinator", "coordinator ready", timeout=90)

    # Every site passes its pre-flight checks against the running coordinator, TLS handshake included.
    for name, site_file in site_files.items():
        done = fedistill("site", "check", str(site_file), "--format", "json", cwd=root)
        checks = json.loads(done.stdout)
        assert done.returncode == 0 and checks["ok"], done.stdout
        assert [c["name"] for c in checks["checks"] if c["ok"]] == [
            "configuration", "data", "teacher", "privacy budget", "node key", "CA certificate", "coordinator",
            "node key registered"]

    # A site whose key the operator never registered is refused by the SuperLink.
    intruder = make_site(root, "intruder", root / "coordinator", address, 7, free_port())
    refused = fedistill("site", "start", str(intruder), cwd=root, timeout=120)
    assert refused.returncode == 1
    assert "Failed to activate SuperNode" in refused.stderr and "add-site" in refused.stderr

    # A site whose records lack the label column fails its check, which names the column.
    records = intruder.parent / "records.csv"
    records.write_text(records.read_text().replace(",outcome,", ",result,", 1))
    broken = fedistill("site", "check", str(intruder), "--format", "json", cwd=root)
    data = {c["name"]: c for c in json.loads(broken.stdout)["checks"]}["data"]
    assert broken.returncode == 1 and "no column(s) 'outcome'" in data["detail"]

    for name, site_file in site_files.items():
        processes.start(name, "site", "start", str(site_file), cwd=root)
        processes.wait_for_log(name, "connects to", timeout=60)
    # Asking whether a key is registered leaves a joined site as it is (the question activates nothing).
    coordinator_dir = CoordinatorDir.load(root / "coordinator")
    deadline = time.monotonic() + 60
    while not all(n["status"] == "online" for n in flwr(coordinator_dir, "supernode", "list")["nodes"]):
        assert time.monotonic() < deadline, flwr(coordinator_dir, "supernode", "list")
        time.sleep(2)
    done = fedistill("site", "check", str(site_files["hospital-a"]), "--format", "json", cwd=root)
    assert done.returncode == 0, done.stdout
    nodes = flwr(coordinator_dir, "supernode", "list")["nodes"]
    assert len(nodes) == len(SITES) and all(n["status"] == "online" for n in nodes), nodes

    # The run starts; once round 1 is on record the coordinator dies with everything it started.
    processes.start("first-launch", "run", "run.toml", "--format", "json", cwd=root)
    processes.wait_for_log("first-launch", "submitted", timeout=120)
    run_id = processes.log("first-launch").split("run ")[1].split()[0]
    run_dir = root / "runs" / run_id
    deadline = time.monotonic() + 400
    while not _metrics(run_dir):
        assert time.monotonic() < deadline, processes.log("coordinator")
        time.sleep(2)
    processes.crash("coordinator")
    assert [r["round"] for r in _metrics(run_dir)] == [1]
    processes.stop("first-launch")

    # The operator restarts the coordinator and resumes; the sites reconnect by themselves.
    processes.start("coordinator-2", "coordinator", "start", "coordinator", cwd=root)
    processes.wait_for_log("coordinator-2", "coordinator ready", timeout=90)
    resumed = fedistill("run", "run.toml", "--resume", run_id, "--format", "json", cwd=root, timeout=720)
    outcome = json.loads(resumed.stdout)
    assert resumed.returncode == 0, resumed.stderr
    assert outcome["status"] == "finished:completed" and outcome["run_id"] == run_id

    rounds = _metrics(run_dir)
    assert [(r["round"], r["status"], r["aggregation"]) for r in rounds] == [(1, "aggregated", "secagg+"),
                                                                            (2, "aggregated", "secagg+")]
    assert all(r["participants"] == sorted(SITES) for r in rounds)
    assert all(r["quantization_error_bound"] < 1e-3 for r in rounds)
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in ledger if e["kind"] != "checkpoint"] == ["run-started", "parties-declared", "round",
                                                                          "run-resumed", "round", "site-evaluation",
                                                                          "run-finished"]

    # Each site spent DP budget within the run's target, as its own report (from its verified ledger) says.
    for name, site_file in site_files.items():
        done = fedistill("site", "report", str(site_file.parent / "state"), "--format", "json", cwd=root)
        report = json.loads(done.stdout)
        assert done.returncode == 0, done.stderr
        run = report["runs"][run_id]
        assert 0 < run["epsilon"] <= 6.0 + 1e-6
        assert {u["round"] for u in run["updates_sent"]} >= {1, 2}
        assert all(u["payload_kind"] == "secagg+ input (masked by Flower)" for u in run["updates_sent"])

    # The auditor gathers each site's evidence (never its records) and verifies the run independently.
    for name, site_file in site_files.items():
        done = fedistill("site", "evidence", str(site_file.parent / "state"), str(run_dir / "sites" / name), cwd=root)
        assert done.returncode == 0, done.stderr
        assert not (run_dir / "sites" / name / "data.npz").exists()
    verified = fedistill("verify", str(run_dir), "--format", "json", cwd=root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["verified"] is True
    reported = fedistill("report", str(run_dir), "--format", "json,html", "--signing-key",
                         str(root / "coordinator" / "coordinator_key.pem"), cwd=root)
    assert reported.returncode == 0, reported.stderr
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["run"]["mode"].startswith("deployment") and report["run"]["run_id"] == run_id
    # TLS and SuperNode authentication are attested in the coordinator's signed ledger, so the report shows them.
    transport = report["secure_aggregation"]["transport"]
    assert transport["supernode_authentication"] is True and sorted(transport["node_keys"]) == sorted(SITES)
    assert transport["tls"]["hosts"] == ["127.0.0.1"]
    clauses = {row["clause"]: row["status"] for row in report["crosswalk"]["rows"]}
    assert clauses["45 CFR 164.312(d)"] == "met" and clauses["45 CFR 164.312(e)(1)-(2)"] == "met"
    # The sites evaluated the final student on their own test splits and released noised histograms (their
    # default), charged to their budgets: the report's evaluation section has the pooled and per-site numbers.
    evaluation = report["evaluation"]
    pooled = evaluation["overall"][0]
    assert pooled["model"].endswith("(noised)") and 0.0 <= pooled["roc_auc"] <= 1.0 and 0.0 <= pooled["accuracy"] <= 1.0
    assert sorted(evaluation["per_site"]) == sorted(SITES)
    releases = {site: block["evaluation_releases"] for site, block in report["privacy"]["sites"].items()}
    assert all(len(r) == 1 and r[0]["noise_multiplier"] == 10.0 for r in releases.values())

    # The operator exports the student for the team that deploys it, with the coordinator's own keys. It holds no
    # record, so the ONNX parity is checked on synthetic inputs and the quality is not assessed; verify-model passes.
    coordinator_dir = root / "coordinator"
    exported = fedistill("export", str(run_dir), "--out", str(root / "student"), "--quantize", "int8", "--output",
                         "json", "--signing-key", str(coordinator_dir / "model_signing_key.pem"), "--ledger-key",
                         str(coordinator_dir / "coordinator_key.pem"), cwd=root)
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert manifest["variants"]["onnx-fp32"]["parity"]["inputs"].startswith("synthetic") and manifest["quality"] == {}
    assert "not assessed" in (root / "student" / "README.md").read_text()
    checked = fedistill("verify-model", str(root / "student"), "--run", str(run_dir), "--format", "json", cwd=root)
    assert checked.returncode == 0 and json.loads(checked.stdout)["verified"], checked.stdout + checked.stderr
    assert fedistill("verify", str(run_dir), cwd=root).returncode == 0  # exporting changed nothing in the run
    # The deploying team benches the student on records it holds (here one site's own split file stands for them)
    # against the teacher it names; the coordinator itself holds neither.
    site_dir = site_files["hospital-a"].parent
    benched = fedistill("bench", str(run_dir), "--quick", "--format", "json", "--inputs",
                        str(site_dir / "state" / "data.npz"), "--teacher", str(site_dir / "teacher.pkl"), cwd=root,
                        timeout=600)
    assert benched.returncode == 0, benched.stderr
    assert [row["model"] for row in json.loads(benched.stdout)["rows"]][:2] == ["teacher", "student, torch fp32"]
    refused = fedistill("bench", str(run_dir), cwd=root)
    assert refused.returncode == 1 and "--inputs is required" in refused.stderr

    assert processes.stop("coordinator-2") in (0, 143)
    for name in SITES:
        processes.stop(name)
