"""`fedistill report` on the shared small run with the example parties.toml and two sites' governance: report.json
against the ledgers and the summary, the executive summary, the parties and governance it reads from the ledgers,
the crosswalk of the declared regimes (and none without a declaration), an altered run, the same run reshaped as a
deployment's run directory, and the HTML and PDF as headless Chromium renders them."""

import html
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
from compliance.crosswalk import crosswalk_of
from compliance.report import (NOT_ASSESSED, PROFILE_DELTAS, SECTIONS, build_report, dp_statement, file_sha256,
                               is_not_assessed, report_id)
from compliance.summary import summary_of
from fedistill.cli import app
from protocols.accounting import EVIDENCE_FILES, PrivacyState, SitePolicy, epsilon_of
from protocols.errors import ExternalToolError
from protocols.governance import load_parties
from protocols.ledger import read_events
from tests.conftest import GOVERNED_SITES, PARTIES_EXAMPLE
from tests.test_cli_simulate import run_cli
from tests.test_verify import rewrite_lines

# The example consortium declares HIPAA and GDPR: exactly their clauses are mapped, and nothing else.
CROSSWALK_CLAUSES = {"45 CFR 164.312(a)(1)-(2)", "45 CFR 164.312(b)", "45 CFR 164.312(c)(1)-(2)", "45 CFR 164.312(d)",
                     "45 CFR 164.312(e)(1)-(2)", "45 CFR 164.316(b)(2)", "45 CFR 164.514(b)", "Art. 5(1)(c), 5(2)",
                     "Art. 6(1), 9(2)", "Art. 25", "Art. 26, 28", "Art. 30(1)(a)-(g)", "Art. 32(1)(a)-(d)",
                     "Art. 35(7)(a)-(d)"}


@pytest.fixture(scope="module")
def reported_run(declared_run, tmp_path_factory):
    """A copy of the declared run with its report written by the CLI, in all three formats, to RUN_DIR/report."""
    run_dir = Path(shutil.copytree(declared_run, tmp_path_factory.mktemp("reported") / "run"))
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
        assert f"{block['epsilon_total']:.4g}" in block["statement"] and block["unit_of_privacy"] in block["statement"]
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


def test_the_crosswalk_maps_the_declared_regimes_only_and_never_invents_evidence(report):
    crosswalk = report["crosswalk"]
    assert crosswalk["regimes_declared"] == ["GDPR", "HIPAA"] and "GDPR, HIPAA" in crosswalk["declaration"]
    assert {row["regime"] for row in crosswalk["rows"]} == {"GDPR", "HIPAA"}  # no AI Act, SR 11-7 or GLBA row
    rows = {row["clause"]: row for row in crosswalk["rows"]}
    assert set(rows) == CROSSWALK_CLAUSES
    sections = {entry["number"] for entry in report["sections"]}
    for row in rows.values():
        assert row["status"] in crosswalk["statuses"] and set(row["sections"]) <= sections and row["basis"]
        if row["status"] != NOT_ASSESSED:
            assert row["evidence"]["files"], row["clause"]
    assert rows["45 CFR 164.312(b)"]["status"] == "met"
    assert rows["45 CFR 164.312(c)(1)-(2)"]["status"] == "met" and rows["Art. 25"]["status"] == "met"
    for clause in ("45 CFR 164.312(a)(1)-(2)", "Art. 35(7)(a)-(d)", "45 CFR 164.316(b)(2)"):
        assert rows[clause]["status"] == NOT_ASSESSED and rows[clause]["evidence"]["files"] == []
    # Two of the three sites stated a lawful basis: partial, naming the one that did not.
    assert rows["Art. 6(1), 9(2)"]["status"] == "partial" and "oncology-day-hosp" in rows["Art. 6(1), 9(2)"]["basis"]
    assert "EX-JCA-2026-01" in rows["Art. 26, 28"]["basis"]
    # The crosswalk is derived from the other sections only: a verifier recomputes it.
    assert crosswalk_of(report) == crosswalk
    # What a simulation cannot evidence is marked, never filled in.
    assert report["run"]["fab_hash"] == report["secure_aggregation"]["transport"]["tls"] == NOT_ASSESSED
    assert report["risk"]["dpia"] == report["access_control"]["mfa"] == NOT_ASSESSED


def test_parties_toml_and_site_governance_fill_the_report_from_the_ledgers(reported_run, report):
    run_dir = reported_run[0]
    declared = load_parties(PARTIES_EXAMPLE)
    event = next(e for e in read_events(run_dir / "ledger.jsonl") if e["kind"] == "parties-declared")
    assert event["seq"] == 1 and event["payload"]["digest"] == declared.digest
    run = report["run"]
    assert run["intended_purpose"] == declared.purpose and run["out_of_scope_uses"] == list(declared.out_of_scope)
    assert run["parties_declaration"]["digest"] == declared.digest
    assert [r["regime"] for r in run["regimes_asserted"]] == ["GDPR", "HIPAA"]
    parties = report["parties"]
    assert parties["coordinator"]["legal_entity"] == declared.coordinator.legal_entity
    by_site = {p["name"]: p for p in parties["sites"]}
    for name, party in by_site.items():
        expected = declared.site_parties[name]
        assert (party["legal_entity"], party["role"], party["privacy_officer"], party["jurisdiction"]) == \
            (expected.legal_entity, list(expected.role), expected.privacy_officer, expected.jurisdiction)
    assert [a["id"] for a in parties["agreements"]] == [a.id for a in declared.agreements]
    assert parties["declared_sites_not_in_run"] == ["laboratory", "nicu", "picu"]
    # Each site's own [governance], from its signed run-accepted event; the third site stated none.
    inventory = report["data_inventory"]["sites"]
    for name in GOVERNED_SITES:
        assert "HIPAA 45 CFR 164.512(i)" in inventory[name]["lawful_basis"]
        assert inventory[name]["deidentification"] == "safe-harbor"
        assert inventory[name]["categories_of_subjects_and_data"]["special_categories"] == [
            "health data (GDPR Art. 9)", "PHI (HIPAA)"]
        assert "12 months" in inventory[name]["erasure_schedule"]
    assert all(is_not_assessed(inventory["oncology-day-hosp"][key]) for key in
               ("lawful_basis", "categories_of_subjects_and_data", "deidentification", "erasure_schedule"))
    assert report["model_card"]["intended_use"] == declared.purpose
    assert report["model_card"]["risk_tier"].startswith("not applicable")  # SR 11-7 is not declared
    page = (run_dir / "report" / "report.html").read_text()
    for shown in (declared.coordinator.legal_entity, declared.site_parties["clinical-lab"].legal_entity,
                  "EX-BAA-2026-01", "safe-harbor"):
        assert html.escape(shown) in page, shown


def test_the_summary_is_derived_from_the_other_sections_and_lists_every_open_item(report):
    summary = report["summary"]
    assert report["sections"][0]["key"] == "summary" and report["sections"][0]["number"] == 1
    assert list(report)[2] == "summary" and report["sections"][-1]["key"] == "envelope"
    assert summary_of(report) == summary
    assert summary["verdict"]["status"] == "verified"
    privacy = report["privacy"]["sites"]
    assert [(s["site"], s["epsilon"], s["cap"]) for s in summary["privacy"]["sites"]] == \
        [(name, b["epsilon_total"], b["budget"]["cap_per_run"]) for name, b in privacy.items()]
    utility = summary["utility"]
    metric = report["evaluation"]["headline_metric"]
    assert utility["metric"] == metric == "roc_auc"
    assert [(m["model"], m["value"]) for m in utility["models"]] == \
        [(row["model"], row[metric]) for row in report["evaluation"]["overall"]]
    assert [m["role"] for m in utility["models"]][:2] == ["teacher", "student"]
    for line in summary["left_each_site"]["sites"]:
        flows = report["data_flows"]["sites"][line["site"]]
        assert line["line"].startswith(f"{len(flows['updates'])} update(s), {flows['total_bytes']:,} B")
    # Every "not assessed" field of every section but the crosswalk, counted and located.
    items = summary["open_items"]

    def walk(value):
        if is_not_assessed(value):
            yield value
        for child in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            yield from walk(child)

    expected = sum(len(list(walk(report[e["key"]]))) for e in report["sections"]
                   if e["key"] not in ("summary", "crosswalk"))
    assert items["not_assessed"]["count"] == expected > 0
    for group in items["not_assessed"]["by_section"]:
        for pointer in group["fields"]:
            assert is_not_assessed(pointed(report, pointer)), pointer
    assert "#/data_inventory/sites/oncology-day-hosp/lawful_basis" in [
        p for g in items["not_assessed"]["by_section"] for p in g["fields"]]
    assert items["crosswalk"]["not_assessed"] and items["refusals"] == []
    assert summary["regimes"]["declared"] == ["GDPR", "HIPAA"]


def test_a_run_without_parties_maps_no_regime_and_says_so(verified_run, tmp_path):
    written = write_report(Path(shutil.copytree(verified_run, tmp_path / "run")), tmp_path / "out", ("json", "html"))
    report = json.loads(written["json"].read_text())
    crosswalk = report["crosswalk"]
    assert crosswalk["rows"] == [] and crosswalk["regimes_declared"] == []
    assert crosswalk["declaration"].startswith("no regime declared")
    assert report["summary"]["regimes"]["statement"].startswith("no regime declared")
    assert all(is_not_assessed(report["run"][key]) for key in ("intended_purpose", "regimes_asserted"))
    assert all(is_not_assessed(p["legal_entity"]) and "no parties declaration" in p["legal_entity"]
               for p in [report["parties"]["coordinator"], *report["parties"]["sites"]])
    assert "no regime declared" in written["html"].read_text()


def test_a_tampered_parties_declaration_fails_verify(declared_run, tmp_path):
    run_dir = Path(shutil.copytree(declared_run, tmp_path / "run"))
    rewrite_lines(run_dir / "ledger.jsonl", lambda lines: [lines[0], lines[1].replace(
        b"Example Health Data Consortium", b"Another Health Data Consortium"), *lines[2:]])
    result = CliRunner().invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 1 and "ledger.jsonl, line 2" in result.output.replace("\n", "")


def test_an_altered_run_gets_a_report_that_says_so_and_pdf_needs_chromium(declared_run, monkeypatch, tmp_path):
    run_copy = Path(shutil.copytree(declared_run, tmp_path / "run"))
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
    assert altered["summary"]["verdict"]["status"] == "failed"
    assert "45 CFR 164.312(b)" in " ".join(altered["summary"]["open_items"]["crosswalk"]["not_met"])
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


def test_a_deployed_run_is_reported_from_its_evidence_and_marks_the_rest_not_assessed(declared_run, tmp_path):
    run_dir = Path(shutil.copytree(declared_run, tmp_path / "deployed"))
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

    # The coordinator holds no data: the evaluation is the sites' own, as they released it (noised, by default),
    # read from the coordinator's signed site-evaluation event; baselines are not assessed.
    evaluation = report["evaluation"]
    events = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    signed = [e["payload"] for e in events if e["kind"] == "site-evaluation"][-1]
    [pooled] = evaluation["overall"]
    assert pooled["model"] == "federated student, as the sites evaluated it (noised)"
    assert pooled["roc_auc"] == signed["pooled"]["roc_auc"] and 0 <= pooled["accuracy"] <= 1
    assert sorted(evaluation["per_site"]) == sorted(signed["sites"])
    assert all(r["released"] == "noised" and r["noise_std"] == 10.0
               for r in evaluation["site_evaluation"]["evaluations"][-1]["sites"].values())
    assert is_not_assessed(evaluation["baselines_reference"]) and "noise alone" in evaluation["confidence_intervals"]
    assert [r["round"] for r in evaluation["per_round"]] == [1, 2] and evaluation["per_round"][-1]["roc_auc"] is not None
    page = (run_dir / "report" / "report.html").read_text()
    assert "The sites&#x27; own test evaluation" in page or "The sites' own test evaluation" in page
    # The summary charts the site-evaluated student, and the declarations still come from the ledgers.
    assert [m["model"] for m in report["summary"]["utility"]["models"]] == [pooled["model"]]
    assert report["parties"]["coordinator"]["legal_entity"].startswith("Example Health Data Consortium")
    assert report["data_inventory"]["sites"]["clinical-lab"]["deidentification"] == "safe-harbor"
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
        assert block["statement"] == dp_statement(site, block)
        # Person-level by default; a record-level guarantee makes no person-level claim for a deployed site.
        assert ("The unit is the person" if block["unit"] == "person" else "not for a person") in block["statement"]
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


# Appended to a copy of the page: measures the rendered layout and writes it where --dump-dom shows it.
MEASURE = """<pre id="measured"></pre><script>
const box = element => element.getBoundingClientRect();
const sections = [...document.querySelectorAll("section")].map(s => ({key: s.id, top: box(s).top + scrollY}));
const charts = [...document.querySelectorAll("#summary svg")].map(svg => ({
  label: svg.getAttribute("aria-label"), bars: [...svg.querySelectorAll("rect.bar")].map(r => box(r).width)}));
document.getElementById("measured").textContent = JSON.stringify({sections, charts, screen: innerHeight});
</script>"""


def test_in_headless_chromium_the_summary_comes_first_and_its_charts_have_bars(reported_run, report, tmp_path):
    page = (reported_run[0] / "report" / "report.html").read_text()
    assert "<script" not in page and "src=" not in page  # self-contained: nothing runs, nothing is fetched
    measured_page = tmp_path / "measured.html"
    measured_page.write_text(page.replace("</body>", MEASURE + "</body>"))
    dom = run_chromium(["--dump-dom", "--window-size=1200,1000"], measured_page)
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    layout = json.loads(html.unescape(found.group(1)))
    tops = {s["key"]: s["top"] for s in layout["sections"]}
    assert [s["key"] for s in layout["sections"]] == [entry["key"] for entry in report["sections"]]
    assert all(tops["summary"] < top for key, top in tops.items() if key != "summary")
    assert tops["summary"] < layout["screen"] / 3  # on the first screen, near its top
    epsilon, utility = layout["charts"]
    assert epsilon["label"].startswith("Epsilon spent per site") and utility["label"].startswith("Student against")
    assert len(epsilon["bars"]) == len(report["privacy"]["sites"]) and min(epsilon["bars"]) > 10
    assert len(utility["bars"]) == len(report["evaluation"]["overall"]) and min(utility["bars"]) > 10
