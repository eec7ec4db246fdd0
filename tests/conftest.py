import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def verified_run(tmp_path_factory):
    """One small real run (3 sites, 2 rounds, SecAgg+, DP) shared by the verify and report tests: never modify it.

    The federated stage alone, the shape a deployed run has today (tests/test_curriculum.py covers the stages)."""
    from tests.test_cli_simulate import run_cli

    out = tmp_path_factory.mktemp("runs")
    result = run_cli("simulate", "--stages", "federated", "--sites", "3", "--rounds", "2", "--subsample", "0.25",
                     "--local-steps", "5",
                     "--seed", "4", "--out", str(out), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(json.loads(result.stdout)["paths"]["run_dir"])


@pytest.fixture
def run_copy(verified_run, tmp_path):
    """A copy of the shared run that a test may alter."""
    return Path(shutil.copytree(verified_run, tmp_path / "run"))


# The example hospital consortium's parties.toml (examples/parties/) and, for two of the three sites of the small
# run, their [governance] tables: the third states none, so the report must mark its fields not assessed.
PARTIES_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "parties" / "hospitals.toml"
GOVERNED_SITES = ("clinical-lab", "emergency-dept")


@pytest.fixture(scope="session")
def declared_run(tmp_path_factory):
    """The shared small run's twin, given the example parties.toml and two sites' governance: never modify it."""
    import tomllib

    import tomli_w

    from tests.test_cli_simulate import run_cli

    out = tmp_path_factory.mktemp("declared")
    example = tomllib.loads((PARTIES_EXAMPLE.parent / "hospitals-site-governance.toml").read_text())
    governance = out / "site-governance.toml"
    governance.write_text(tomli_w.dumps({"schema_version": 1, "governance": {
        site: table for site, table in example["governance"].items() if site in GOVERNED_SITES}}))
    result = run_cli("simulate", "--stages", "federated", "--sites", "3", "--rounds", "2", "--subsample", "0.25",
                     "--local-steps", "5", "--seed", "4", "--out", str(out / "runs"), "--format", "json",
                     "--parties", str(PARTIES_EXAMPLE), "--site-governance", str(governance))
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(json.loads(result.stdout)["paths"]["run_dir"])
