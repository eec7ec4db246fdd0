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
