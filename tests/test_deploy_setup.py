"""Setting up a deployment through the CLI, without starting any server: certificates, keys, the site
registry, site.toml and the pre-flight checks, reading records, and a coordinator resuming a run."""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from client.records import RecordSchema, load_records
from coordinator.rounds import Coordinator
from protocols.errors import ConfigError, DataError
from protocols.pki import check_certificate
from tests.deployment import FEATURES, RUN_TOML, fedistill, make_site, records_table
from tests.helpers import federation

SCHEMA = RecordSchema("outcome", ("negative", "positive"), tuple(FEATURES), "patient")


@pytest.fixture
def coordinator_dir(tmp_path: Path) -> Path:
    done = fedistill("coordinator", "init", "coordinator", "--host", "127.0.0.1", "--host", "coord.example.org",
                     "--port", "9555", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "coordinator"


def _check(site_file: Path) -> tuple[int, dict]:
    done = fedistill("site", "check", str(site_file), "--offline", "--format", "json", cwd=site_file.parent)
    return done.returncode, json.loads(done.stdout)


def test_coordinator_init_makes_a_ca_and_a_server_certificate_for_every_host(coordinator_dir: Path) -> None:
    certs = coordinator_dir / "certs"
    server = check_certificate(certs / "server.pem", "server certificate")
    assert set(server.hosts) == {"127.0.0.1", "coord.example.org"} and server.days_left > 300
    # The server certificate chains to the CA the sites are given (what a TLS client checks).
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    assert context.cert_store_stats()["x509_ca"] == 1
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    for private in ("ca.key", "server.key"):
        assert (certs / private).stat().st_mode & 0o777 == 0o600
    assert (coordinator_dir / "coordinator_key.pem").stat().st_mode & 0o777 == 0o600
    again = fedistill("coordinator", "init", "coordinator", "--host", "127.0.0.1", cwd=coordinator_dir.parent)
    assert again.returncode == 1 and "already a coordinator directory" in again.stderr


def test_add_site_registers_openssh_ec_keys_once_and_refuses_anything_else(coordinator_dir: Path,
                                                                            tmp_path: Path) -> None:
    site_file = make_site(tmp_path, "hospital-a", coordinator_dir, "127.0.0.1:9555", 0, 9701)
    key = site_file.parent / "node_key.pub"
    done = fedistill("coordinator", "add-site", "hospital-a", str(key), "--dir", str(coordinator_dir), cwd=tmp_path)
    assert done.returncode == 0 and "SHA256:" in done.stdout
    listed = json.loads(fedistill("coordinator", "sites", "--dir", str(coordinator_dir), "--format", "json",
                                  cwd=tmp_path).stdout)
    assert list(listed["sites"]) == ["hospital-a"]
    assert listed["sites"]["hospital-a"]["fingerprint"] in done.stdout.replace("\n", "")

    twice = fedistill("coordinator", "add-site", "hospital-b", str(key), "--dir", str(coordinator_dir), cwd=tmp_path)
    assert twice.returncode == 1 and "already registered for site 'hospital-a'" in twice.stderr
    ed = tmp_path / "ed25519.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    wrong = fedistill("coordinator", "add-site", "hospital-c", str(ed), "--dir", str(coordinator_dir), cwd=tmp_path)
    assert wrong.returncode == 1 and "not an EC key on a NIST curve" in wrong.stderr


def test_site_init_writes_a_template_that_check_refuses_until_filled_in(tmp_path: Path) -> None:
    done = fedistill("site", "init", "site-a", "--name", "hospital-a", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip().splitlines()[-1].startswith("ecdsa-sha2-nistp256 ")
    assert (tmp_path / "site-a" / "node_key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "site-a" / "state" / "ledger_key.pem").is_file()
    code, result = _check(tmp_path / "site-a" / "site.toml")
    assert code == 1 and not result["ok"]
    assert result["checks"][0]["name"] == "configuration"
    assert "[coordinator] address must be set" in result["checks"][0]["detail"]


def test_site_check_passes_offline_and_names_a_missing_label_column(coordinator_dir: Path, tmp_path: Path) -> None:
    site_file = make_site(tmp_path, "hospital-a", coordinator_dir, "127.0.0.1:9555", 0, 9701)
    code, result = _check(site_file)
    assert code == 0 and result["ok"], result
    by_name = {c["name"]: c for c in result["checks"]}
    assert by_name["data"]["detail"].startswith("240 records, 5 feature(s)")
    assert by_name["coordinator"]["ok"] is None
    records = site_file.parent / "records.csv"
    records.write_text(records_table(50, 1).drop(columns=["outcome"]).to_csv(index=False))
    code, result = _check(site_file)
    data = {c["name"]: c for c in result["checks"]}["data"]
    assert code == 1 and data["ok"] is False and "no column(s) 'outcome'" in data["detail"]
    assert {c["name"]: c for c in result["checks"]}["teacher"]["ok"] is None


def test_site_check_refuses_a_teacher_with_the_wrong_number_of_classes(coordinator_dir: Path, tmp_path: Path) -> None:
    site_file = make_site(tmp_path, "hospital-a", coordinator_dir, "127.0.0.1:9555", 0, 9701)
    site_file.write_text(site_file.read_text().replace('classes = ["negative", "positive"]',
                                                       'classes = ["negative", "positive", "unknown"]'))
    code, result = _check(site_file)
    teacher = {c["name"]: c for c in result["checks"]}["teacher"]
    assert code == 1 and "expected (64, 3)" in teacher["detail"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_records_load_from_json_lines_and_parquet_like_csv(tmp_path: Path, suffix: str) -> None:
    frame = records_table(40, 3)
    frame.to_csv(tmp_path / "r.csv", index=False)
    if suffix == ".jsonl":
        frame.to_json(tmp_path / f"r{suffix}", orient="records", lines=True)
    else:
        frame.to_parquet(tmp_path / f"r{suffix}")
    expected, loaded = load_records(tmp_path / "r.csv", SCHEMA), load_records(tmp_path / f"r{suffix}", SCHEMA)
    np.testing.assert_allclose(loaded.inputs["x"], expected.inputs["x"], rtol=1e-6)
    np.testing.assert_array_equal(loaded.labels, expected.labels)
    assert loaded.max_records_per_person() == expected.max_records_per_person()


def test_records_refuse_text_features_and_unknown_labels_naming_the_column(tmp_path: Path) -> None:
    frame = records_table(20, 0)
    frame.assign(f2="high").to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(DataError, match="feature column 'f2' is .*, not numeric"):
        load_records(tmp_path / "text.csv", SCHEMA)
    frame.assign(outcome="maybe").to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError, match="label column 'outcome' holds value"):
        load_records(tmp_path / "labels.csv", SCHEMA)


def test_a_certificate_expiring_within_30_days_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "soon")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now - timedelta(days=300))
                   .not_valid_after(now + timedelta(days=10)).sign(key, hashes.SHA256()))
    path = tmp_path / "ca.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="expires in 10 day"):
        check_certificate(path, "[coordinator] ca_certificate")


def test_a_resumed_coordinator_keeps_the_recorded_student_and_redoes_unrecorded_rounds(tmp_path: Path) -> None:
    config = federation(rounds=3)
    first = Coordinator(config, "run-1", tmp_path / "run-1")
    for server_round in (1, 2):  # rounds in which SecAgg+ halted: recorded and checkpointed, student unchanged
        first.complete_secure_round(server_round, None, [], {}, {"node-1": "crashed"}, {}, started=0.0)

    resumed = Coordinator(config, "run-1", tmp_path / "run-1")
    assert resumed.resume() == 2 and [r["round"] for r in resumed.records] == [1, 2]

    # A crash after round 2 was recorded but before its checkpoint was written: round 2 is redone.
    student = tmp_path / "run-1" / "student"
    manifest = json.loads((student / "checkpoint.json").read_text())
    (student / "checkpoint.json").write_text(json.dumps(manifest | {"round": 1}))
    again = Coordinator(config, "run-1", tmp_path / "run-1")
    assert again.resume() == 1
    assert len((tmp_path / "run-1" / "metrics.jsonl").read_text().splitlines()) == 1
    events = [json.loads(line) for line in (tmp_path / "run-1" / "ledger.jsonl").read_text().splitlines()]
    assert events[-1]["payload"]["superseded_rounds"] == [2]

    with pytest.raises(ConfigError, match="resume with the run.toml the run started with"):
        Coordinator(federation(rounds=4), "run-1", tmp_path / "run-1").resume()


def test_run_file_errors_name_the_field_and_resume_names_the_missing_run(coordinator_dir: Path) -> None:
    root = coordinator_dir.parent
    (root / "run.toml").write_text(RUN_TOML.format(minutes=5).replace("rounds = 2", "rounds = 0"))
    bad = fedistill("run", "run.toml", cwd=root)
    assert bad.returncode == 1 and "rounds" in bad.stderr and "[federation]" in bad.stderr
    (root / "run.toml").write_text(RUN_TOML.format(minutes=5).replace("wait_for_sites = 3", "wait_for_sites = 2"))
    few = fedistill("run", "run.toml", cwd=root)
    assert few.returncode == 1 and "wait_for_sites=2 is below [federation] min_cohort=3" in few.stderr.replace("\n", " ")
    (root / "run.toml").write_text(RUN_TOML.format(minutes=5))
    missing = fedistill("run", "run.toml", "--resume", "12345", cwd=root)
    assert missing.returncode == 1 and "--resume 12345: no run ledger" in missing.stderr.replace("\n", " ")


def test_resume_with_a_changed_run_toml_is_refused_before_anything_is_submitted(coordinator_dir: Path) -> None:
    from coordinator.launch import RunFile

    root = coordinator_dir.parent
    (root / "run.toml").write_text(RUN_TOML.format(minutes=5))
    started = RunFile.load(root / "run.toml")
    # run-started, then the checkpoint that signs it
    assert Coordinator(started.federation, "777", started.out_dir / "777").ledger.head[0] == 1
    (root / "run.toml").write_text(RUN_TOML.format(minutes=5).replace("rounds = 2", "rounds = 3"))
    changed = fedistill("run", "run.toml", "--resume", "777", cwd=root)
    assert changed.returncode == 1
    assert "resume with the run.toml the run started with" in changed.stderr.replace("\n", " ")
