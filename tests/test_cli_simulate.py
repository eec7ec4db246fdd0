"""End-to-end through the CLI: `fedistill simulate` on a subsample of the hospitals scenario."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FEDISTILL = [sys.executable, "-m", "fedistill"]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", COLUMNS="120")
    return subprocess.run([*FEDISTILL, *args], capture_output=True, text=True, timeout=timeout, env=env)


def headline_numbers(summary: dict) -> dict:
    models = summary["models"]
    out = {key: round(models[key]["overall"]["roc_auc"], 4)
           for key in ("teacher", "federated", "centralized_distilled", "centralized_labels_only")}
    out["local_only_mean"] = round(models["local_only"]["roc_auc"]["mean"], 4)
    out["federated_kappa"] = round(models["federated"]["overall"]["kappa"], 4)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = ("simulate", "--scenario", "hospitals", "--sites", "3", "--rounds", "2", "--subsample", "0.25",
            "--local-steps", "20", "--seed", "3", "--out", str(out), "--format", "json")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    return json.loads(first.stdout), json.loads(second.stdout)


def test_simulate_writes_a_complete_run_directory(two_runs):
    summary, _ = two_runs
    run_dir = Path(summary["paths"]["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config_hash"] == summary["config_hash"] and config["federation"]["rounds"] == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert (run_dir / "student" / "model.safetensors").is_file()
    assert json.loads((run_dir / "student" / "checkpoint.json").read_text())["config_hash"] == summary["config_hash"]
    assert len(summary["sites"]) == 3 and summary["rounds"] == 2 and summary["failed_rounds"] == []
    assert summary["size"]["ratio"] <= 0.1
    # Each site ran its teacher once, in round 1; round 2 and the baselines used the cache.
    assert set(summary["teacher_forward_passes"].values()) == {1}
    federated = summary["models"]["federated"]
    assert set(federated["per_site"]) == set(summary["sites"])
    assert 0.0 <= federated["overall"]["roc_auc"] <= 1.0
    assert federated["threshold"] is not None


def test_same_seed_gives_the_same_numbers(two_runs):
    first, second = two_runs
    assert first["run_id"] != second["run_id"]
    assert headline_numbers(first) == headline_numbers(second)


def test_single_class_sites_report_undefined_metrics_instead_of_crashing(tmp_path):
    result = run_cli("simulate", "--sites", "4", "--rounds", "1", "--subsample", "0.1", "--local-steps", "5",
                     "--out", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    per_site = json.loads(result.stdout)["models"]["federated"]["per_site"]
    assert per_site["nicu"]["roc_auc"] is None and "single class" in per_site["nicu"]["undefined"]


@pytest.mark.parametrize("args,named", [
    (("--scenario", "moon-base"), "--scenario"),
    (("--sites", "99"), "--sites"),
    (("--rounds", "0"), "--rounds"),
    (("--subsample", "0"), "--subsample"),
    (("--fragment-plan", "random"), "--fragment-plan"),
    (("--local-steps", "0"), "--local-steps"),
])
def test_bad_input_exits_non_zero_naming_the_option(tmp_path, args, named):
    result = run_cli("simulate", *args, "--out", str(tmp_path), timeout=120)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_drug_reviews_transformers_path_end_to_end(tmp_path):
    result = run_cli("simulate", "--scenario", "drug-reviews", "--rounds", "1", "--subsample", "0.3",
                     "--local-steps", "2", "--out", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    student_dir = Path(summary["paths"]["student"])
    assert (student_dir / "config.json").is_file() and (student_dir / "model.safetensors").is_file()
    assert summary["size"]["measure"] == "parameters" and summary["size"]["ratio"] <= 0.1
    assert set(summary["teacher_forward_passes"].values()) == {1}
    assert summary["class_names"] == ["negative", "neutral", "positive"]
