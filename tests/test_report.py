"""`fedistill report` on the shared small run: report.json against the ledgers and the summary, the crosswalk,
an altered run, the same run reshaped as a deployment's run directory, and the HTML and PDF as headless Chromium
renders them."""

import json
import re
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compliance import render
from compliance.render import heading, run_chromium, write_report
from compliance.report import (NOT_ASSESSED, PROFILE_DELTAS, SECTIONS, build_report, dp_statement, file_sha256,
                               is_not_assessed, report_id)
from fedistill.cli import app
from protocols.accounting import EVIDENCE_FILES, PrivacyState, SitePolicy, epsilon_of
from protocols.errors import ExternalToolError
from protocols.ledger import read_events
from tests.test_cli_simulate import run_cli
from tests.test_verify import rewrite_lines

CROSSWALK_CLAUSES = {"45 CFR 164.312(a)(1)-(2)", "45 CFR 164.312(b)", "45 CFR 164.312(c)(1)-(2)", "45 CFR 164.312(d)",
                     "45 CFR 164.312(e)(1)-(2)", "Art. 5(1)(c), 5(2)", "Art. 25", "Art. 30(1)(a)-(g)",
                     "Art. 32(1)(a)-(d)", "Art. 35(7)(a)-(d)", "Art. 11", "Art. 12", "Annex IV point 1",
                     "Annex IV point 2", "Annex IV points 3-9", "model risk management (OCC 2011-12)"}


@pytest.fixture(scope="module")
def reported_run(verified_run, tmp_path_factory):
    """A copy of the shared run with its report written by the CLI, in all three formats, to RUN_DIR/report."""
    run_dir = Path(shutil.copytree(verified_run, tmp_path_factory.mktemp("reported") / "run"))
    result = run_cli("report", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


@pytest.fixture(scope="module")
def report(reported_run):
    return json.loads((reported_run[0] / "report" / "report.json").read_text())


def test_the_cli_writes_json_html_and_pdf_and_the_run_still_verifies(reported_run):
    run_dir, stdout = reported_run
    for name in ("report.json", "report.html", "report.pdf"):
        path = run_dir / "report" / name
        assert f": {path}" in stdout and path.stat().st_size > 10_000
    assert (run_dir / "report" / "report.pdf").read_bytes().startswith(b"%PDF")
    verified = run_cli("verify", str(run_dir), "--format", "json", timeout=120)
    assert verified.returncode == 0 and json.loads(verified.stdout)["verified"] is True


def test_report_json_is_self_describing_and_its_id_and_digests_recompute(reported_run, report):
    run_dir = reported_run[0]
    assert report["schema_version"] == 1
    assert [(s["key"], s["number"], s["title"]) for s in report["sections"]] == list(SECTIONS)
    assert all(key in report for key, _, _ in SECTIONS)
    envelope = report["envelope"]
    assert report_id(report) == envelope["report_id"] and envelope["generated_at"].endswith("Z")
    subjects = {s["path"]: s["sha256"] for s in envelope["subjects"]}
    assert {"student/model.safetensors", "config.json", "ledger.jsonl", "sites/clinical-lab/ledger.jsonl",
            "sites/clinical-lab/privacy.json"} <= set(subjects)
    for path, digest in subjects.items():
        assert digest == file_sha256(run_dir / path), path
    for signature in envelope["signatures"]:
        ledger = run_dir / ("ledger.jsonl" if signature["signer"] == "coordinator"
                            else f"sites/{signature['signer']}/ledger.jsonl")
        events = read_events(ledger)
        assert (signature["head_seq"], signature["head_hash"]) == (events[-1]["seq"], events[-1]["hash"])
        assert signature["key_fingerprint"].startswith("SHA256:")
        assert signature["checkpoints"] == sum(e["kind"] == "checkpoint" for e in events) >= 2
    # Never a record: a site's data appears as digests and a schema (dtypes, shapes), not as values.
    inventory = report["data_inventory"]["sites"]["clinical-lab"]
    assert set(inventory["data_digest"]) == {"train", "val", "test"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in inventory["data_digest"].values())
    assert inventory["schema"]["inputs"] == {"x": {"dtype": "float32", "shape_per_record": [31]}}


def test_data_flows_and_epsilons_match_the_site_ledgers_and_the_summary(reported_run, report):
    run_dir = reported_run[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    for site, flows in report["data_flows"]["sites"].items():
        sent = [e["payload"] for e in read_events(run_dir / "sites" / site / "ledger.jsonl")
                if e["kind"] == "update-sent"]
        assert [(u["round"], u["bytes"], u["digest"]) for u in flows["updates"]] == \
            [(p["round"], p["bytes"], p["digest"]) for p in sent]
        assert flows["tensor_layout"] == sent[0]["tensors"]
        assert report["data_flows"]["bytes_per_round"][site] == [p["bytes"] for p in sent]

        block = report["privacy"]["sites"][site]
        expected = summary["privacy"]["sites"][site]
        assert block["epsilon_total"] == pytest.approx(expected["epsilon"], rel=0.02)
        assert block["epsilon_replayed_pld"] == pytest.approx(expected["epsilon"], rel=0.02)
        assert [p["epsilon"] for p in block["epsilon_per_round"]] == [p["epsilon_run"] for p in sent]
        assert block["mechanism"]["noise_multiplier"] == expected["noise_multiplier"]
        assert block["mechanism"]["total_steps"] == expected["steps"] == 10
        profile = [p["epsilon"] for p in block["privacy_profile"]]
        assert [p["delta"] for p in block["privacy_profile"]] == list(PROFILE_DELTAS) and profile == sorted(profile)
        assert profile[0] == pytest.approx(block["epsilon_total"])  # this run's delta is 1e-5
        assert block["budget"]["within_cap"] is True and block["budget"]["refusals"] == []
        # The plain-language sentence is generated from the block's own numbers, so it regenerates exactly.
        assert block["statement"] == dp_statement(site, block)
        assert f"{block['epsilon_total']:.4g}" in block["statement"] and "record-level" in block["statement"]
    federation = report["privacy"]["federation"]
    spent = [summary["privacy"]["sites"][s]["epsilon"] for s in summary["sites"]]
    assert federation["max_epsilon"] == pytest.approx(max(spent), rel=0.02)
    assert "several sites" in federation["warning"] and report["privacy"]["unprotected_quantities"]


def test_evaluation_secure_aggregation_and_audit_trail_come_from_the_run(reported_run, report):
    run_dir = reported_run[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    overall = {row["model"]: row for row in report["evaluation"]["overall"]}
    assert overall["federated student"]["roc_auc"] == summary["models"]["federated"]["overall"]["roc_auc"]
    assert overall["teacher"]["kappa"] == summary["models"]["teacher"]["overall"]["kappa"]
    assert [r["roc_auc"] for r in report["evaluation"]["per_round"]] == \
        [m["evaluation"]["overall"]["roc_auc"] for m in metrics]
    assert set(report["evaluation"]["per_site"]) == set(summary["sites"])
    secure = report["secure_aggregation"]
    assert secure["enabled"] and secure["parameters"]["min_cohort"] == 3
    assert [r["participants"] for r in secure["per_round"]] == [m["participants"] for m in metrics]
    assert [r["quantization_error_bound"] for r in secure["per_round"]] == [m["quantization_error_bound"]
                                                                             for m in metrics]
    trail = report["audit_trail"]
    assert trail["verification"]["verified"] is True and trail["cross_recorded_site_heads"] == 6
    coordinator = trail["ledgers"][0]
    assert coordinator["events"] == len(read_events(run_dir / "ledger.jsonl")) and coordinator["kinds"]["round"] == 2
    assert report["lineage"]["final_weights_check"]["result"] == "ok"
    assert all(check["result"] == "ok" for check in report["verification"]["report_checks"])


def test_the_crosswalk_maps_every_clause_and_never_invents_evidence(report):
    rows = {row["clause"]: row for row in report["crosswalk"]["rows"]}
    assert set(rows) == CROSSWALK_CLAUSES
    for row in rows.values():
        assert row["status"] in ("met", "partial", "not met", NOT_ASSESSED) and row["sections"] and row["basis"]
        if row["status"] != NOT_ASSESSED:
            assert row["evidence"]["files"], row["clause"]
    assert rows["45 CFR 164.312(b)"]["status"] == rows["Art. 12"]["status"] == "met"
    assert rows["45 CFR 164.312(c)(1)-(2)"]["status"] == "met" and rows["Art. 25"]["status"] == "met"
    for clause in ("45 CFR 164.312(a)(1)-(2)", "Art. 35(7)(a)-(d)", "Annex IV points 3-9"):
        assert rows[clause]["status"] == NOT_ASSESSED and rows[clause]["evidence"]["files"] == []
    # What a simulation cannot evidence is marked, never filled in.
    assert report["run"]["fab_hash"] == report["secure_aggregation"]["transport"]["tls"] == NOT_ASSESSED
    assert all(p["legal_entity"] == NOT_ASSESSED for p in report["parties"]["sites"])
    assert report["risk"]["dpia"] == report["access_control"]["mfa"] == NOT_ASSESSED


def test_an_altered_run_gets_a_report_that_says_so_and_pdf_needs_chromium(run_copy, monkeypatch, tmp_path):
    rewrite_lines(run_copy / "sites/emergency-dept/ledger.jsonl", lambda lines: lines[:1] + lines[2:])
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    with pytest.raises(ExternalToolError, match="apt-get install chromium"):
        write_report(run_copy, tmp_path / "out", ("html", "pdf"))
    assert not (tmp_path / "out").exists()  # checked before any work: nothing half-written
    written = write_report(run_copy, tmp_path / "out", ("json", "html"))
    altered = json.loads(written["json"].read_text())
    failure = altered["audit_trail"]["verification"]["failure"]
    assert altered["verification"]["verified"] is False and "emergency-dept/ledger.jsonl" in failure
    rows = {row["clause"]: row for row in altered["crosswalk"]["rows"]}
    assert rows["45 CFR 164.312(b)"]["status"] == "not met" and failure in rows["45 CFR 164.312(b)"]["basis"]
    assert "Verification FAILED" in written["html"].read_text()


def as_deployed(run_dir: Path) -> None:
    """Reshape a simulated run directory into what `fedistill run` and `fedistill site evidence` leave
    (docs/deploy.md): no summary, no teacher, no evaluation, and under sites/ only each site's evidence."""
    config = json.loads((run_dir / "config.json").read_text())
    # A deployed coordinator keeps its key in its own directory, not in the run directory.
    (run_dir / "ledger_key.pem").rename(run_dir.parent / "coordinator_key.pem")
    for path in run_dir.iterdir():
        if path.is_dir() and path.name not in ("student", "sites"):
            shutil.rmtree(path)
        elif path.is_file() and path.name not in ("config.json", "metrics.jsonl", "ledger.jsonl", "ledger_key.pub.pem"):
            path.unlink()
    for site in (run_dir / "sites").iterdir():
        for path in site.iterdir():
            if path.name not in EVIDENCE_FILES:
                path.unlink()
    # metrics.jsonl stays as the coordinator signed its rounds (verify checks it against the ledger); the report
    # of a run without summary.json has no coordinator-side evaluation.
    # federation and config_hash unchanged, so the run still verifies (coordinator_from_run_config's shape).
    (run_dir / "config.json").write_text(json.dumps({
        "schema_version": 1, "run_id": config["run_id"], "deployment": {"flower_run_id": 5630224506200417090,
                                                                        "wait_for_sites": 3},
        "federation": config["federation"], "config_hash": config["config_hash"]}, indent=2))


def pointed(report: dict, pointer: str):
    value = report
    for key in pointer.removeprefix("#/").split("/"):
        value = value[key]
    return value


def test_a_deployed_run_is_reported_from_its_evidence_and_marks_the_rest_not_assessed(verified_run, tmp_path):
    run_dir = Path(shutil.copytree(verified_run, tmp_path / "deployed"))
    as_deployed(run_dir)
    # The CLI in-process: a subprocess would spend most of this test importing torch and dp-accounting again.
    unsigned = CliRunner().invoke(app, ["report", str(run_dir), "--format", "json,html"])
    assert unsigned.exit_code == 1 and "--signing-key" in unsigned.output
    result = CliRunner().invoke(app, ["report", str(run_dir), "--format", "json,html",
                                      "--signing-key", str(tmp_path / "coordinator_key.pem")])
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    run = report["run"]
    assert run["mode"].startswith("deployment") and run["flower_run_id"] == "5630224506200417090"
    assert run["deployment"]["wait_for_sites"] == 3 and "simulation" not in run and run["config_hash_recomputes"]

    evaluation = report["evaluation"]
    assert all(is_not_assessed(evaluation[key]) for key in ("overall", "per_site", "baselines_reference"))
    assert "no coordinator-side evaluation" in evaluation["overall"]
    assert [r["round"] for r in evaluation["per_round"]] == [1, 2]
    page = (run_dir / "report" / "report.html").read_text()
    assert f'{NOT_ASSESSED}</span>: a deployed run has no coordinator-side evaluation' in page
    assert "per round (pooled test splits)" not in page  # no empty utility chart
    teacher = report["model_card"]["teacher"]
    assert is_not_assessed(teacher["description"]) and teacher["files"] == []
    assert report["model_card"]["model"]["parameters"] == 2146  # counted in the checkpoint, as the summary said

    run_id = run["run_id"]
    for site, inventory in report["data_inventory"]["sites"].items():
        assert "kept at the site" in inventory["splits"] and is_not_assessed(inventory["data_digest"])
        site_dir = run_dir / "sites" / site
        privacy, policy = PrivacyState.load(site_dir), SitePolicy.load(site_dir)
        block = report["privacy"]["sites"][site]
        expected = epsilon_of(privacy.run_spends(run_id), privacy.calibrations[run_id].delta, policy.accountant)
        assert block["epsilon_total"] == pytest.approx(expected)
        assert block["epsilon_total"] == pytest.approx(block["epsilon_recorded"], rel=0.02)
        assert block["statement"] == dp_statement(site, block) and "not for a person" in block["statement"]
        assert is_not_assessed(report["secure_aggregation"]["clipped_values"][site])
    assert all(check["result"] == "ok" for check in report["verification"]["report_checks"])

    # Every clause is still mapped, and no row cites a file or a section the run does not have.
    subjects = {s["path"]: s["sha256"] for s in report["envelope"]["subjects"]}
    assert "summary.json" not in subjects and "missing" not in subjects.values()
    assert {f"sites/clinical-lab/{name}" for name in EVIDENCE_FILES} <= set(subjects)
    rows = {row["clause"]: row for row in report["crosswalk"]["rows"]}
    assert set(rows) == CROSSWALK_CLAUSES
    for row in rows.values():
        for cited in row["evidence"]["files"]:
            assert cited["sha256"] == file_sha256(run_dir / cited["path"]), (row["clause"], cited["path"])
        for pointer in row["evidence"]["report"]:
            assert not is_not_assessed(pointed(report, pointer)), (row["clause"], pointer)
        assert "#/evaluation" not in row["evidence"]["report"]
        if row["status"] != NOT_ASSESSED:
            assert row["evidence"]["files"], row["clause"]
    assert rows["45 CFR 164.312(b)"]["status"] == "met" and "deployment" in rows["45 CFR 164.312(e)(1)-(2)"]["basis"]

    verified = CliRunner().invoke(app, ["verify", str(run_dir), "--format", "json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["verified"] is True


def test_a_deployed_run_missing_a_site_s_evidence_is_reported_as_failing_verification(verified_run, tmp_path):
    run_dir = Path(shutil.copytree(verified_run, tmp_path / "deployed"))
    as_deployed(run_dir)
    shutil.rmtree(run_dir / "sites" / "emergency-dept")  # it took part, but handed no evidence over
    report = build_report(run_dir)
    assert report["verification"]["verified"] is False and "emergency-dept" in report["privacy"]["sites"]
    assert "missing" in report["audit_trail"]["verification"]["failure"]
    assert report["data_flows"]["sites"]["emergency-dept"]["ledger_error"]


def test_a_bad_format_is_refused_naming_the_choices(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--format", "html,docx"])
    assert result.exit_code == 1 and "html, pdf, json" in result.output


def test_simulate_with_report_looks_for_chromium_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    result = CliRunner().invoke(app, ["simulate", "--report", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "apt-get install chromium" in result.output
    assert list(tmp_path.iterdir()) == []


def png_pixels(path: Path) -> np.ndarray:
    """An 8-bit RGB(A), non-interlaced PNG (what Chromium writes) as a height x width x channels array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        chunks.setdefault(kind, []).append(data[position + 8:position + 8 + length])
        position += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and colour_type in (2, 6) and interlace == 0
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(b"".join(chunks[b"IDAT"])), width * bpp
    image = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        if kind == 0:
            image[y] = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            image[y] = (np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint64) % 256).astype(np.uint8).ravel()
        elif kind == 2:  # Up
            image[y] = line + previous
        else:  # Average (3) and Paeth (4) depend on the pixel to the left: one byte at a time
            row, up = bytearray(line.tobytes()), previous.tobytes()
            for i in range(stride):
                a, b, c = (row[i - bpp], up[i], up[i - bpp]) if i >= bpp else (0, up[i], 0)
                if kind == 3:
                    row[i] = (row[i] + (a + b) // 2) & 0xFF
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            image[y] = np.frombuffer(bytes(row), np.uint8)
        previous = image[y]
    return image.reshape(height, width, bpp)


def test_headless_chromium_renders_the_html_and_the_page_is_not_blank(reported_run, tmp_path):
    shot = tmp_path / "report.png"
    run_chromium([f"--screenshot={shot}", "--window-size=1200,2000"], reported_run[0] / "report" / "report.html")
    pixels = png_pixels(shot)[:, :, :3].reshape(-1, 3)
    assert pixels.shape[0] == 1200 * 2000
    colours = np.unique(pixels, axis=0)
    inked = (pixels != 255).any(axis=1).mean()
    assert len(colours) > 200 and 0.03 < inked < 0.9, (len(colours), inked)
    assert (colours == (0x1b, 0x7f, 0x3b)).all(axis=1).any()  # the green "verified" banner is drawn


def test_the_pdf_text_holds_every_section_heading(reported_run, report):
    from pypdf import PdfReader

    reader = PdfReader(reported_run[0] / "report" / "report.pdf")
    # NFKC undoes the typographic ligatures the PDF's fonts use ("ﬂ" in "Data ﬂows").
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", " ".join(p.extract_text() for p in reader.pages)))
    assert len(reader.pages) > 5
    for entry in report["sections"]:
        assert heading(entry) in text, heading(entry)
    assert report["privacy"]["sites"]["clinical-lab"]["statement"][:60] in text
