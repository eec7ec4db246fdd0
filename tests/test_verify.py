"""`fedistill verify` on a real simulated run: it passes as written, and fails naming the place when altered."""

import json
from pathlib import Path

import pytest

from compliance.verify import _verify_site_privacy
from protocols.errors import LedgerTampered
from protocols.ledger import generate_signing_key, read_events
from tests.test_cli_simulate import run_cli


def verify(run_dir: Path):
    return run_cli("verify", str(run_dir), "--format", "json", timeout=120)


def test_an_untouched_run_verifies(verified_run):
    result = verify(verified_run)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["verified"] is True and set(report["sites"]) == {"clinical-lab", "emergency-dept",
                                                                  "oncology-day-hosp"}
    for site in report["sites"].values():
        assert site["updates_sent"] == 2 and abs(site["epsilon_replayed"] - site["epsilon_recorded"]) < 0.02 * 8


def rewrite_lines(path: Path, change) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(lines)))


def assert_fails(run_dir: Path, *fragments: str) -> None:
    result = verify(run_dir)
    assert result.returncode == 1
    failure = json.loads(result.stdout)["failure"]
    for fragment in fragments:
        assert fragment in failure, failure
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("ledger", ["ledger.jsonl", "sites/emergency-dept/ledger.jsonl"])
def test_one_flipped_byte_anywhere_fails_naming_the_line(run_copy, ledger):
    path = run_copy / ledger
    data = bytearray(path.read_bytes())
    second_line = data.index(b"\n") + 1
    position = data.index(b'"kind":"', second_line) + len('"kind":"')
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    assert_fails(run_copy, ledger.split("/")[-1], "line 2")


def test_a_deleted_line_fails(run_copy):
    rewrite_lines(run_copy / "sites/clinical-lab/ledger.jsonl", lambda lines: lines[:1] + lines[2:])
    assert_fails(run_copy, "clinical-lab/ledger.jsonl", "line 2")


def test_two_swapped_lines_fail(run_copy):
    rewrite_lines(run_copy / "ledger.jsonl", lambda lines: [lines[0], lines[2], lines[1], *lines[3:]])
    assert_fails(run_copy, "ledger.jsonl", "line 2")


def test_a_checkpoint_signed_with_another_key_fails(run_copy, tmp_path):
    site_dir = run_copy / "sites" / "oncology-day-hosp"
    (site_dir / "ledger_key.pem").unlink()
    generate_signing_key(site_dir / "ledger_key.pem")  # an impostor's key; the published public key stays
    from protocols.ledger import Ledger, load_signing_key

    Ledger(site_dir / "ledger.jsonl", "oncology-day-hosp", load_signing_key(site_dir / "ledger_key.pem")).checkpoint(
        {"note": "forged"})
    assert_fails(run_copy, "oncology-day-hosp/ledger.jsonl", "signature")


def test_an_edited_noise_multiplier_fails(run_copy):
    path = run_copy / "sites" / "clinical-lab" / "privacy.json"
    state = json.loads(path.read_text())
    state["spends"][0]["noise_multiplier"] *= 2
    path.write_text(json.dumps(state))
    assert_fails(run_copy, "clinical-lab/privacy.json", "differ from the DP parameters")


def test_a_recorded_epsilon_that_does_not_replay_fails(run_copy):
    # A site that rewrote both its ledger and its privacy.json to show more noise than it used: the
    # epsilon it recorded at the time no longer follows from the parameters it now shows.
    site_dir = run_copy / "sites" / "clinical-lab"
    events = read_events(site_dir / "ledger.jsonl")
    run_id, config_hash = events[0]["payload"]["run_id"], events[0]["payload"]["config_hash"]
    for event in events:
        if event["kind"] in ("update-sent", "test-evaluation"):
            event["payload"]["dp"]["noise-multiplier"] *= 3
    state = json.loads((site_dir / "privacy.json").read_text())
    for spend in state["spends"]:
        spend["noise_multiplier"] *= 3
    (site_dir / "privacy.json").write_text(json.dumps(state))
    with pytest.raises(LedgerTampered, match="replay to"):
        _verify_site_privacy(site_dir, events, run_id, config_hash)


def test_missing_evidence_is_a_failure(run_copy):
    (run_copy / "sites" / "emergency-dept" / "ledger.jsonl").unlink()
    assert_fails(run_copy, "missing evidence")


def test_site_report_shows_what_left_the_site_and_its_budget(verified_run, run_copy):
    site_dir = verified_run / "sites" / "emergency-dept"
    result = run_cli("site", "report", str(site_dir), "--format", "json", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    [(run_id, run)] = report["runs"].items()
    assert [sent["round"] for sent in run["updates_sent"]] == [1, 2] and run["refusals"] == []
    assert all(sent["bytes"] > 0 and len(sent["digest"]) == 64 for sent in run["updates_sent"])
    assert 0 < run["epsilon"] <= report["policy"]["epsilon_per_run"] and report["lifetime_budget_left"] is None
    checkpoints = sum(e["kind"] == "checkpoint" for e in read_events(site_dir / "ledger.jsonl"))
    assert report["ledger"]["verified"] and report["ledger"]["checkpoints"] == checkpoints >= 2
    table = run_cli("site", "report", str(site_dir), timeout=120)
    assert table.returncode == 0 and "what left this site" in table.stdout
    rewrite_lines(run_copy / "sites" / "emergency-dept" / "ledger.jsonl", lambda lines: lines[:-2] + lines[-1:])
    tampered = run_cli("site", "report", str(run_copy / "sites" / "emergency-dept"), timeout=120)
    assert tampered.returncode == 1 and "ledger.jsonl" in tampered.stderr


def _resign(path: Path, key) -> None:
    """Rewrite a ledger as its owner could: same events, every checkpoint re-signed with ``key``, chain redone."""
    import base64

    from protocols.canonical import canonical_json, sha256_hex

    previous = "0" * 64
    lines = []
    for event in read_events(path):
        event["prev_hash"] = previous
        if event["kind"] == "checkpoint":
            event["payload"]["signed_hash"] = previous
            event["payload"]["signature"] = base64.b64encode(key.sign(previous.encode())).decode()
        event["hash"] = sha256_hex(canonical_json({k: v for k, v in event.items() if k != "hash"}))
        previous = event["hash"]
        lines.append(canonical_json(event) + "\n")
    path.write_text("".join(lines))


def test_the_coordinator_ledger_cut_back_at_any_line_boundary_never_verifies(run_copy):
    from compliance.verify import verify_run

    ledger = run_copy / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds[0] == "run-started" and kinds[-2:] == ["run-finished", "checkpoint"]
    outcomes = {}
    for keep in range(1, len(lines)):
        ledger.write_bytes(b"".join(lines[:keep]))
        try:
            outcomes[keep] = verify_run(run_copy).status
        except LedgerTampered as err:
            outcomes[keep] = "failed: " + str(err)
    assert all(outcome != "verified" for outcome in outcomes.values()), outcomes
    # Cut to run-started alone: the sites' records of later checkpoints and rounds name what is missing.
    assert "cut back" in outcomes[1]
    # Only the signed end is missing: the run verifies as incomplete, and the CLI says so with exit status 2.
    assert outcomes[len(lines) - 1] == "incomplete" and outcomes[len(lines) - 2] == "incomplete"
    result = verify(run_copy)
    assert result.returncode == 2 and json.loads(result.stdout)["status"] == "incomplete"
    ledger.write_bytes(b"".join(lines[:1]))
    assert_fails(run_copy, "ledger.jsonl", "cut back")


def test_the_coordinator_ledger_re_signed_with_a_fresh_key_fails(run_copy, tmp_path):
    from protocols.ledger import public_key_pem

    key = generate_signing_key(tmp_path / "impostor.pem")
    _resign(run_copy / "ledger.jsonl", key)
    (run_copy / "ledger_key.pub.pem").write_text(public_key_pem(key))
    assert_fails(run_copy, "ledger.jsonl", "pinned", "re-signed with another key")


def test_a_swapped_student_fails(run_copy, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from protocols.canonical import digest_arrays

    path = run_copy / "student" / "model.safetensors"
    weights = {k: v + np.float32(0.01) if v.dtype.kind == "f" else v for k, v in load_file(str(path)).items()}
    save_file(weights, str(path))
    assert_fails(run_copy, "model.safetensors", "the student was swapped")
    # Editing metrics.jsonl to the new digest does not help: the signed ledger holds the old one.
    metrics = run_copy / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["student_digest"] = digest_arrays(weights)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert_fails(run_copy, "metrics.jsonl", "round 2 differs from the ledger", "student_digest")


def test_a_round_deleted_from_metrics_fails(run_copy):
    rewrite_lines(run_copy / "metrics.jsonl", lambda lines: lines[1:])
    assert_fails(run_copy, "metrics.jsonl", "rounds [2]", "rounds [1, 2]")


def test_a_target_epsilon_the_ledger_contradicts_fails(run_copy):
    path = run_copy / "sites" / "clinical-lab" / "privacy.json"
    state = json.loads(path.read_text())
    [calibration] = state["calibrations"].values()
    calibration["target_epsilon"] = 1.0
    path.write_text(json.dumps(state))
    assert_fails(run_copy, "clinical-lab/privacy.json", "calibration", "not the one the site's ledger recorded")


def test_a_report_is_signed_and_an_edited_report_fails(run_copy):
    written = run_cli("report", str(run_copy), "--format", "json", timeout=300)
    assert written.returncode == 0, written.stderr[-2000:]
    report_path = run_copy / "report" / "report.json"
    assert (run_copy / "report" / "report.json.sig").is_file()
    result = verify(run_copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["report"]["report_id"] == json.loads(report_path.read_text())["envelope"]["report_id"]
    alone = run_cli("verify", "--report", str(report_path), "--format", "json", timeout=120)
    assert alone.returncode == 0 and json.loads(alone.stdout)["key_fingerprint"].startswith("SHA256:")
    wrong = run_cli("verify", "--report", str(report_path), "--key-fingerprint", "SHA256:" + "0" * 64, timeout=120)
    assert wrong.returncode == 1 and "not by the run's coordinator key" in wrong.stderr

    report = json.loads(report_path.read_text())
    report["privacy"]["sites"]["clinical-lab"]["epsilon_total"] = 0.1
    report_path.write_text(json.dumps(report, indent=2))
    assert_fails(run_copy, "report.json", "edited after it was signed")
    edited = run_cli("verify", "--report", str(report_path), timeout=120)
    assert edited.returncode == 1 and "edited after it was signed" in edited.stderr and "\x1b" not in edited.stderr
