"""The report of a causal-LM run, and every site's teacher declaration in its DP statement.

The shared small hospitals run is copied and its summary.json rewritten into the causal-LM shape (synthetic
numbers): summary.json is not signed, while metrics.jsonl is checked by fedistill verify against the coordinator's
ledger and stays as the run wrote it, so its rounds carry classification metrics and no perplexity. The teacher
declarations of a site's signed run-accepted event are tested on payload dicts, and once through a whole report
of the same evidence with one site's payload holding the declaration."""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from compliance.render import render_html
from compliance.report import (CAUSAL_LM_LOSS, RunEvidence, build_report, dp_statement, is_not_assessed,
                               load_evidence, report_of, teacher_declaration)
from protocols.errors import DataError
from protocols.ledger import read_events

LABELS = {"teacher": "teacher", "federated": "federated student",
          "undistilled": "undistilled student (same initialisation, no KD)",
          "centralized_distilled": "centralized distilled student (non-private)"}
METRICS = ["perplexity", "top1_agreement", "nll"]
PERPLEXITY = {"teacher": 18.5, "federated": 31.0, "undistilled": 52.0, "centralized_distilled": 26.0}
TOP_K = 32
# Must never reach the report: the summary's causal_lm block is copied field by field, not whole.
SAMPLE_TEXT = "patient reports chest pain since tuesday"
DIGEST = "ab" * 32


def causal_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A classification summary rewritten into the causal-LM shape (docs/report.md, "Causal-LM runs")."""
    sites = list(summary["sites"])

    def scores(model: str, index: int) -> dict[str, Any]:
        perplexity = PERPLEXITY[model] * (1 + index / 10)
        # One site's nll is missing, as from an evaluator that did not compute it: the report shows None.
        return {"perplexity": perplexity, "top1_agreement": 1.0 if model == "teacher" else 0.4 - index / 50,
                "nll": None if index == 1 else round(perplexity ** 0.5, 4)}

    models = {key: {"overall": scores(key, 0),
                    "per_site": {site: {**scores(key, i), "tokens": 4_000 + 100 * i} for i, site in enumerate(sites)}}
              for key in LABELS}
    summary = {key: value for key, value in summary.items() if key != "teacher_forward_passes"}
    summary["privacy"] = {**summary["privacy"], "unit": "one document of a site's training split"}
    return summary | {
        "task": "causal-lm", "headline_metric": "perplexity", "metrics": METRICS,
        "lower_is_better": ["perplexity", "nll"], "model_labels": LABELS, "models": models,
        "comparison": {**{key: models[key]["overall"]["perplexity"] for key in LABELS},
                       "federated_over_centralized": PERPLEXITY["federated"] / PERPLEXITY["centralized_distilled"],
                       "federated_over_undistilled": PERPLEXITY["federated"] / PERPLEXITY["undistilled"]},
        "sites": {site: {split: {"records": counts["records"], "tokens": 60 * counts["records"],
                                 "persons": counts["persons"]} for split, counts in splits.items()}
                  for site, splits in summary["sites"].items()},
        "class_names": [],
        "size": {"measure": "parameters",
                 "teacher": {"total": 268_098_176, "embedding": 167_772_160, "non_embedding": 100_326_016},
                 "student": {"total": 184_219_264, "embedding": 167_772_160, "non_embedding": 16_447_104,
                             "trainable": 1_474_560},
                 "non_embedding_ratio": 0.164, "student_file_bytes": 5_898_240, "teacher_file_bytes": 536_223_232,
                 "latency_ms_per_token": {"teacher": 4.1, "student": 1.2, "speedup": 3.4}},
        "causal_lm": {
            "teacher": {"kind": "gguf", "source": "gemma-3-270m-it-Q8_0.gguf", "digest": DIGEST,
                        "description": "Gemma 3 270M, instruction-tuned", "sample": SAMPLE_TEXT},
            "fragments": "lora", "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
            "top_k": TOP_K, "temperatures": [1.0, 1.25, 2.0, 5.0, 10.0], "divergence": "reverse_kl",
            "tail": "one extra outcome holding the teacher's probability mass outside its top k (docs/causal_lm.md)",
            "max_length": 128,
            "cache": {site: {"positions": 9_000 + i, "bytes": 2_124_000 + i, "teacher_forward_passes": 1,
                             "digest": f"{i:02x}" * 32, "first_text": SAMPLE_TEXT} for i, site in enumerate(sites)},
            "vocabulary": {"subset": True, "student_tokens": 8_192, "teacher_tokens": 262_144,
                           "kept_teacher_tokens": 8_191, "dropped_teacher_tokens": 253_953,
                           "chosen_from": "the most frequent teacher tokens of the public corpus",
                           "held_out_token_coverage": 0.97, "oov_rule": "a held-out token outside the subset costs "
                                                                        "-log p(<oov>) + log(dropped tokens)",
                           "most_frequent": [SAMPLE_TEXT]},
            "sent_per_round": {site: {"bytes": 5_898_240, "tensors": 72, "rounds": 2} for site in sites},
            "exported_student": f"/somewhere/{SAMPLE_TEXT}"},
    }


@pytest.fixture(scope="module")
def causal_run(verified_run, tmp_path_factory) -> Path:
    run_dir = Path(shutil.copytree(verified_run, tmp_path_factory.mktemp("causal") / "run"))
    path = run_dir / "summary.json"
    path.write_text(json.dumps(causal_summary(json.loads(path.read_text())), indent=2))
    return run_dir


@pytest.fixture(scope="module")
def summary(causal_run) -> dict[str, Any]:
    return json.loads((causal_run / "summary.json").read_text())


@pytest.fixture(scope="module")
def report(causal_run) -> dict[str, Any]:
    return build_report(causal_run)


def test_the_evaluation_has_one_row_per_model_label_with_the_causal_metrics(report, summary):
    evaluation = report["evaluation"]
    assert report["run"]["task"] == "causal-lm" and evaluation["headline_metric"] == "perplexity"
    assert evaluation["metrics"] == METRICS and evaluation["lower_is_better"] == ["perplexity", "nll"]
    assert [row["model"] for row in evaluation["overall"]] == list(LABELS.values())
    for row, key in zip(evaluation["overall"], LABELS):
        assert list(row) == ["model", *METRICS]
        assert row["perplexity"] == summary["models"][key]["overall"]["perplexity"]
    assert not any("local-only" in row["model"] for rows in [evaluation["overall"], *evaluation["per_site"].values()]
                   for row in rows)
    assert set(evaluation["per_site"]) == set(summary["sites"])
    for site, rows in evaluation["per_site"].items():
        assert [row["model"] for row in rows] == list(LABELS.values())
        assert [row["tokens"] for row in rows] == [summary["models"][k]["per_site"][site]["tokens"] for k in LABELS]
    second = list(summary["sites"])[1]
    assert all(row["nll"] is None for row in evaluation["per_site"][second])
    assert "perplexity over every predicted real token" in evaluation["data"]
    assert evaluation["baselines_reference"] == {key: PERPLEXITY[key] for key in LABELS if key != "federated"}
    # metrics.jsonl is the signed one of a classification run: every round is there, its causal metrics None.
    assert [r["round"] for r in evaluation["per_round"]] == [1, 2]
    assert all(r[m] is None for r in evaluation["per_round"] for m in METRICS)
    assert report["verification"]["verified"] is True  # summary.json is not signed; the run still verifies


def test_the_model_card_documents_the_token_level_distillation_and_copies_no_text(report, summary):
    card = report["model_card"]
    facts = summary["causal_lm"]
    assert card["causal_lm"]["top_k"] == facts["top_k"] == TOP_K
    assert card["causal_lm"]["cache"] == {site: {k: v for k, v in cache.items() if k != "first_text"}
                                          for site, cache in facts["cache"].items()}
    assert card["causal_lm"]["sent_per_round"] == facts["sent_per_round"]
    assert card["causal_lm"]["vocabulary"]["student_tokens"] == 8_192 and "exported_student" not in card["causal_lm"]
    distillation = card["distillation"]
    assert distillation["loss"] == CAUSAL_LM_LOSS and "tail bucket" in distillation["loss"]
    assert (distillation["divergence"], distillation["top_k"], distillation["temperatures"]) == \
        ("reverse_kl", TOP_K, facts["temperatures"])
    assert "never sent" in distillation["transfer_set"] and "training texts" in distillation["transfer_set"]
    teacher = card["teacher"]
    assert (teacher["digest"], teacher["kind"], teacher["description"]) == \
        (DIGEST, "gguf", "Gemma 3 270M, instruction-tuned")
    assert teacher["size"]["student"]["non_embedding"] == 16_447_104 and teacher["size"]["non_embedding_ratio"] == 0.164
    assert teacher["size"]["latency_ms_per_token"]["speedup"] == 3.4
    assert card["model"]["parameters"] == 184_219_264
    assert "federated perplexity is 1.192 times the centrally distilled student's" in " ".join(card["caveats"])
    assert "federated perplexity is 0.5962 times the undistilled student's" in " ".join(card["caveats"])
    # Only counts, digests and settings: a text the summary carries never reaches the report.
    assert SAMPLE_TEXT not in json.dumps(report)


def test_data_flows_say_the_top_k_cache_stays_at_each_site(report, summary):
    flows = report["data_flows"]
    cache = flows["teacher_cache"]
    assert "never sent" in cache["stays_at_site"] and set(cache["sites"]) == set(summary["sites"])
    for site, row in cache["sites"].items():
        expected = summary["causal_lm"]["cache"][site]
        assert (row["positions"], row["bytes"], row["digest"]) == \
            (expected["positions"], expected["bytes"], expected["digest"])
        # A synthetic digest: no teacher-targets-cached event of the site's ledger records it.
        assert is_not_assessed(row["ledger_event"])
        assert row["sent_per_round_bytes"] == 5_898_240
        assert row["update_bytes_median_in_ledger"] == statistics.median(u["bytes"]
                                                                         for u in flows["sites"][site]["updates"])
    assert any("top-k cache" in item for item in flows["never_leaves"])


def test_the_dp_statement_is_for_one_document_and_shows_the_declared_teacher(causal_run, report):
    for site, block in report["privacy"]["sites"].items():
        # The shared run is person-level where its records name persons of several records: a person's documents.
        if block["unit"] == "person":
            assert block["unit_of_privacy"] == "one person (all of their documents in the site's training split)"
            assert "persons), adding or removing one person with all of their documents" in block["statement"]
        else:
            assert block["unit_of_privacy"] == "one document of the site's training split"
            assert "documents), adding or removing one document" in block["statement"]
        assert block["statement"] == dp_statement(site, block)
        # What the site's signed run-accepted event declares (or that it declares nothing), read from its ledger.
        accepted = [e["payload"] for e in read_events(causal_run / "sites" / site / "ledger.jsonl")
                    if e["kind"] == "run-accepted"]
        assert block["teacher"] == teacher_declaration(accepted[0], private=True)


def test_the_html_renders_the_causal_fields(report):
    page = render_html(report)
    assert "top1 agreement" in page and "No round of metrics.jsonl records the federated student's perplexity" in page
    assert "The teacher's top-k cache: it stays at each site" in page
    assert "Per site: the top-k cache (kept at the site)" in page and "tensors sent per round" in page
    assert "local-only" not in page
    assert SAMPLE_TEXT not in page
    # The renderer reads only report.json: rounds that did record perplexity are plotted, lower being better.
    rounds = [{**r, "perplexity": 40.0 - r["round"]} for r in report["evaluation"]["per_round"]]
    plotted = render_html({**report, "evaluation": {**report["evaluation"], "per_round": rounds}})
    assert "Federated student perplexity per round" in plotted and "perplexity (lower is better)</text>" in plotted


def test_a_causal_lm_summary_without_its_causal_lm_block_is_refused_naming_the_field(causal_run, tmp_path):
    run_dir = Path(shutil.copytree(causal_run, tmp_path / "run"))
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["causal_lm"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match=r"summary\.json: a causal-LM summary needs field\(s\) causal_lm"):
        build_report(run_dir)


# ------------------------------------------------------------------------------- the teacher declaration
def declared(training_data: str, acknowledged: bool = False) -> dict[str, Any]:
    """A run-accepted payload with a teacher declaration (client.teacher.check_teacher_for_run's record)."""
    return {"run_id": "r", "teacher": {"digest": "sha256:" + DIGEST, "training_data": training_data,
                                       "acknowledged_non_dp": acknowledged, "description": "a teacher"}}


def test_public_and_private_dp_teachers_keep_the_guarantee():
    public = teacher_declaration(declared("public"), private=True)
    assert public["guarantee_void"] is False and public["training_data"] == "public"
    assert public["digest"] == "sha256:" + DIGEST and "keeps the guarantee" in public["effect"]
    private_dp = teacher_declaration(declared("private-dp"), private=True)
    assert private_dp["guarantee_void"] is False
    assert "composes" in private_dp["effect"] and "the site's to state" in private_dp["effect"]


def test_a_private_acknowledged_teacher_voids_the_guarantee_of_a_dp_run_only():
    void = teacher_declaration(declared("private", acknowledged=True), private=True)
    assert void["guarantee_void"] is True and void["acknowledged_non_dp"] is True
    assert "VOIDS" in void["effect"] and "cannot change the targets of the other records" in void["effect"]
    # Without DP in the run there is no guarantee to void.
    assert teacher_declaration(declared("private", acknowledged=True), private=False)["guarantee_void"] is None


def test_an_absent_declaration_is_not_assessed():
    for payload in (None, {"run_id": "r"}):
        absent = teacher_declaration(payload, private=True)
        assert absent["guarantee_void"] is None and is_not_assessed(absent["training_data"])
        assert "absent" in absent["declared_in"] and is_not_assessed(absent["effect"])


def test_the_dp_statement_says_the_guarantee_is_void_and_regenerates(report):
    site, block = next(iter(report["privacy"]["sites"].items()))
    statements = {}
    for name, payload in (("public", declared("public")), ("private-dp", declared("private-dp")),
                          ("void", declared("private", acknowledged=True)), ("absent", None)):
        statements[name] = dp_statement(site, {**block, "teacher": teacher_declaration(payload, private=True)})
    assert statements["void"].startswith(f"Site {site}'s document-level differential-privacy guarantee is VOID")
    assert "cannot change the targets of the other records" in statements["void"]
    assert "public data only" in statements["public"] and "VOID" not in statements["public"]
    assert "composes with this one" in statements["private-dp"]
    assert "declares nothing about its teacher" in statements["absent"]


def with_teacher(ev: RunEvidence, site: str, declaration: dict[str, Any]) -> RunEvidence:
    """The same evidence with ``declaration`` in the site's run-accepted payload (in memory: the ledger on disk is
    signed, and what verify says about it is unchanged)."""
    files = ev.sites[site]
    events = tuple({**e, "payload": {**e["payload"], "teacher": declaration}} if e["kind"] == "run-accepted" else e
                   for e in files.ledger.events)
    return replace(ev, sites={**ev.sites, site: replace(files, ledger=replace(files.ledger, events=events))})


def test_a_void_guarantee_is_flagged_in_the_dp_statement_the_model_card_and_the_html(causal_run):
    ev = load_evidence(causal_run)
    site = next(iter(ev.sites))
    report = report_of(with_teacher(ev, site, declared("private", acknowledged=True)["teacher"]))
    privacy = report["privacy"]
    assert privacy["federation"]["guarantee_void_at"] == [site]
    assert f"void at {site}" in privacy["federation"]["statement"]
    block = privacy["sites"][site]
    assert block["teacher"]["guarantee_void"] is True and block["teacher"]["training_data"] == "private"
    assert block["statement"] == dp_statement(site, block) and "VOID" in block["statement"]
    for other, kept in privacy["sites"].items():
        if other != site:
            assert kept["teacher"]["guarantee_void"] is not True and "VOID" not in kept["statement"]
    assert any(f"site {site}" in caveat and "void" in caveat for caveat in report["model_card"]["caveats"])
    page = render_html(report)
    assert f"Record-level DP guarantee VOID at site {site}" in page and f"VOID at {site}:" in page
