"""A deployed bank site feeds its raw table (categorical columns, raw amounts, missing values) through the run's
preprocessor (site.toml ``[data] preprocessor``): ``site check`` names every mismatch of columns, numbers,
categories, feature width and classes, and a round whose pinned ``preprocessing_digest`` is not the site's is refused
before anything is spent."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from client.preprocessing import preprocessor_digest
from client.records import load_raw_records
from client.sitefile import SiteFile
from client.train import consider_round
from coordinator.rounds import Coordinator
from distill.models import save_sklearn_teacher
from distill.preprocessing import PREPROCESSOR_FILE, fit_preprocessor, load_preprocessor
from fedistill.cli import app
from protocols.accounting import PrivacyState
from protocols.config import StudentSpec
from protocols.errors import ConfigError, DataError, UpdateRejected
from protocols.ledger import read_events
from protocols.messages import TrainInstruction
from simulations.banks import PREPROCESSING, load_bank_customers
from tests.helpers import federation

# The public slice the operator fits the preprocessing and the teacher on, and the bank's own customers: disjoint.
PUBLIC_ROWS, BANK_ROWS = slice(0, 3000), slice(3000, 3300)
BANK_STUDENT = StudentSpec("mlp", {"input_dim": 4, "hidden": [8], "num_classes": 2})


@dataclass(frozen=True)
class Consortium:
    """What the operator ships a bank (the preprocessor, the teacher, the CA) and the bank's raw table."""

    preprocessor: Path
    digest: str
    teacher: Path
    ca_certificate: Path
    table: pd.DataFrame


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    root = tmp_path_factory.mktemp("consortium")
    customers = load_bank_customers()
    public = customers.iloc[PUBLIC_ROWS]
    preprocessor = fit_preprocessor(PREPROCESSING, public)
    digest = preprocessor.save(root / PREPROCESSOR_FILE)
    teacher = LogisticRegression(max_iter=500).fit(preprocessor.transform(public, "public slice"),
                                                   preprocessor.labels(public, "public slice"))
    save_sklearn_teacher(teacher, root / "teacher.pkl")
    init = CliRunner().invoke(app, ["coordinator", "init", str(root / "coordinator"), "--host", "127.0.0.1"])
    assert init.exit_code == 0, init.output
    table = customers.iloc[BANK_ROWS].reset_index(drop=True)
    # A bank's table has gaps: the preprocessing imputes them with the public median and mode.
    table["age"] = table["age"].astype(float).mask(table.index % 50 == 7)
    table["late_april"] = table["late_april"].mask(table.index % 60 == 11)
    return Consortium(root / PREPROCESSOR_FILE, digest, root / "teacher.pkl",
                      root / "coordinator" / "certs" / "ca.crt", table)


def bank_site(root: Path, consortium: Consortium, table: pd.DataFrame | None = None,
              teacher: Path | None = None) -> Path:
    """``site init``, the operator's files beside site.toml, and the template filled in for a raw table: the
    preprocessor replaces label, classes and features. Returns the site.toml path."""
    directory = root / "bank-a"
    init = CliRunner().invoke(app, ["site", "init", str(directory), "--name", "bank-a"])
    assert init.exit_code == 0, init.output
    (consortium.table if table is None else table).to_csv(directory / "customers.csv", index=False)
    shutil.copyfile(consortium.preprocessor, directory / PREPROCESSOR_FILE)
    shutil.copyfile(teacher or consortium.teacher, directory / "teacher.pkl")
    shutil.copyfile(consortium.ca_certificate, directory / "ca.crt")
    site_file = directory / "site.toml"
    text = site_file.read_text()
    for old, new in [('"FILL IN: host:port"', '"127.0.0.1:9092"'), ('"FILL IN: records.csv"', '"customers.csv"'),
                     ('"FILL IN: teacher.pkl"', '"teacher.pkl"'),
                     ('"FILL IN: public, private-dp or private"', '"public"'),
                     ('#   preprocessor = "preprocessor.skops"', 'preprocessor = "preprocessor.skops"')]:
        assert old in text, old
        text = text.replace(old, new)
    site_file.write_text("\n".join(line for line in text.splitlines()
                                   if not line.startswith(("label = ", "classes = ", "features = "))) + "\n")
    return site_file


def site_check(site_file: Path, *options: str) -> tuple[int, dict[str, dict]]:
    result = CliRunner().invoke(app, ["site", "check", str(site_file), "--offline", "--format", "json", *options])
    return result.exit_code, {item["name"]: item for item in json.loads(result.stdout)["checks"]}


def run_config(path: Path, **overrides: object) -> Path:
    """The run's config.json as the operator ships it (the run directory's: the federation config under
    ``federation``)."""
    config = federation(**({"student": BANK_STUDENT, "target_epsilon": 4.0} | overrides))
    path.write_text(json.dumps({"schema_version": 1, "run_id": "run-1", "federation": config.to_dict(),
                                "config_hash": config.config_hash()}))
    return path


def test_a_raw_bank_table_passes_site_check_through_the_run_preprocessor(consortium: Consortium,
                                                                         tmp_path: Path) -> None:
    site_file = bank_site(tmp_path, consortium)
    code, checks = site_check(site_file, "--run-config", str(run_config(tmp_path / "config.json",
                                                                          preprocessing_digest=consortium.digest)))
    assert code == 0, checks
    assert all(checks[name]["ok"] for name in ("configuration", "preprocessing", "data", "teacher", "run config"))
    assert f"SHA-256 {consortium.digest}" in checks["preprocessing"]["detail"]
    assert "late_april (categorical: no, yes)" in checks["preprocessing"]["detail"]
    assert checks["data"]["detail"].startswith("300 records, 3 raw column(s) made into 4 feature(s)")
    assert "label 'late_sept'" in checks["data"]["detail"]
    assert "input_dim 4 features, the preprocessor gives 4" in checks["run config"]["detail"]


def test_site_start_state_holds_the_preprocessed_records_and_a_copy_of_the_preprocessor(consortium: Consortium,
                                                                                     tmp_path: Path) -> None:
    site = SiteFile.load(bank_site(tmp_path, consortium))
    assert site.schema.person_id == "customer_id" and site.schema.classes == ("on-time", "late")
    state = site.prepare_state()
    assert preprocessor_digest(state.state_dir) == consortium.digest
    splits = state.splits()
    assert sum(len(split) for split in splits.values()) == 300
    assert splits["train"].inputs["x"].dtype == np.float32 and splits["train"].inputs["x"].shape[1] == 4
    assert np.isfinite(splits["train"].inputs["x"]).all()  # the missing ages and payment states were imputed
    # JSON lines and Parquet read the same as CSV.
    csv = site.data_path
    consortium.table.to_json(csv.with_suffix(".jsonl"), orient="records", lines=True)
    consortium.table.to_parquet(csv.with_suffix(".parquet"))
    expected = load_raw_records(csv, site.preprocessor, "customer_id")
    for other in (csv.with_suffix(".jsonl"), csv.with_suffix(".parquet")):
        loaded = load_raw_records(other, site.preprocessor, "customer_id")
        np.testing.assert_allclose(loaded.inputs["x"], expected.inputs["x"], rtol=1e-6)
        np.testing.assert_array_equal(loaded.labels, expected.labels)
        np.testing.assert_array_equal(loaded.groups, expected.groups)
    # A site.toml that no longer names a preprocessor leaves none behind for the rounds to find.
    site_file = site.path
    site_file.write_text(site_file.read_text().replace('preprocessor = "preprocessor.skops"', "").replace(
        "[data]\n", '[data]\nlabel = "late_sept"\nclasses = ["on-time", "late"]\nfeatures = ["age"]\n'))
    consortium.table.fillna({"age": 40}).to_csv(csv, index=False)
    assert preprocessor_digest(SiteFile.load(site_file).prepare_state().state_dir) is None


def test_site_check_names_a_renamed_column(consortium: Consortium, tmp_path: Path) -> None:
    site_file = bank_site(tmp_path, consortium, consortium.table.rename(columns={"bill_april": "april_bill"}))
    code, checks = site_check(site_file)
    assert code == 1 and checks["data"]["ok"] is False and checks["teacher"]["ok"] is None
    assert "no column(s) 'bill_april' that the run's preprocessing reads" in checks["data"]["detail"]
    assert "customers.csv" in checks["data"]["detail"]


def test_site_check_names_a_category_the_public_data_never_had(consortium: Consortium, tmp_path: Path) -> None:
    table = consortium.table.copy()
    table.loc[3, "late_april"] = "maybe"
    code, checks = site_check(bank_site(tmp_path, consortium, table))
    assert code == 1 and checks["data"]["ok"] is False
    assert ("categorical column 'late_april' has 1 category the public reference data never had ('maybe')"
            in checks["data"]["detail"])


def test_site_check_names_amounts_written_with_currency_signs(consortium: Consortium, tmp_path: Path) -> None:
    table = consortium.table.assign(bill_april=[f"${value:,}" for value in consortium.table["bill_april"]])
    code, checks = site_check(bank_site(tmp_path, consortium, table))
    assert code == 1 and checks["data"]["ok"] is False
    assert "column 'bill_april' is read as a number" in checks["data"]["detail"]


def test_site_check_names_a_teacher_fitted_on_another_width(consortium: Consortium, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    wide = tmp_path / "wide-teacher.pkl"
    save_sklearn_teacher(LogisticRegression().fit(x, x[:, 0] > 0), wide)
    code, checks = site_check(bank_site(tmp_path, consortium, teacher=wide))
    assert code == 1 and checks["data"]["ok"] is True and checks["teacher"]["ok"] is False
    assert "the preprocessor gives 4 features but the teacher reads 5" in checks["teacher"]["detail"]


def test_site_check_names_a_run_whose_student_or_preprocessing_is_not_the_sites(consortium: Consortium,
                                                                                tmp_path: Path) -> None:
    site_file = bank_site(tmp_path, consortium)
    wrong = run_config(tmp_path / "config.json", student=StudentSpec("mlp", {"input_dim": 5, "hidden": [8],
                                                                             "num_classes": 3}),
                       preprocessing_digest="0" * 64)
    code, checks = site_check(site_file, "--run-config", str(wrong))
    detail = checks["run config"]["detail"]
    assert code == 1 and checks["run config"]["ok"] is False
    assert "the run's student reads input_dim 5 features, the preprocessor gives 4" in detail
    assert "the run's student has 3 classes, this site 2 (on-time, late)" in detail
    assert f"preprocessor has SHA-256 {consortium.digest}, but the run pins preprocessing_digest {'0' * 64}" in detail
    code, checks = site_check(site_file, "--run-config", str(run_config(tmp_path / "none.json")))
    assert code == 1 and "the run pins no preprocessing_digest" in checks["run config"]["detail"]


def test_site_toml_classes_or_features_other_than_the_specs_are_refused_by_name(consortium: Consortium,
                                                                                tmp_path: Path) -> None:
    site_file = bank_site(tmp_path, consortium)
    text = site_file.read_text()
    site_file.write_text(text.replace("[data]\n", '[data]\nclasses = ["late", "on-time"]\n'))
    code, checks = site_check(site_file)
    assert code == 1 and checks["configuration"]["ok"] is False
    assert ("[data] classes is ['late', 'on-time'], but the teacher's logit order is the run's preprocessing "
            "spec's, ['on-time', 'late']") in checks["configuration"]["detail"]
    site_file.write_text(text.replace("[data]\n", '[data]\nclasses = ["on-time", "late"]\n'
                                                  'features = ["age", "bill_april"]\n'))
    with pytest.raises(ConfigError, match=r"\[data\] features is \['age', 'bill_april'\], but the run's "
                                          r"preprocessing .* reads the raw columns \['age', 'bill_april', "
                                          r"'late_april'\]"):
        SiteFile.load(site_file)
    site_file.write_text(text.replace("[data]\n", '[data]\nfeatures = ["age", "bill_april", "late_april"]\n'))
    assert SiteFile.load(site_file).schema.features == ("age", "bill_april", "late_april")


def _instruction(tmp_path: Path, digest: str | None) -> TrainInstruction:
    instruction = Coordinator(federation(student=BANK_STUDENT, target_epsilon=4.0), "run-1",
                              tmp_path / "run").instruction(1)
    return replace(instruction, preprocessing_digest=digest)


def test_a_round_pinning_another_preprocessing_is_refused_before_anything_is_spent(consortium: Consortium,
                                                                                  tmp_path: Path) -> None:
    state = SiteFile.load(bank_site(tmp_path, consortium)).prepare_state()
    for digest, reason in (("0" * 64, f"preprocessor has SHA-256 {consortium.digest}, but the run pins "
                                      f"preprocessing_digest {'0' * 64}"),
                           (None, "the run pins no preprocessing_digest")):
        with pytest.raises(UpdateRejected, match=reason):
            consider_round(state, _instruction(tmp_path / str(digest), digest))
    # Nothing calibrated, spent or recorded: the run was never accepted.
    privacy = PrivacyState.load(state.state_dir)
    assert not privacy.spends and not privacy.calibrations and not privacy.refusals
    ledger = state.state_dir / "ledger.jsonl"
    assert not ledger.is_file() or not [e for e in read_events(ledger) if e["kind"] == "run-accepted"]

    # The run's own preprocessing is accepted, and the site records which one in its run-accepted event.
    consider_round(state, _instruction(tmp_path / "pinned", consortium.digest))
    accepted = [e["payload"] for e in read_events(ledger) if e["kind"] == "run-accepted"]
    assert accepted[0]["preprocessing_digest"] == consortium.digest

    # A site without a preprocessor refuses a run that pins one.
    (state.state_dir / PREPROCESSOR_FILE).unlink()
    with pytest.raises(UpdateRejected, match="this site has no preprocessor: set \\[data\\] preprocessor"):
        consider_round(state, _instruction(tmp_path / "other", consortium.digest))


def test_the_instruction_carries_the_pinned_digest(tmp_path: Path) -> None:
    instruction = _instruction(tmp_path, "ab" * 32)
    assert TrainInstruction.from_config(instruction.to_config()) == instruction
    with pytest.raises(UpdateRejected, match="'preprocessing-digest' must be a hex SHA-256"):
        TrainInstruction.from_config(instruction.to_config() | {"preprocessing-digest": "not a digest"})


def test_load_preprocessor_refuses_a_tampered_file_and_a_file_of_other_types(consortium: Consortium,
                                                                            tmp_path: Path) -> None:
    import skops.io as sio

    tampered = tmp_path / PREPROCESSOR_FILE
    tampered.write_bytes(consortium.preprocessor.read_bytes() + b"\0")
    with pytest.raises(DataError, match=f"but the run pins preprocessing_digest {consortium.digest}"):
        load_preprocessor(tampered, expected_digest=consortium.digest)
    other = tmp_path / "model.skops"
    sio.dump(LogisticRegression(), other)
    with pytest.raises(DataError, match="holds type\\(s\\) sklearn.linear_model._logistic.LogisticRegression"):
        load_preprocessor(other)
