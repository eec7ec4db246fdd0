"""What only people know: parties.toml and each site's [governance], parsed at the boundary, refused by file and
field when malformed, recorded in the coordinator's and the sites' ledgers, and mapped to the declared regimes
only (protocols/governance.py, compliance/crosswalk.py). The report they fill is tested on a whole run in
tests/test_report.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from client.site import SITE_FILE, Site
from client.sitefile import SiteFile
from compliance.crosswalk import crosswalk_of
from coordinator.app import coordinator_from_run_config
from coordinator.rounds import Coordinator
from fedistill.cli import app
from protocols.errors import ConfigError
from protocols.governance import (PARTIES_EVENT, REGIMES, Governance, PartiesDeclaration, load_parties,
                                  load_site_governance)
from protocols.ledger import read_events
from tests.conftest import PARTIES_EXAMPLE
from tests.deployment import RUN_TOML
from tests.helpers import federation
from tests.test_teacher_declaration import filled_site_toml

EXAMPLES = PARTIES_EXAMPLE.parent
MINIMAL = 'schema_version = 1\n[coordinator]\nlegal_entity = "Consortium"\n[sites.site-a]\njurisdiction = "DE"\n'


def test_the_shipped_examples_parse_and_their_digest_is_of_their_content() -> None:
    hospitals, banks = load_parties(EXAMPLES / "hospitals.toml"), load_parties(EXAMPLES / "banks.toml")
    assert hospitals.regime_keys == ("gdpr", "hipaa") and banks.regime_keys == ("eu_ai_act", "gdpr", "glba", "sr_11_7")
    assert banks.regime("eu_ai_act").use_case == "credit-scoring"
    # Read back from the content a ledger holds, it is the same declaration with the same digest.
    again = PartiesDeclaration.from_dict(json.loads(json.dumps(hospitals.to_dict())), "ledger")
    assert again == hospitals and again.digest == hospitals.digest and hospitals.source_sha256
    for name in ("hospitals", "banks"):
        assert load_site_governance(EXAMPLES / f"{name}-site-governance.toml")


@pytest.mark.parametrize(("text", "named"), [
    (MINIMAL.replace("legal_entity", "legal_entiy"), r"\[coordinator\]: unknown field 'legal_entiy' \(did you mean "
                                                     r"'legal_entity'\?\)"),
    (MINIMAL + 'role = ["owner"]\n', r"\[sites.site-a\] role names 'owner'; each role must be one of"),
    (MINIMAL + '[[agreements]]\nid = "A-1"\nkind = "DPA"\nparties = ["coordinator", "site-z"]\n',
     r"\[\[agreements\]\] #1 parties names site-z, which the file does not declare"),
    (MINIMAL + '[[agreements]]\nid = "A-1"\nkind = "DPA"\nparties = ["site-a"]\nsha256 = "abc"\n',
     r"\[\[agreements\]\] #1 sha256 must be 64 lowercase hex digits"),
    (MINIMAL + '[regimes.eu_ai_act]\nrole = "provider"\n', r"\[regimes.eu_ai_act\] use_case is missing; set it to "
                                                           r"one of credit-scoring, medical-device, other"),
    (MINIMAL + '[regimes.eu_ai_act]\nrole = "provider"\nuse_case = "scoring"\n',
     r"\[regimes.eu_ai_act\] use_case must be one of credit-scoring"),
    (MINIMAL + "[regimes.pci_dss]\n", r"unknown regime \[regimes.pci_dss\]; declare one of \[regimes.hipaa\]"),
    (MINIMAL + '[intended_use]\npurpose = "FILL IN"\n', r"\[intended_use\] purpose must be what the model is for"),
    (MINIMAL.replace("schema_version = 1", "schema_version = 2"), r"schema_version 2 is not 1"),
])
def test_a_malformed_parties_toml_is_refused_naming_the_file_and_the_field(tmp_path: Path, text: str,
                                                                            named: str) -> None:
    path = tmp_path / "parties.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named) as caught:
        load_parties(path)
    assert str(path) in str(caught.value)


def test_simulate_refuses_a_malformed_parties_toml_before_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "parties.toml"
    path.write_text(MINIMAL + '[sites.site-b]\nrole = ["controler"]\n')
    result = CliRunner().invoke(app, ["simulate", "--parties", str(path), "--out", str(tmp_path / "runs")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "parties.toml" in output and "[sites.site-b] role names 'controler'" in output
    assert not (tmp_path / "runs").exists()


def test_simulate_refuses_site_governance_for_a_site_the_run_does_not_have(tmp_path: Path) -> None:
    path = tmp_path / "governance.toml"
    path.write_text('schema_version = 1\n[governance.clinical-lab]\nerasure = "after the study"\n'
                    '[governance.clinical-labb]\nerasure = "after the study"\n')
    result = CliRunner().invoke(app, ["simulate", "--sites", "3", "--subsample", "0.1", "--site-governance", str(path),
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--site-governance names unknown site(s) clinical-labb" in " ".join(
        result.output.split())
    bad = tmp_path / "bad.toml"
    bad.write_text('schema_version = 1\n[governance.clinical-lab]\ndeidentification = "hashed"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml \[governance.clinical-lab\] deidentification must be one of "
                                          r"identified, pseudonymised"):
        load_site_governance(bad)


GOVERNANCE = """
[governance]
lawful_basis = "GDPR Art. 6(1)(e) and 9(2)(j)"
data_subjects = ["patients"]
data_categories = ["laboratory results"]
special_categories = []
deidentification = "expert-determination"
deidentification_reference = "ED-7"
erasure = "12 months after the study"
"""


def test_site_toml_governance_is_parsed_into_site_json_and_refused_by_field_when_malformed(tmp_path: Path) -> None:
    import pandas as pd

    path = filled_site_toml(tmp_path, 'training_data = "public"')
    path.write_text(path.read_text() + GOVERNANCE)
    site_file = SiteFile.load(path)
    assert site_file.governance == Governance("GDPR Art. 6(1)(e) and 9(2)(j)", ("patients",), ("laboratory results",),
                                              (), "expert-determination", "ED-7", "12 months after the study")
    pd.DataFrame({"f0": [0.1, -0.2, 0.3, -0.4], "outcome": ["negative", "positive"] * 2}).to_csv(
        tmp_path / "records.csv", index=False)
    site = site_file.prepare_state()
    assert json.loads((site.state_dir / SITE_FILE).read_text())["governance"]["deidentification_reference"] == "ED-7"
    assert Site.load(site.state_dir).governance == site_file.governance

    path.write_text(path.read_text().replace('deidentification_reference = "ED-7"\n', ""))
    with pytest.raises(ConfigError, match=r"site\.toml: \[governance\] deidentification = \"expert-determination\" "
                                          r"needs deidentification_reference"):
        SiteFile.load(path)
    path.write_text(path.read_text() + 'lawful_bases = "x"\n')
    with pytest.raises(ConfigError, match=r"\[governance\]: unknown field 'lawful_bases' \(did you mean "
                                          r"'lawful_basis'\?\)"):
        SiteFile.load(path)


def test_the_coordinator_signs_the_parties_declaration_before_the_first_round(tmp_path: Path) -> None:
    parties = load_parties(PARTIES_EXAMPLE)
    coordinator = Coordinator(federation(), "run-1", tmp_path / "run-1", parties=parties)
    coordinator.instruction(1)  # the first instruction needs the signed checkpoint, so the ledger is opened
    kinds = [(e["kind"], e["payload"]) for e in read_events(tmp_path / "run-1" / "ledger.jsonl")]
    assert [kind for kind, _ in kinds] == ["run-started", PARTIES_EVENT, "checkpoint"]
    declared = kinds[1][1]
    assert declared["digest"] == parties.digest and declared["parties"] == parties.to_dict()
    assert declared["source_sha256"] == parties.source_sha256
    # A resumed coordinator refuses another declaration than the one the run started with.
    other = PartiesDeclaration.from_dict({**parties.to_dict(), "regimes": {}}, "other")
    with pytest.raises(ConfigError, match="resume with the parties.toml the run started with"):
        Coordinator(federation(), "run-1", tmp_path / "run-1", parties=other).resume()


def test_run_toml_names_the_parties_and_the_server_app_records_them(tmp_path: Path) -> None:
    from coordinator.launch import RunFile

    init = CliRunner().invoke(app, ["coordinator", "init", str(tmp_path / "coordinator"), "--host", "127.0.0.1"])
    assert init.exit_code == 0, init.output
    shutil.copyfile(PARTIES_EXAMPLE, tmp_path / "parties.toml")
    text = RUN_TOML.format(minutes=5).replace("[federation]", 'parties = "parties.toml"\n\n[federation]', 1)
    (tmp_path / "run.toml").write_text(text)
    run = RunFile.load(tmp_path / "run.toml")
    assert run.parties == load_parties(PARTIES_EXAMPLE)
    config = run.run_config(None)
    coordinator, _ = coordinator_from_run_config(SimpleNamespace(run_config=config, run_id=4242))
    coordinator.instruction(1)
    events = read_events(run.out_dir / "4242" / "ledger.jsonl")
    assert events[1]["kind"] == PARTIES_EVENT and events[1]["payload"]["digest"] == run.parties.digest

    (tmp_path / "parties.toml").write_text(MINIMAL + '[regimes.eu_ai_act]\nuse_case = "other"\n')
    with pytest.raises(ConfigError, match=r"parties\.toml \[regimes.eu_ai_act\] role is missing"):
        RunFile.load(tmp_path / "run.toml")


def test_an_ai_act_credit_scoring_declaration_is_high_risk_and_maps_articles_9_to_15() -> None:
    # The crosswalk is a function of the report's other sections: a minimal report of a verified deployed run.
    banks = load_parties(EXAMPLES / "banks.toml")
    report = minimal_report([{"key": key, "regime": REGIMES[key], **banks.regime(key).to_dict()}
                             for key in banks.regime_keys])
    crosswalk = crosswalk_of(report)
    assert crosswalk["regimes_declared"] == ["EU AI Act", "GDPR", "GLBA Safeguards Rule", "SR 11-7"]
    assert "HIPAA" not in {row["regime"] for row in crosswalk["rows"]}
    ai_act = {row["clause"]: row for row in crosswalk["rows"] if row["regime"] == "EU AI Act"}
    classification = ai_act["Art. 6, Annex III"]
    assert classification["status"] == "met" and "high-risk" in classification["basis"]
    assert "Annex III point 5(b)" in classification["basis"] and "Articles 9-15 follow" in classification["basis"]
    assert {f"Art. {n}" for n in range(9, 16)} <= set(ai_act)
    sr = {row["clause"]: row for row in crosswalk["rows"] if row["regime"] == "SR 11-7"}
    assert sr["model inventory and ownership"]["status"] == "met"
    glba = {row["clause"]: row for row in crosswalk["rows"] if row["regime"] == "GLBA Safeguards Rule"}
    assert glba["16 CFR 314.4(a)"]["status"] == "met" and "CISO" in glba["16 CFR 314.4(a)"]["basis"]

    other = crosswalk_of(minimal_report([{"key": "eu_ai_act", "regime": "EU AI Act", "role": "deployer",
                                          "use_case": "other"}]))
    assert [(row["clause"], row["status"]) for row in other["rows"]] == [("Art. 6, Annex III", "not applicable")]
    assert crosswalk_of(minimal_report([]))["rows"] == []


def minimal_report(regimes: list[dict]) -> dict:
    """The fields the crosswalk reads, as a report of a verified run with DP and SecAgg+ holds them."""
    from compliance.report import SECTIONS

    site = {"name": "bank-a", "legal_entity": "Bank A", "privacy_officer": "dpo@a", "jurisdiction": "US-NY"}
    return {
        "sections": [{"key": key, "number": number, "title": title} for key, number, title in SECTIONS],
        "envelope": {"subjects": [{"path": "ledger.jsonl", "sha256": "ab" * 32}]},
        "run": {"regimes_asserted": regimes, "intended_purpose": "credit scoring", "deployment": {}},
        "verification": {"verified": True}, "lineage": {"final_weights_check": {"result": "ok"}},
        "privacy": {"target_epsilon": 3.0}, "secure_aggregation": {"enabled": True, "transport": {"tls": "x"}},
        "data_flows": {"sites": {"bank-a": {"ledger_error": None}}}, "access_control": {"note": "deployment"},
        "audit_trail": {"verification": {}}, "evaluation": {"overall": "not assessed: no evaluation"},
        "parties": {"coordinator": {**site, "name": "coordinator"}, "sites": [site], "agreements": []},
        "data_inventory": {"sites": {"bank-a": {"lawful_basis": "GLBA", "erasure_schedule": "25 months",
                                                "categories_of_subjects_and_data": {}, "deidentification": "none"}}},
    }
