"""Every site declares what its teacher was trained on; a DP run refuses a private, non-DP teacher unless the
site acknowledges that its record-level guarantee is then void (client/teacher.py, docs/privacy.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.check import run_checks
from client.site import SITE_FILE, Site, create_site
from client.sitefile import FIELDS, TEMPLATE, SiteFile
from client.teacher import TEACHER_TRAINING_DATA, TeacherDeclaration, check_teacher_for_run
from protocols.errors import ConfigError, UpdateRejected
from tests.helpers import make_site, tabular_split

DIGEST = "sha256:" + "ab" * 32


def test_the_three_declarations_and_the_template_offers_them() -> None:
    assert TEACHER_TRAINING_DATA == ("public", "private-dp", "private")
    assert FIELDS["teacher"] == ("path", "training_data", "acknowledge_non_dp", "description")
    assert 'training_data = "FILL IN: public, private-dp or private"' in TEMPLATE
    assert "acknowledge_non_dp = false" in TEMPLATE


def test_an_unknown_training_data_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\[teacher\] training_data must be one of public, private-dp, private, "
                                          r"got 'x'"):
        TeacherDeclaration("x")


@pytest.mark.parametrize("training_data", ["public", "private-dp"])
def test_acknowledge_non_dp_is_only_for_a_private_teacher(training_data: str) -> None:
    with pytest.raises(ConfigError, match=r"\[teacher\] acknowledge_non_dp = true is only for training_data = "
                                          r"\"private\".*got training_data = '" + training_data):
        TeacherDeclaration(training_data, acknowledge_non_dp=True)
    assert TeacherDeclaration("private", acknowledge_non_dp=True).acknowledge_non_dp is True


def test_field_types_are_checked_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\[teacher\] acknowledge_non_dp must be true or false"):
        TeacherDeclaration("private", acknowledge_non_dp="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[teacher\] description must be a string"):
        TeacherDeclaration("public", description=3)  # type: ignore[arg-type]


def test_from_dict_round_trips_and_refuses_unknown_or_missing_fields() -> None:
    declaration = TeacherDeclaration("private", acknowledge_non_dp=True, description="fine-tuned on our notes")
    assert TeacherDeclaration.from_dict(declaration.to_dict()) == declaration
    with pytest.raises(ConfigError, match=r"unknown field 'acknowledge_non_db' \(did you mean 'acknowledge_non_dp'\?\)"):
        TeacherDeclaration.from_dict({"training_data": "private", "acknowledge_non_db": True})
    with pytest.raises(ConfigError, match=r"\[teacher\] training_data is missing"):
        TeacherDeclaration.from_dict({"description": "no declaration"})


def test_a_dp_run_refuses_a_private_unacknowledged_teacher_naming_the_site_and_the_remedies() -> None:
    with pytest.raises(UpdateRejected) as caught:
        check_teacher_for_run(TeacherDeclaration("private"), True, "hospital-a", DIGEST)
    message = str(caught.value)
    assert "site 'hospital-a'" in message and "without differential privacy" in message
    for remedy in ('"private-dp"', '"public"', "acknowledge_non_dp = true", "site.toml",
                   "record-level guarantee as void"):
        assert remedy in message, remedy


def test_an_acknowledged_private_teacher_is_accepted_and_recorded_as_such() -> None:
    declaration = TeacherDeclaration("private", acknowledge_non_dp=True, description="fine-tuned on site notes")
    assert check_teacher_for_run(declaration, True, "hospital-a", DIGEST) == {
        "digest": DIGEST, "training_data": "private", "acknowledged_non_dp": True,
        "description": "fine-tuned on site notes"}


@pytest.mark.parametrize("training_data", TEACHER_TRAINING_DATA)
def test_a_non_private_run_accepts_any_teacher_and_still_records_it(training_data: str) -> None:
    record = check_teacher_for_run(TeacherDeclaration(training_data), False, "hospital-a", DIGEST)
    assert record == {"digest": DIGEST, "training_data": training_data, "acknowledged_non_dp": False,
                      "description": ""}


@pytest.mark.parametrize("training_data", ["public", "private-dp"])
def test_a_dp_run_accepts_a_public_or_dp_teacher(training_data: str) -> None:
    record = check_teacher_for_run(TeacherDeclaration(training_data), True, "hospital-a", DIGEST)
    assert record["training_data"] == training_data and record["acknowledged_non_dp"] is False


# site.toml ------------------------------------------------------------------------------------------------------


def filled_site_toml(directory: Path, teacher_lines: str) -> Path:
    """The template filled in as a site engineer would, with ``teacher_lines`` in place of the declaration."""
    text = TEMPLATE.format(name="hospital-a", site_file="site.toml")
    for old, new in [('"FILL IN: host:port"', '"127.0.0.1:9092"'), ('"FILL IN: records.csv"', '"records.csv"'),
                     ('label = "FILL IN"', 'label = "outcome"'), ('features = ["FILL IN"]', 'features = ["f0"]'),
                     ('"FILL IN: teacher.pkl"', '"teacher.pkl"')]:
        assert old in text, old
        text = text.replace(old, new)
    lines = text.splitlines(keepends=True)
    start = lines.index('training_data = "FILL IN: public, private-dp or private"\n')
    assert lines[start + 1].startswith("acknowledge_non_dp = false") and lines[start + 2].startswith('description = ""')
    text = "".join(lines[:start] + [teacher_lines + "\n"] + lines[start + 3:])
    path = directory / "site.toml"
    path.write_text(text)
    return path


def test_site_toml_without_training_data_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = filled_site_toml(tmp_path, "")
    with pytest.raises(ConfigError, match=r"\[teacher\] training_data must be set to one of public, private-dp, "
                                          r"private"):
        SiteFile.load(path)


def test_the_unfilled_template_declaration_is_refused(tmp_path: Path) -> None:
    path = filled_site_toml(tmp_path, 'training_data = "FILL IN: public, private-dp or private"')
    with pytest.raises(ConfigError, match=r"\[teacher\] training_data must be set"):
        SiteFile.load(path)


def test_site_toml_with_an_unknown_teacher_field_is_refused(tmp_path: Path) -> None:
    path = filled_site_toml(tmp_path, 'training_data = "public"\ntraining_set = "public"')
    with pytest.raises(ConfigError, match=r"\[teacher\]: unknown field 'training_set' \(did you mean "
                                          r"'training_data'\?\)"):
        SiteFile.load(path)


def test_site_toml_validation_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = filled_site_toml(tmp_path, 'training_data = "public"\nacknowledge_non_dp = true')
    with pytest.raises(ConfigError, match=r"site\.toml: \[teacher\] acknowledge_non_dp = true is only for"):
        SiteFile.load(path)
    path = filled_site_toml(tmp_path, 'training_data = "pubic"')
    with pytest.raises(ConfigError, match=r"site\.toml: \[teacher\] training_data must be one of"):
        SiteFile.load(path)
    path = filled_site_toml(tmp_path, 'training_data = "private"\nacknowledge_non_dp = "yes"')
    with pytest.raises(ConfigError, match=r"\[teacher\] acknowledge_non_dp must be true or false"):
        SiteFile.load(path)


def test_site_toml_declaration_is_parsed_and_carried_into_site_json(tmp_path: Path) -> None:
    import pandas as pd

    path = filled_site_toml(tmp_path, 'training_data = "private"\nacknowledge_non_dp = true\n'
                                      'description = "fine-tuned on this clinic\'s notes"')
    site_file = SiteFile.load(path)
    expected = TeacherDeclaration("private", acknowledge_non_dp=True, description="fine-tuned on this clinic's notes")
    assert site_file.teacher_declaration == expected
    pd.DataFrame({"f0": [0.1, -0.2, 0.3, -0.4], "outcome": ["negative", "positive"] * 2}).to_csv(
        tmp_path / "records.csv", index=False)
    site = site_file.prepare_state()
    assert site.teacher_declaration == expected
    assert json.loads((site.state_dir / SITE_FILE).read_text())["teacher_declaration"] == expected.to_dict()


# site.json -------------------------------------------------------------------------------------------------------


def test_create_site_and_site_load_keep_the_declaration(tmp_path: Path) -> None:
    teacher_site = make_site(tmp_path)
    declaration = TeacherDeclaration("private-dp", description="trained with DP-SGD at epsilon 2 on our archive")
    splits = {"train": tabular_split(8, 1)}
    site = create_site(tmp_path / "dp-teacher", "dp-teacher", splits, teacher_site.teacher_path,
                       teacher_declaration=declaration)
    assert site.teacher_declaration == declaration
    assert Site.load(site.state_dir).teacher_declaration == declaration
    assert json.loads((site.state_dir / SITE_FILE).read_text())["teacher_declaration"] == {
        "training_data": "private-dp", "acknowledge_non_dp": False,
        "description": "trained with DP-SGD at epsilon 2 on our archive"}


def test_create_site_requires_a_declaration(tmp_path: Path) -> None:
    teacher_site = make_site(tmp_path)
    with pytest.raises(TypeError, match="teacher_declaration"):
        create_site(tmp_path / "x", "x", {"train": tabular_split(8, 1)}, teacher_site.teacher_path)  # type: ignore


def test_a_site_json_without_a_declaration_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    path = site.state_dir / SITE_FILE
    raw = json.loads(path.read_text())
    del raw["teacher_declaration"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"site\.json: field 'teacher_declaration' is missing.*fedistill site start"):
        Site.load(site.state_dir)


def test_a_site_json_with_a_bad_declaration_is_refused_naming_the_file(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    path = site.state_dir / SITE_FILE
    raw = json.loads(path.read_text())
    raw["teacher_declaration"]["trained_on"] = "public"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"site\.json teacher_declaration: unknown field 'trained_on'"):
        Site.load(site.state_dir)


# site check ------------------------------------------------------------------------------------------------------


def _teacher_item(site_toml: Path):
    _, items = run_checks(site_toml, connect=False)
    return {item.name: item for item in items}["teacher"]


def test_site_check_states_the_declaration_and_fails_a_private_unacknowledged_teacher(tmp_path: Path) -> None:
    import pickle

    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    teacher = LogisticRegression().fit([[-1.0], [1.0], [-2.0], [2.0]], [0, 1, 0, 1])
    (tmp_path / "teacher.pkl").write_bytes(pickle.dumps(teacher))
    pd.DataFrame({"f0": [0.1, -0.2, 0.3, -0.4], "outcome": ["positive", "negative"] * 2}).to_csv(
        tmp_path / "records.csv", index=False)

    public = _teacher_item(filled_site_toml(tmp_path, 'training_data = "public"\ndescription = "public model"'))
    assert public.ok is True and "\ndeclared training data: public (public model)" in public.detail

    refused = _teacher_item(filled_site_toml(tmp_path, 'training_data = "private"'))
    assert refused.ok is False and "declared training data: private" in refused.detail
    assert "will refuse every differentially private run" in refused.detail

    acknowledged = _teacher_item(filled_site_toml(tmp_path, 'training_data = "private"\nacknowledge_non_dp = true'))
    assert acknowledged.ok is True and "record-level guarantee as void" in acknowledged.detail

    # Even when the records fail (so the teacher is not loaded), a declaration DP runs refuse still fails.
    (tmp_path / "records.csv").write_text("f0\n0.1\n")
    assert _teacher_item(filled_site_toml(tmp_path, 'training_data = "public"')).ok is None
    assert _teacher_item(filled_site_toml(tmp_path, 'training_data = "private"')).ok is False
