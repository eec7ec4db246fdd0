"""The knowledge channel: soft labels on a registered proxy set reach the coordinator only as the SecAgg+ mean, the
proxy set is checked by digest, inadmissible sources are refused by name, and every mode runs through the CLI."""

import json

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

import coordinator.secure_round as secure_round
from client.site import create_site
from coordinator.rounds import Coordinator
from distill.evaluate import softmax
from distill.models import SklearnTeacher, save_sklearn_teacher
from fedistill.cli import app
from protocols.canonical import sha256_hex
from protocols.errors import ConfigError, UpdateRejected
from protocols.knowledge import (PROXY_FILE, KnowledgeSettings, check_soft_labels, load_proxy,
                                 proxy_file_bytes)
from protocols.secagg import site_weight
from simulations.engine import run_federation
from tests.helpers import PUBLIC_TEACHER, federation, tabular_split

SIZES = {"north": 40, "south": 64, "east": 100}
PROXY_RECORDS = 30


def knowledge_settings(proxy: bytes, **changes) -> dict:
    return {"mode": "hybrid", "source": "public-teacher", "proxy_digest": sha256_hex(proxy),
            "proxy_records": PROXY_RECORDS, "classes": 2, "temperature": 2.0, "server_steps": 5,
            "server_batch_size": 16} | changes


def test_a_single_private_teacher_and_unknown_sources_are_refused_by_name():
    base = {"mode": "knowledge", "proxy_digest": "ab" * 32, "proxy_records": 10, "classes": 2}
    with pytest.raises(ConfigError, match="private-teacher.*one record can change all of its outputs"):
        KnowledgeSettings.from_dict(base | {"source": "private-teacher"})
    with pytest.raises(ConfigError, match="field 'source' must be one of local-student, public-teacher, pate"):
        KnowledgeSettings.from_dict(base | {"source": "oracle"})
    with pytest.raises(ConfigError, match="field 'proxy_digest'"):
        KnowledgeSettings.from_dict(base | {"source": "local-student", "proxy_digest": "not-a-digest"})
    with pytest.raises(ConfigError, match="secure_aggregation"):
        federation(secure_aggregation=False, knowledge=base | {"source": "local-student"})


def test_a_weights_run_keeps_its_config_hash_and_a_knowledge_run_changes_it():
    plain = federation()
    assert "knowledge" not in plain.to_dict()
    knowledge = federation(knowledge={"mode": "knowledge", "source": "local-student", "proxy_digest": "ab" * 32,
                                      "proxy_records": 10, "classes": 2})
    assert knowledge.config_hash() != plain.config_hash()
    assert knowledge.to_dict()["knowledge"]["mode"] == "knowledge"


def test_a_proxy_file_that_is_not_the_registered_one_is_refused_by_name(tmp_path):
    proxy = proxy_file_bytes(tabular_split(PROXY_RECORDS, 5).inputs)
    settings = KnowledgeSettings.from_dict(knowledge_settings(proxy))
    (tmp_path / PROXY_FILE).write_bytes(proxy_file_bytes(tabular_split(PROXY_RECORDS, 6).inputs))
    with pytest.raises(UpdateRejected, match=r"site north: the proxy set .*proxy.safetensors has SHA-256 .* not the "
                                             "run's registered"):
        load_proxy(tmp_path / PROXY_FILE, settings, "site north")
    (tmp_path / PROXY_FILE).write_bytes(proxy)
    assert load_proxy(tmp_path / PROXY_FILE, settings, "site north")["x"].shape == (PROXY_RECORDS, 5)


def test_soft_labels_that_are_not_probability_rows_are_rejected():
    settings = KnowledgeSettings.from_dict(knowledge_settings(b"x"))
    rows = np.full((PROXY_RECORDS, 2), 0.5)
    assert np.allclose(check_soft_labels(rows, settings, "mean"), 0.5)
    with pytest.raises(UpdateRejected, match="shape"):
        check_soft_labels(rows[:3], settings, "mean")
    with pytest.raises(UpdateRejected, match="not probability distributions"):
        check_soft_labels(rows * 3, settings, "mean")
    with pytest.raises(UpdateRejected, match="non-finite"):
        check_soft_labels(np.where(rows > 0, np.nan, rows), settings, "mean")


def _sites_with_their_own_public_teachers(directory, proxy: bytes):
    state_dirs, teachers = [], {}
    for i, (name, n) in enumerate(SIZES.items()):
        data = tabular_split(150, 200 + i)
        teacher = LogisticRegression(C=0.05 * (i + 1)).fit(data.inputs["x"] * (1 + i), data.labels)
        save_sklearn_teacher(teacher, directory / f"teacher-{name}.pkl")
        site = create_site(directory / name, name, {"train": tabular_split(n, i), "val": tabular_split(16, 10 + i),
                                                     "test": tabular_split(16, 20 + i)},
                           directory / f"teacher-{name}.pkl", teacher_declaration=PUBLIC_TEACHER)
        (site.state_dir / PROXY_FILE).write_bytes(proxy)
        state_dirs.append(site.state_dir)
        teachers[name] = SklearnTeacher(teacher)
    return state_dirs, teachers


def test_the_coordinator_only_ever_holds_the_secure_mean_of_the_soft_labels(tmp_path, monkeypatch):
    proxy_inputs = tabular_split(PROXY_RECORDS, 5).inputs
    proxy = proxy_file_bytes(proxy_inputs)
    (tmp_path / PROXY_FILE).write_bytes(proxy)
    state_dirs, teachers = _sites_with_their_own_public_teachers(tmp_path / "sites", proxy)
    settings = knowledge_settings(proxy)
    releases = {name: softmax(teacher.logits(proxy_inputs).astype(np.float64) / settings["temperature"])
                for name, teacher in teachers.items()}
    # Everything that reaches the coordinator from a site during SecAgg+, as Flower hands it over.
    arrived: list = []
    original = secure_round._ScreeningGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        replies = original(self, messages, timeout=timeout)
        arrived.extend(reply for reply in replies if not reply.has_error())
        return replies

    monkeypatch.setattr(secure_round._ScreeningGrid, "send_and_receive", recording)
    held: list[np.ndarray] = []

    class Recording(Coordinator):
        def _distil_knowledge(self, server_round, state, soft_labels):
            held.append(np.array(soft_labels))
            return super()._distil_knowledge(server_round, state, soft_labels)

    config = federation(rounds=1, local_steps=3, batch_size=16, knowledge=settings)
    coordinator = run_federation(state_dirs, lambda: Recording(config, "run-knowledge", tmp_path / "run",
                                                                proxy_path=tmp_path / PROXY_FILE))
    [record] = coordinator.records
    assert record["status"] == "aggregated" and record["knowledge"]["source"] == "public-teacher"
    # What the coordinator distils is the weighted mean of the three releases, within SecAgg+'s quantization bound.
    weights = {name: site_weight(n, config.weight_scale) for name, n in SIZES.items()}
    expected = sum(weights[s] * releases[s] for s in SIZES) / sum(weights.values())
    [mean] = held
    assert np.max(np.abs(mean - expected)) <= record["quantization_error_bound"]
    # No single site's release is anywhere in what arrived: the soft-label slot of every masked vector is noise.
    masked = [bytes_to_ndarray(reply.content.config_records[RECORD_KEY_CONFIGS][SecAggKey.MASKED_PARAMETERS][-3])
              for reply in arrived if SecAggKey.MASKED_PARAMETERS in reply.content.config_records.get(
                  RECORD_KEY_CONFIGS, {})]
    assert len(masked) == len(SIZES)
    step = 2 * config.clipping_range / config.quantization_range
    for vector in masked:
        assert vector.shape == (PROXY_RECORDS, 2)
        naive = vector.astype(np.float64) * step - config.clipping_range
        for name, release in releases.items():
            assert np.max(np.abs(naive - weights[name] * release)) > 0.5
    # Each site's ledger records its release: source, shape, digest and why it is private; never the values.
    for state_dir in state_dirs:
        sent = [json.loads(line) for line in (state_dir / "ledger.jsonl").read_text().splitlines()]
        [event] = [e for e in sent if e["kind"] == "update-sent"]
        release = event["payload"]["knowledge"]
        assert release["source"] == "public-teacher" and release["shape"] == [PROXY_RECORDS, 2]
        assert "never saw private records" in release["why_private"]


runner = CliRunner()


@pytest.mark.parametrize("mode", ["knowledge", pytest.param("hybrid", marks=pytest.mark.slow)])
def test_simulate_runs_each_knowledge_mode_and_verify_passes(tmp_path, mode):
    result = runner.invoke(app, ["simulate", "--scenario", "hospitals", "--subsample", "0.15", "--rounds", "1",
                                 "--local-steps", "3", "--stages", "federated", "--epsilon", "3",
                                 "--knowledge-mode", mode, "--out", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = summary["paths"]["run_dir"]
    config = json.loads(open(f"{run_dir}/config.json").read())["federation"]
    assert config["knowledge"]["mode"] == mode and config["knowledge"]["source"] == "local-student"
    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert records[-1]["status"] == "aggregated" and records[-1]["knowledge"]["server_steps"] > 0
    verified = runner.invoke(app, ["verify", run_dir, "--format", "json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["status"] == "verified"


def test_a_knowledge_run_sends_the_same_bytes_for_students_ten_times_apart(tmp_path):
    """What a site hands SecAgg+ in knowledge mode is the proxy-set layout, not the student."""
    from coordinator.secure_round import masked_layout
    from protocols.config import StudentSpec

    proxy = proxy_file_bytes(tabular_split(PROXY_RECORDS, 5).inputs)
    (tmp_path / PROXY_FILE).write_bytes(proxy)
    sizes = []
    for hidden in ([8], [256, 256]):
        spec = StudentSpec("mlp", {"input_dim": 5, "hidden": hidden, "num_classes": 2})
        config = federation(student=spec, knowledge=knowledge_settings(proxy, mode="knowledge",
                                                                          source="local-student"))
        coordinator = Coordinator(config, f"run-{len(hidden)}", tmp_path / f"run-{len(hidden)}",
                                  proxy_path=tmp_path / PROXY_FILE)
        parameters = sum(v.size for v in coordinator.state.values())
        payload = coordinator.secure_payload(coordinator.instruction(1))
        sizes.append((parameters, sum(int(np.prod(s)) for s in masked_layout([v.shape for v in payload.values()]))))
    (small, small_values), (large, large_values) = sizes
    assert large >= 10 * small
    assert small_values == large_values == 1 + PROXY_RECORDS * 2 + 2


def test_a_site_with_another_proxy_set_refuses_the_round_before_it_calibrates_or_spends(tmp_path):
    from client.train import consider_round
    from protocols.accounting import PrivacyState
    from tests.helpers import make_site

    site = make_site(tmp_path)
    proxy = proxy_file_bytes(tabular_split(PROXY_RECORDS, 5).inputs)
    (tmp_path / PROXY_FILE).write_bytes(proxy)
    (site.state_dir / PROXY_FILE).write_bytes(proxy_file_bytes(tabular_split(PROXY_RECORDS, 6).inputs))
    config = federation(target_epsilon=3.0, knowledge=knowledge_settings(proxy, mode="knowledge",
                                                                         source="local-student"))
    coordinator = Coordinator(config, "run-proxy", tmp_path / "run", proxy_path=tmp_path / PROXY_FILE)
    with pytest.raises(UpdateRejected, match="site site-a, round 1: the proxy set .* not the run's registered"):
        consider_round(site, coordinator.instruction(1))
    state = PrivacyState.load(site.state_dir)
    assert not state.spends and not state.calibrations
    (site.state_dir / PROXY_FILE).write_bytes(proxy)
    check, _ = consider_round(site, coordinator.instruction(1))
    assert check.decision.accept


@pytest.mark.slow
def test_in_knowledge_mode_sites_train_their_own_students_and_only_the_proxy_layout_leaves(tmp_path):
    """Heterogeneous students: picu trains a 64-64 MLP and nicu a linear one, each kept between rounds and digesting
    the global student on the proxy set first; what every site sends is the same proxy layout."""
    from safetensors.numpy import load_file

    result = runner.invoke(app, ["simulate", "--scenario", "hospitals", "--subsample", "0.15", "--rounds", "2",
                                 "--local-steps", "3", "--stages", "federated", "--epsilon", "3",
                                 "--knowledge-mode", "knowledge", "--site-student", "picu=64,64",
                                 "--site-student", "nicu=", "--out", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = tmp_path / summary["paths"]["run_dir"]
    assert summary["failed_rounds"] == [] and summary["site_failures"] == {}
    sent = {}
    for site in summary["privacy"]["sites"]:
        events = [json.loads(line) for line in open(run_dir / "sites" / site / "ledger.jsonl")]
        sent[site] = [e["payload"] for e in events if e["kind"] == "update-sent"]
    assert {payload["bytes"] for updates in sent.values() for payload in updates} == {sent["picu"][0]["bytes"]}
    own = [payload["knowledge"]["own_student"] for payload in sent["picu"]]
    assert [o["continued"] for o in own] == [False, True] and own[0]["spec"]["settings"]["hidden"] == [64, 64]
    assert own[0]["parameters"] == 31 * 64 + 64 + 64 * 64 + 64 + 64 * 2 + 2 and own[0]["digest_steps"] > 0
    assert sent["nicu"][0]["knowledge"]["own_student"]["parameters"] == 31 * 2 + 2
    assert "own_student" not in sent["laboratory"][0]["knowledge"]
    kept = next((run_dir / "sites" / "picu").glob("own-student-*.safetensors"))
    assert load_file(str(kept))["layers.2.weight"].shape == (64, 64)
    assert load_file(str(run_dir / "student" / "model.safetensors"))["layers.2.weight"].shape == (32, 32)
    verified = runner.invoke(app, ["verify", str(run_dir), "--format", "json"])
    assert verified.exit_code == 0, verified.output

    refused = runner.invoke(app, ["simulate", "--scenario", "hospitals", "--subsample", "0.15", "--rounds", "1",
                                  "--knowledge-mode", "hybrid", "--site-student", "picu=64", "--out", str(tmp_path)])
    assert refused.exit_code != 0 and "--knowledge-mode knowledge only" in refused.output


@pytest.mark.slow
def test_the_drug_reviews_text_path_distils_soft_labels_on_its_public_reviews_and_verifies(tmp_path):
    result = runner.invoke(app, ["simulate", "--scenario", "drug-reviews", "--knowledge-mode", "hybrid", "--rounds", "1",
                                 "--local-steps", "2", "--subsample", "0.3", "--out", str(tmp_path), "--format",
                                 "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = summary["paths"]["run_dir"]
    knowledge = json.loads(open(f"{run_dir}/config.json").read())["federation"]["knowledge"]
    assert knowledge["classes"] == 3 and knowledge["proxy_records"] > 0
    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert records[-1]["status"] == "aggregated" and records[-1]["knowledge"]["server_steps"] > 0
    verified = runner.invoke(app, ["verify", run_dir, "--format", "json"])
    assert verified.exit_code == 0, verified.output
