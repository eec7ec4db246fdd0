"""A deployed text (causal-LM) site, without any Flower process: site.toml's [data] text and [student] base, the
state directory it prepares (documents tokenized by the teacher's tokenizer, split in order), `site check`, and a
run.toml whose student is a causal LM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.check import STUDENT_BASE, run_checks
from client.records import TextSchema, load_documents
from client.site import SITE_FILE, Site
from client.sitefile import SiteFile
from distill.causal_lm import tokenize_texts
from distill.data import load_splits
from distill.models import path_digest
from protocols.errors import ConfigError, DataError
from tests.deployment import (BASE_LAYERS, CAUSAL_RUN_TOML, TEXT_MAX_LENGTH, documents_table, fedistill,
                              make_text_site, write_base_student, write_causal_lm_teacher)
from tests.test_causal_lm import tiny_tokenizer

DOCUMENTS = 60


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A coordinator directory, a teacher folder, a base student and one filled-in text site, built once."""
    from coordinator.operator import init_coordinator

    root = tmp_path_factory.mktemp("deploy")
    init_coordinator(root / "coordinator", ["127.0.0.1"], 9556)
    teacher = write_causal_lm_teacher(root / "shared" / "teacher")
    base = write_base_student(teacher, root / "shared" / "base-student")
    site_file = make_text_site(root / "sites", "clinic-a", root / "coordinator", "127.0.0.1:9556", 0, 9711,
                               teacher, base, DOCUMENTS)
    return {"root": root, "teacher": teacher, "base": base, "site_file": site_file}


@pytest.fixture
def site_file(built, tmp_path) -> Path:
    """A fresh copy of the text site (its own state directory) that a test may change."""
    directory = Path(shutil.copytree(built["site_file"].parent, tmp_path / "clinic-a"))
    return directory / "site.toml"


def _edit(site_file: Path, old: str, new: str) -> None:
    text = site_file.read_text()
    assert old in text, old
    site_file.write_text(text.replace(old, new))


def _checks(site_file: Path) -> dict[str, dict]:
    _, items = run_checks(site_file, connect=False)
    return {item.name: {"ok": item.ok, "detail": item.detail} for item in items}


def _expected_splits(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """What the site should store: the documents oldest first, tokenized, those under 2 tokens dropped, 70/10/20."""
    ordered = frame.assign(when=pd.to_datetime(frame["written_at"])).sort_values("when", kind="stable")
    encoded = tokenize_texts(tiny_tokenizer(), ordered["note"].fillna("").tolist(), TEXT_MAX_LENGTH)
    ids = encoded["input_ids"][encoded["attention_mask"].sum(axis=1) >= 2]
    n = len(ids)
    test, val = int(round(0.2 * n)), int(round(0.1 * n))
    return {"train": ids[: n - val - test], "val": ids[n - val - test: n - test], "test": ids[n - test:]}


# --------------------------------------------------------------------------------------------- site.toml


def test_a_text_site_toml_parses_into_a_text_schema_and_its_base_student(site_file: Path) -> None:
    site = SiteFile.load(site_file)
    assert site.text_site
    assert site.schema == TextSchema("note", TEXT_MAX_LENGTH, "patient", "written_at")
    assert site.student_base == site_file.parent / "base-student"
    assert site.teacher_path == site_file.parent / "teacher"


@pytest.mark.parametrize("field", ["label", "classes", "features"])
def test_text_and_classification_fields_are_mutually_exclusive_by_name(site_file: Path, field: str) -> None:
    added = {"label": 'label = "outcome"', "classes": 'classes = ["a", "b"]', "features": 'features = ["f0"]'}[field]
    _edit(site_file, 'text = "note"', f'text = "note"\n{added}')
    with pytest.raises(ConfigError, match=rf"\[data\] text and \[data\] {field}: a site is either a text \(causal-LM\) "
                                          "site or a classification site; remove one"):
        SiteFile.load(site_file)


def test_a_text_site_needs_max_length_and_a_student_base(site_file: Path) -> None:
    original = site_file.read_text()
    _edit(site_file, f"max_length = {TEXT_MAX_LENGTH}", "max_length = 1")
    with pytest.raises(ConfigError, match=r"\[data\] max_length must be an integer >= 2"):
        SiteFile.load(site_file)
    site_file.write_text(original.replace('\n[student]\nbase = "base-student"\n', "\n"))
    with pytest.raises(ConfigError, match=r"table \[student\] is missing; a text \(causal-LM\) site needs \[student\] "
                                          "base"):
        SiteFile.load(site_file)
    site_file.write_text(original.replace('base = "base-student"', 'bsae = "base-student"'))
    with pytest.raises(ConfigError, match=r"\[student\]: unknown field 'bsae' \(did you mean 'base'\?\)"):
        SiteFile.load(site_file)


def test_a_classification_site_refuses_text_only_fields_by_name(site_file: Path) -> None:
    # Turn the text site back into a classification site, leaving one text-only field behind.
    _edit(site_file, 'text = "note"', 'label = "outcome"\nclasses = ["a", "b"]\nfeatures = ["f0"]')
    with pytest.raises(ConfigError, match=r"\[data\] max_length is only for a text \(causal-LM\) site"):
        SiteFile.load(site_file)
    _edit(site_file, f"max_length = {TEXT_MAX_LENGTH}\n", "")
    _edit(site_file, 'order_by = "written_at"\n', "")
    with pytest.raises(ConfigError, match=r"table \[student\] is only for a text \(causal-LM\) site"):
        SiteFile.load(site_file)


def test_a_missing_text_column_names_the_file_and_the_column(site_file: Path) -> None:
    _edit(site_file, 'text = "note"', 'text = "notes"')
    site = SiteFile.load(site_file)
    with pytest.raises(DataError, match=r"data file '.*notes\.csv' has no column\(s\) 'notes'; its columns are note, "
                                        "written_at, patient"):
        load_documents(site.data_path, site.schema)
    checks = _checks(site_file)
    assert checks["data"]["ok"] is False and "no column(s) 'notes'" in checks["data"]["detail"]
    assert checks["teacher"]["ok"] is True  # the teacher does not need the documents to load


def test_an_order_column_that_is_not_a_time_is_refused_without_quoting_it(site_file: Path) -> None:
    frame = pd.read_csv(site_file.parent / "notes.csv")
    frame.assign(written_at="last spring").to_csv(site_file.parent / "notes.csv", index=False)
    site = SiteFile.load(site_file)
    with pytest.raises(DataError, match="order column 'written_at' .* neither numbers nor ISO 8601") as raised:
        load_documents(site.data_path, site.schema)
    assert "last spring" not in str(raised.value)


# --------------------------------------------------------------------------------------------- the state directory


def test_prepare_tokenizes_right_padded_splits_in_order_and_records_the_base_student(site_file: Path) -> None:
    site = SiteFile.load(site_file).prepare_state()
    frame = pd.read_csv(site_file.parent / "notes.csv")
    expected = _expected_splits(frame)
    splits = load_splits(site.data_path)
    assert sorted(splits) == ["test", "train", "val"]
    for name, ids in expected.items():
        split = splits[name]
        np.testing.assert_array_equal(split.inputs["input_ids"], ids)
        mask = split.inputs["attention_mask"]
        assert mask.shape == (len(ids), TEXT_MAX_LENGTH) and (mask.sum(axis=1) >= 2).all()
        # Right padding: every row is ones, then zeros, and the padded positions hold the pad id.
        assert (np.diff(mask, axis=1) <= 0).all() and (split.inputs["input_ids"][mask == 0] == 0).all()
        np.testing.assert_array_equal(split.labels, np.zeros(len(ids), np.int64))
    assert sum(len(s) for s in splits.values()) < DOCUMENTS  # the empty and one-word documents are dropped
    # A person's documents share a group id across the splits (pd.factorize of the patient column).
    assert len(splits["train"].groups) == len(splits["train"]) and splits["train"].max_records_per_person() > 1

    recorded = json.loads((site.state_dir / SITE_FILE).read_text())
    assert recorded["student_base"] == str((site_file.parent / "base-student").resolve())
    assert Site.load(site.state_dir).student_base == (site_file.parent / "base-student").resolve()


def test_without_order_by_the_file_order_is_kept_and_every_document_is_its_own_unit(site_file: Path) -> None:
    _edit(site_file, 'order_by = "written_at"\n', "")
    _edit(site_file, 'person_id = "patient"', 'person_id = ""')
    site = SiteFile.load(site_file).prepare_state()
    frame = pd.read_csv(site_file.parent / "notes.csv")
    encoded = tokenize_texts(tiny_tokenizer(), frame["note"].fillna("").tolist(), TEXT_MAX_LENGTH)
    kept = encoded["input_ids"][encoded["attention_mask"].sum(axis=1) >= 2]
    splits = load_splits(site.data_path)
    np.testing.assert_array_equal(np.concatenate([splits[s].inputs["input_ids"] for s in ("train", "val", "test")]),
                                  kept)
    assert all(splits[s].max_records_per_person() == 1 for s in splits)


def test_a_classification_site_json_has_no_student_base(tmp_path: Path) -> None:
    from tests.helpers import make_site

    site = make_site(tmp_path)
    assert site.student_base is None
    assert "student_base" not in json.loads((site.state_dir / SITE_FILE).read_text())


# --------------------------------------------------------------------------------------------- site check


def test_site_check_passes_a_text_site_and_counts_documents_tokens_and_the_base_digest(built, site_file: Path) -> None:
    checks = _checks(site_file)
    assert all(c["ok"] is not False for c in checks.values()), checks
    assert list(checks) == ["configuration", "data", "teacher", STUDENT_BASE, "privacy budget", "node key",
                            "CA certificate", "coordinator", "node key registered"]
    data = checks["data"]["detail"]
    frame = pd.read_csv(site_file.parent / "notes.csv")
    expected = _expected_splits(frame)
    dropped = DOCUMENTS - sum(len(ids) for ids in expected.values())
    assert data.startswith(f"{DOCUMENTS} documents in text column 'note'; {dropped} dropped (fewer than 2 tokens, "
                           "1 of them empty); split in order of 'written_at', oldest first: ")
    assert f"train {len(expected['train'])} documents / " in data and "person(s)" in data
    assert "reach max_length 12" in data
    for text in frame["note"].dropna():  # counts only, never a text
        assert text not in data or len(text.split()) < 3
    teacher = checks["teacher"]["detail"]
    assert teacher.startswith(f"checkpoint loads (digest {path_digest(site_file.parent / 'teacher')})")
    assert "tokenizer's 48 tokens fit the embedding's 48 rows" in teacher and "logits over 48 tokens" in teacher
    assert "declared training data: public" in teacher
    base = checks[STUDENT_BASE]["detail"]
    assert f"digest {path_digest(built['base'])}" in base and "gemma3_text" in base

    # The CLI prints the same checklist, and exits 0.
    done = fedistill("site", "check", str(site_file), "--offline", "--format", "json", cwd=site_file.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [c["name"] for c in json.loads(done.stdout)["checks"] if c["ok"]][:4] == [
        "configuration", "data", "teacher", STUDENT_BASE]


def test_site_check_and_start_name_a_missing_or_incomplete_base_student(site_file: Path) -> None:
    base = site_file.parent / "base-student"
    shutil.rmtree(base)
    checks = _checks(site_file)
    assert checks[STUDENT_BASE]["ok"] is False
    detail = checks[STUDENT_BASE]["detail"]
    assert f"[student] base '{base}' does not exist; copy the run's base student folder" in detail
    assert checks["data"]["ok"] and checks["teacher"]["ok"]
    with pytest.raises(ConfigError, match=r"\[student\] base '.*base-student' does not exist"):
        SiteFile.load(site_file).prepare_state()
    base.mkdir()
    (base / "config.json").write_text("{}")
    assert "has no weights" in _checks(site_file)[STUDENT_BASE]["detail"]


def test_site_check_fails_a_teacher_that_is_not_a_causal_lm_and_still_reads_the_documents(site_file: Path) -> None:
    (site_file.parent / "teacher.gguf").write_bytes(b"not a gguf file")
    _edit(site_file, 'path = "teacher"', 'path = "teacher.gguf"')
    checks = _checks(site_file)
    teacher = checks["teacher"]
    assert teacher["ok"] is False and "neither a checkpoint folder nor a GGUF file" in teacher["detail"]
    assert checks["data"]["ok"] and "tokens not counted: the teacher did not load" in checks["data"]["detail"]


# --------------------------------------------------------------------------------------------- run.toml


def test_run_toml_carries_a_causal_lm_student_into_the_federation_config(built, tmp_path: Path) -> None:
    from coordinator.launch import RunFile
    from protocols.config import FederationConfig

    root = tmp_path / "operator"
    shutil.copytree(built["root"] / "coordinator", root / "coordinator")
    shutil.copytree(built["base"], root / "base-student")
    digest = path_digest(built["base"])
    text = CAUSAL_RUN_TOML.format(minutes=5, base="base-student", digest=digest, max_length=TEXT_MAX_LENGTH)
    (root / "run.toml").write_text(text)
    run = RunFile.load(root / "run.toml")
    settings = run.federation.student.causal_lm()
    assert run.federation.student.family == "causal_lm"
    # A relative base is the coordinator's folder beside run.toml; the sites use their own [student] base.
    assert settings.base == str((root / "base-student").resolve()) and settings.base_digest == digest
    assert settings.lora is not None and settings.lora.targets == ("q_proj", "v_proj") and settings.top_k == 8
    assert settings.max_length == TEXT_MAX_LENGTH and len(BASE_LAYERS) == 2
    # What the ServerApp receives is the same configuration, hash included.
    sent = FederationConfig.from_dict(json.loads(run.run_config(None)["federation"]))
    assert sent == run.federation and sent.config_hash() == run.federation.config_hash()

    (root / "run.toml").write_text(text.replace(digest, "0" * 64))
    with pytest.raises(ConfigError, match=r"\[federation.student.settings\] base '.*base-student' hashes to "
                                          f"{digest}, not base_digest 0000"):
        RunFile.load(root / "run.toml")
    (root / "run.toml").write_text(text.replace('base = "base-student"', 'base = "elsewhere"'))
    with pytest.raises(ConfigError, match=r"base '.*elsewhere' is not a base student folder"):
        RunFile.load(root / "run.toml")
    (root / "run.toml").write_text(text.replace("top_k = 8", "top_k = 8\ntop_p = 0.9"))
    with pytest.raises(ConfigError, match="unknown field 'top_p'"):
        RunFile.load(root / "run.toml")


def test_documents_table_orders_differ_from_the_file(tmp_path: Path) -> None:
    """The fixture's file order is not its time order, so the split-in-order test means something."""
    frame = documents_table(DOCUMENTS, 0)
    assert not frame["written_at"].is_monotonic_increasing


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_documents_load_from_json_lines_and_parquet_like_csv(tmp_path: Path, suffix: str) -> None:
    frame = documents_table(30, 1)
    frame.to_csv(tmp_path / "d.csv", index=False)
    if suffix == ".jsonl":  # pandas reads a column named *_at of JSON lines as datetimes
        frame.to_json(tmp_path / f"d{suffix}", orient="records", lines=True)
    else:
        frame.to_parquet(tmp_path / f"d{suffix}")
    schema = TextSchema("note", TEXT_MAX_LENGTH, "patient", "written_at")
    expected, loaded = load_documents(tmp_path / "d.csv", schema), load_documents(tmp_path / f"d{suffix}", schema)
    assert loaded.texts == expected.texts and loaded.missing == expected.missing == 1
    np.testing.assert_array_equal(loaded.persons, expected.persons)
