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
        if event["kind"] == "update-sent":
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
    assert report["ledger"]["verified"] and report["ledger"]["checkpoints"] == 2
    table = run_cli("site", "report", str(site_dir), timeout=120)
    assert table.returncode == 0 and "what left this site" in table.stdout
    rewrite_lines(run_copy / "sites" / "emergency-dept" / "ledger.jsonl", lambda lines: lines[:-2] + lines[-1:])
    tampered = run_cli("site", "report", str(run_copy / "sites" / "emergency-dept"), timeout=120)
    assert tampered.returncode == 1 and "ledger.jsonl" in tampered.stderr
