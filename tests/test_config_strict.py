"""Configuration fails closed: a misspelt field in site.toml, run.toml or the federation config is refused by name,
with the nearest valid name, through the CLI as a new user meets it; errors on a pipe are plain lines."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from protocols.config import FederationConfig
from protocols.errors import ConfigError
from tests.deployment import FEDISTILL, RUN_TOML
from tests.helpers import MLP

# Colour forced on, as CI systems often do: errors written to a pipe must still carry no escape codes.
COLOUR_ENV = os.environ | {"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDISTILL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=COLOUR_ENV)


def assert_plain_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "\x1b" not in done.stderr and done.stderr.endswith("\n"), repr(done.stderr)
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    done = cli("site", "init", "site-a", "--name", "hospital-a", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "site-a" / "site.toml"


def test_a_misspelt_per_run_cap_is_refused_by_site_check_and_site_start(site_file: Path) -> None:
    text = site_file.read_text()
    assert "\nepsilon_per_run = " in text
    site_file.write_text(text.replace("\nepsilon_per_run = ", "\nepsilon_per_rnu = "))
    expected = (f"{site_file} [privacy]: unknown field 'epsilon_per_rnu' (did you mean 'epsilon_per_run'?)")

    checked = cli("site", "check", str(site_file), "--offline", "--format", "json", cwd=site_file.parent)
    result = json.loads(checked.stdout)
    assert checked.returncode == 1 and not result["ok"]
    assert result["checks"][0] == {"name": "configuration", "ok": False, "detail": result["checks"][0]["detail"]}
    assert expected in result["checks"][0]["detail"]

    table = cli("site", "check", str(site_file), "--offline", cwd=site_file.parent)
    assert table.returncode == 1 and "\x1b" not in table.stdout
    assert expected in table.stdout and "ready to join" not in table.stdout

    assert_plain_error(cli("site", "start", str(site_file), cwd=site_file.parent), "error: " + expected)


def test_an_unknown_table_in_site_toml_is_named_with_the_nearest_table(site_file: Path) -> None:
    site_file.write_text(site_file.read_text().replace("[privacy]", "[privcy]"))
    done = cli("site", "check", str(site_file), "--offline", "--format", "json", cwd=site_file.parent)
    detail = json.loads(done.stdout)["checks"][0]["detail"]
    assert done.returncode == 1 and "unknown field 'privcy' (did you mean 'privacy'?)" in detail


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("wait_for_sites = 3", "wait_for_site = 3", "run.toml: unknown field 'wait_for_site' (did you mean 'wait_for_sites'?)"),
    ("rounds = 2", "roundz = 2", "run.toml [federation]: unknown field 'roundz' (did you mean 'rounds'?)"),
    ("settings = {", "setting = {", "run.toml [federation] student: unknown field 'setting' (did you mean 'settings'?)"),
])
def test_a_misspelt_run_toml_field_is_refused_by_fedistill_run(tmp_path: Path, old: str, new: str,
                                                               expected: str) -> None:
    # Refused while reading run.toml, before the coordinator directory is even looked at.
    text = RUN_TOML.format(minutes=5)
    assert old in text
    (tmp_path / "run.toml").write_text(text.replace(old, new))
    assert_plain_error(cli("run", "run.toml", cwd=tmp_path), "error: ", expected)


def test_federation_config_names_the_misspelt_field_and_the_nearest_one() -> None:
    with pytest.raises(ConfigError, match=r"run config: unknown field 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        FederationConfig.from_dict({"student": MLP.to_dict(), "learning_rat": 0.1})
    with pytest.raises(ConfigError, match=r"unknown field 'famly' \(did you mean 'family'\?\)"):
        FederationConfig.from_dict({"student": {"famly": "mlp"}})


def test_errors_of_the_deployment_commands_are_plain_lines_on_a_pipe(tmp_path: Path) -> None:
    assert_plain_error(cli("site", "start", "missing.toml", cwd=tmp_path), "error: ", "missing.toml' does not exist")
    assert_plain_error(cli("coordinator", "sites", "--dir", "nowhere", cwd=tmp_path),
                       "is not a coordinator directory")


def test_the_site_chooses_how_its_test_metrics_leave_and_an_unknown_choice_is_refused_by_name(tmp_path: Path) -> None:
    from client.sitefile import SiteFile
    from tests.deployment import make_site

    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_bytes(b"")  # SiteFile.load reads the path, not the certificate
    site_file = make_site(tmp_path, "site-a", tmp_path, "127.0.0.1:9092", 0, 9094)
    assert SiteFile.load(site_file).policy.test_metrics == "noised"  # what a new site starts with
    text = site_file.read_text()
    site_file.write_text(text.replace('\ntest_metrics = "noised"', '\ntest_metrics = "clear"'))
    assert SiteFile.load(site_file).policy.test_metrics == "clear"
    site_file.write_text(text.replace('\ntest_metrics = "noised"', '\ntest_metrics = "rounded"'))
    with pytest.raises(ConfigError, match=r"\[privacy\] test_metrics must be one of noised, clear, none"):
        SiteFile.load(site_file)
