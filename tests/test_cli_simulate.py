"""End-to-end through the CLI: `fedistill simulate` on a subsample of the hospitals scenario."""

import json
import os
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
    return out


QUICK_RUN = ("simulate", "--scenario", "hospitals", "--sites", "3", "--rounds", "2", "--subsample", "0.25",
             "--local-steps", "20", "--seed", "3", "--format", "json")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    result = run_cli(*QUICK_RUN, "--out", str(tmp_path_factory.mktemp("runs")))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_simulate_writes_a_complete_run_directory(first_run):
    summary = first_run
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


@pytest.mark.slow
def test_same_seed_gives_the_same_numbers(first_run, tmp_path):
    # DP noise and sampling are seeded; SecAgg+ rounds stochastically (unseeded, within its stated error
    # bound), so ranking metrics agree closely while threshold-dependent ones (kappa) may move.
    result = run_cli(*QUICK_RUN, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = first_run, json.loads(result.stdout)
    assert first["paths"]["run_dir"] != second["paths"]["run_dir"] and first["run_id"] == second["run_id"]
    a, b = headline_numbers(first), headline_numbers(second)
    assert {k: v for k, v in a.items() if k != "federated"} == {k: v for k, v in b.items() if k != "federated"}
    assert a["federated"] == pytest.approx(b["federated"], abs=2e-3)


@pytest.mark.slow
def test_single_class_sites_report_undefined_metrics_instead_of_crashing(tmp_path):
    result = run_cli("simulate", "--stages", "federated", "--sites", "4", "--rounds", "1", "--subsample", "0.1",
                     "--local-steps", "5", "--out", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    per_site = json.loads(result.stdout)["models"]["federated"]["per_site"]
    assert per_site["nicu"]["roc_auc"] is None and "single class" in per_site["nicu"]["undefined"]


# Each case starts the CLI in a fresh process: three stay in the default suite, the others run with the slow tests.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("args,named", [
    (("--scenario", "moon-base"), "--scenario"),
    pytest.param(("--sites", "99"), "--sites", marks=SLOW),
    (("--rounds", "0"), "--rounds"),
    pytest.param(("--subsample", "0"), "--subsample", marks=SLOW),
    pytest.param(("--fragment-plan", "random"), "--fragment-plan", marks=SLOW),
    pytest.param(("--local-steps", "0"), "--local-steps", marks=SLOW),
    (("--epsilon", "abc"), "--epsilon"),
    pytest.param(("--epsilon", "1,-3"), "--epsilon", marks=SLOW),
    pytest.param(("--site-cap", "atlantis=3"), "--site-cap", marks=SLOW),
    pytest.param(("--accountant", "gdp"), "--accountant", marks=SLOW),
    pytest.param(("--delta", "0.5"), "--delta", marks=SLOW),
    pytest.param(("--drop-rate", "1.5"), "--drop-rate", marks=SLOW),
    pytest.param(("--fail-site", "nicu"), "--fail-site", marks=SLOW),
])
def test_bad_input_exits_non_zero_naming_the_option(tmp_path, args, named):
    result = run_cli("simulate", *args, "--out", str(tmp_path), timeout=120)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
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
    # The free alternative: the same student distilled on the official test file (the teacher's public set) alone.
    assert summary["models"]["public_only"]["overall"]["n"] == summary["models"]["federated"]["overall"]["n"]


# The federated stage alone: these tests are about rounds, caps and refusals (tests/test_curriculum.py runs the stages).
QUICK = ("--stages", "federated", "--rounds", "4", "--subsample", "0.25", "--local-steps", "10", "--seed", "2")


def site_privacy(summary: dict, site: str) -> tuple[dict, "PrivacyState"]:
    from protocols.accounting import PrivacyState

    state_dir = Path(summary["paths"]["run_dir"]) / "sites" / site
    return summary["privacy"]["sites"][site], PrivacyState.load(state_dir)


@pytest.mark.slow
def test_a_site_whose_cap_is_reached_mid_run_refuses_and_the_others_finish(tmp_path):
    from protocols.accounting import epsilon_of

    # Four sites: after one refuses, three remain, SecAgg+'s smallest cohort.
    result = run_cli("simulate", *QUICK, "--sites", "4", "--epsilon", "8", "--site-cap", "emergency-dept=6",
                     "--out", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    # --stages federated: the single stage, from a fresh student at the scenario's own rate, as before curricula.
    assert [stage["stage"] for stage in summary["stages"]] == ["federated"]
    federation = json.loads((Path(summary["paths"]["run_dir"]) / "config.json").read_text())["federation"]
    assert "curriculum" not in federation and federation["learning_rate"] == 0.3
    capped, state = site_privacy(summary, "emergency-dept")
    assert capped["rounds_trained"] and capped["rounds_refused"]
    assert max(capped["rounds_trained"]) < min(capped["rounds_refused"])  # it trains, then refuses every later round
    run_spends = state.run_spends(summary["run_id"])
    assert epsilon_of(run_spends, capped["delta"], "prv") == pytest.approx(capped["epsilon"]) and capped["epsilon"] <= 6
    # Refused rounds spent nothing; the final student's noised test evaluation, planned from the start, was charged.
    assert [s.round for s in run_spends if s.mechanism == "dp-sgd"] == capped["rounds_trained"]
    assert [s.mechanism for s in run_spends if s.mechanism != "dp-sgd"] == ["evaluation"]
    assert summary["stopped"] is None and summary["failed_rounds"] == []
    for name, site in summary["privacy"]["sites"].items():
        if name != "emergency-dept":
            assert site["rounds_trained"] == [1, 2, 3, 4] and site["epsilon"] <= 8.0
    assert set(summary["refusals"]) == {str(r) for r in capped["rounds_refused"]}
    assert "emergency-dept" in summary["refusals"][str(capped["rounds_refused"][0])]


@pytest.mark.slow
def test_the_run_stops_cleanly_when_too_few_sites_accept(tmp_path):
    result = run_cli("simulate", *QUICK, "--sites", "3", "--epsilon", "8", "--site-cap", "clinical-lab=6",
                     "--min-sites", "3",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "run stopped in round" in result.stdout
    run_dir = Path(result.stdout.split("run directory:")[1].split()[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["stopped"]["round"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["aggregated"] * (stopped - 1) + ["stopped"]
    # The student stays as the last aggregated round left it.
    assert records[-1]["student_digest"] == records[-2]["student_digest"]
    checkpoint = json.loads((run_dir / "student" / "checkpoint.json").read_text())
    assert checkpoint["round"] == stopped - 1


@pytest.mark.slow
def test_epsilon_sweep_reports_utility_against_privacy(tmp_path):
    result = run_cli("simulate", "--stages", "federated", "--sites", "3", "--rounds", "2", "--subsample", "0.25",
                     "--local-steps", "10", "--epsilon", "2,inf", "--out", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.loads(result.stdout)
    assert [row["target_epsilon"] for row in sweep["levels"]] == ["2", "inf"]
    private, public = sweep["levels"]
    assert all(0 < eps <= 2.0 for eps in private["epsilon_spent"].values())
    assert set(public["epsilon_spent"].values()) == {"inf"}
    assert all(0.0 <= row["federated"]["roc_auc"] <= 1.0 for row in sweep["levels"])
    assert 0.5 < sweep["baselines"]["public_only"] <= 1.0
    sweep_dir = Path(sweep["sweep_dir"])
    assert json.loads((sweep_dir / "sweep.json").read_text()) == sweep
    assert {p.name for p in sweep_dir.iterdir() if p.is_dir()} == {"epsilon-2", "epsilon-inf"}


@pytest.mark.slow
def test_a_site_that_crashes_mid_round_leaves_the_round_to_the_survivors(tmp_path):
    # Four sites: the three survivors still make SecAgg+'s min_cohort, so their sum is used.
    result = run_cli("simulate", "--stages", "federated", "--sites", "4", "--rounds", "2", "--subsample", "0.25",
                     "--local-steps", "5", "--fail-site", "emergency-dept:2", "--out", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    records = [json.loads(line) for line in Path(summary["paths"]["metrics"]).read_text().splitlines()]
    assert [r["status"] for r in records] == ["aggregated", "aggregated"]
    assert "emergency-dept" in records[0]["participants"] and records[0]["failures"] == {}
    assert records[1]["participants"] == sorted(set(summary["sites"]) - {"emergency-dept"})
    [reason] = records[1]["failures"].values()
    assert "injected failure: site emergency-dept crashed in round 2" in reason
    assert summary["site_failures"] == {"2": records[1]["failures"]}
