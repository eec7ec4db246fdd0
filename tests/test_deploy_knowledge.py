"""A knowledge run in deployment: the operator writes the proxy set (`fedistill coordinator proxy-set`), names it in
run.toml (proxy_set: its SHA-256 and record count go into the config), the ServerApp keeps a copy in the run directory
(and resumes from it), every site receives the file through site.toml [knowledge] proxy_set; and one hybrid run
through real processes (TLS, SecAgg+) that verifies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.sitefile import SiteFile
from coordinator.launch import APP_PYPROJECT, RunFile
from protocols.canonical import file_sha256
from protocols.errors import ConfigError, LedgerTampered
from protocols.knowledge import PROXY_FILE, load_proxy
from tests.deployment import FEATURES, RUN_TOML, Processes, fedistill, free_port, make_site, records_table

KNOWLEDGE = '\n[federation.knowledge]\nmode = "hybrid"\nsource = "local-student"\nclasses = 2\nserver_steps = 20\n'


def run_toml(proxy_line: str = 'proxy_set = "proxy.safetensors"\n', knowledge: str = KNOWLEDGE) -> str:
    head, federation = RUN_TOML.format(minutes=12).split("[federation]\n", 1)
    # [federation.student] closes the text; the knowledge table goes after it, proxy_set among the top-level fields.
    return head + proxy_line + "\n[federation]\n" + federation + knowledge


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from coordinator.operator import init_coordinator

    root = tmp_path_factory.mktemp("deploy-knowledge").resolve()
    init_coordinator(root / "coordinator", ["127.0.0.1"], 9559)
    records_table(300, 98).to_csv(root / "public.csv", index=False)
    done = fedistill("coordinator", "proxy-set", "public.csv", "proxy.safetensors", "--features", ",".join(FEATURES),
                     "--sample", "120", "--format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    assert written["records"] == 120 and written["sha256"] == file_sha256(root / "proxy.safetensors")
    return root


def load(root: Path, text: str) -> RunFile:
    (root / "run.toml").write_text(text)
    return RunFile.load(root / "run.toml")


def test_the_proxy_set_holds_only_the_features_and_a_bad_column_is_named(root: Path) -> None:
    from safetensors.numpy import load_file

    kept = load_file(str(root / "proxy.safetensors"))
    assert list(kept) == ["x"] and kept["x"].shape == (120, len(FEATURES))
    done = fedistill("coordinator", "proxy-set", "public.csv", "other.safetensors", "--features", "f0,age", cwd=root)
    assert done.returncode == 1 and "no column(s) 'age'" in done.stderr and not (root / "other.safetensors").exists()


def test_run_toml_registers_the_proxy_set_by_digest_and_refuses_a_mismatch_by_name(root: Path) -> None:
    run = load(root, run_toml())
    knowledge = run.federation.knowledge
    assert knowledge is not None and knowledge.proxy_digest == file_sha256(root / "proxy.safetensors")
    assert knowledge.proxy_records == 120 and run.proxy_set == root / "proxy.safetensors"
    assert run.run_config(None)["proxy-set"] == str(root / "proxy.safetensors") and 'proxy-set = ""' in APP_PYPROJECT

    wrong = KNOWLEDGE + f'proxy_digest = "{"0" * 64}"\n'
    with pytest.raises(ConfigError, match=r"\[federation.knowledge\] proxy_digest is .* it is not the set"):
        load(root, run_toml(knowledge=wrong))
    with pytest.raises(ConfigError, match="needs a proxy set: set proxy_set"):
        load(root, run_toml(proxy_line=""))
    with pytest.raises(ConfigError, match="proxy_set '.*missing.safetensors' is not a file"):
        load(root, run_toml(proxy_line='proxy_set = "missing.safetensors"\n'))
    with pytest.raises(ConfigError, match="names a proxy set, but \\[federation\\] has no knowledge table"):
        load(root, run_toml(knowledge=""))


def _context(run: RunFile, run_id: int, resume: str | None) -> Context:
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run.run_config(resume))


def test_the_server_app_keeps_the_proxy_set_in_the_run_directory_and_resumes_from_that_copy(root: Path) -> None:
    from coordinator.app import coordinator_from_run_config

    run = load(root, run_toml())
    coordinator, _ = coordinator_from_run_config(_context(run, 51, None))
    kept = run.out_dir / "51" / PROXY_FILE
    assert file_sha256(kept) == run.federation.knowledge.proxy_digest and coordinator.proxy["x"].shape[0] == 120
    assert coordinator.ledger.head[0] == 1  # run-started and its checkpoint: a run that can be resumed
    resumed, _ = coordinator_from_run_config(_context(run, 52, "51"))
    assert resumed.proxy["x"].shape[0] == 120
    kept.unlink()
    with pytest.raises(LedgerTampered, match="proxy.safetensors is missing"):
        coordinator_from_run_config(_context(run, 53, "51"))


def test_a_site_receives_the_proxy_set_through_site_toml(root: Path) -> None:
    site_file = make_site(root, "hospital-k", root / "coordinator", "127.0.0.1:9559", 0, free_port())
    text = site_file.read_text()
    site_file.write_text(text + '\n[knowledge]\nproxy_set = "../proxy.safetensors"\nstudent_hidden = [64, 64]\n')
    site = SiteFile.load(site_file).prepare_state()
    assert site.knowledge_student_hidden == (64, 64)  # its own student in knowledge-mode runs
    settings = load(root, run_toml()).federation.knowledge
    assert load_proxy(site.state_dir / PROXY_FILE, settings, "the site")["x"].shape == (120, len(FEATURES))
    checked = fedistill("site", "check", str(site_file), "--offline", "--format", "json", cwd=root)
    proxy_check = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "proxy set")
    assert proxy_check["ok"] and settings.proxy_digest in proxy_check["detail"]

    site_file.write_text(text + '\n[knowledge]\nproxy_set = "nowhere.safetensors"\n')
    with pytest.raises(ConfigError, match=r"\[knowledge\] proxy_set '.*nowhere.safetensors' is not a file"):
        SiteFile.load(site_file).prepare_state()
    site_file.write_text(text + '\n[knowledge]\nstudent_hidden = [64, "wide"]\n')
    with pytest.raises(ConfigError, match=r"\[knowledge\] student_hidden must be a list of hidden layer widths"):
        SiteFile.load(site_file)
    site_file.write_text(text + '\n[knowledge]\nproxy = "x"\n')
    with pytest.raises(ConfigError, match="proxy_set"):
        SiteFile.load(site_file)


def test_a_causal_lm_run_registers_public_prompts_with_their_real_positions(tmp_path: Path) -> None:
    import pandas as pd
    from safetensors.numpy import load_file

    from coordinator.operator import init_coordinator
    from distill.models import path_digest
    from tests.deployment import CAUSAL_RUN_TOML, write_base_student, write_causal_lm_teacher

    write_causal_lm_teacher(tmp_path / "teacher")
    base = write_base_student(tmp_path / "teacher", tmp_path / "base-student")
    init_coordinator(tmp_path / "coordinator", ["127.0.0.1"], free_port())
    pd.DataFrame({"prompt": ["the patient is well today", "the patient is ill", "w1 w2 w3", "w4"]}).to_csv(
        tmp_path / "prompts.csv", index=False)
    done = fedistill("coordinator", "proxy-set", "prompts.csv", "prompts.safetensors", "--text", "prompt",
                     "--tokenizer", "teacher", "--max-length", "12", "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    kept = load_file(str(tmp_path / "prompts.safetensors"))
    assert sorted(kept) == ["attention_mask", "input_ids"] and kept["input_ids"].shape == (3, 12)  # "w4" predicts nothing
    assert written["records"] == 3 and written["proxy_positions"] == int(kept["attention_mask"].sum()) == 12

    text = CAUSAL_RUN_TOML.format(minutes=5, base="base-student", digest=path_digest(base), max_length=12)
    head, federation = text.split("[federation]\n", 1)
    (tmp_path / "run.toml").write_text(head + 'proxy_set = "prompts.safetensors"\n\n[federation]\n' + federation
                                       + '\n[federation.knowledge]\nmode = "knowledge"\nsource = "local-student"\n'
                                       'classes = 9\ntemperature = 1.0\n')
    knowledge = RunFile.load(tmp_path / "run.toml").federation.knowledge
    assert knowledge.proxy_positions == 12 and knowledge.soft_label_shape == (12, 9)
    refused = fedistill("coordinator", "proxy-set", "prompts.csv", "x.safetensors", "--text", "prompt", cwd=tmp_path)
    assert refused.returncode == 1 and "--text needs --tokenizer" in refused.stderr


SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.mark.slow
def test_a_deployed_hybrid_run_distils_on_the_shipped_proxy_set_and_verifies(tmp_path: Path) -> None:
    port = free_port()
    done = fedistill("coordinator", "init", "coordinator", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records_table(300, 98).to_csv(tmp_path / "public.csv", index=False)
    done = fedistill("coordinator", "proxy-set", "public.csv", "proxy.safetensors", "--features", ",".join(FEATURES),
                     "--sample", "100", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    site_files = {}
    for seed, name in enumerate(SITES):
        site_file = make_site(tmp_path, name, tmp_path / "coordinator", f"127.0.0.1:{port}", seed, free_port())
        (site_file.parent / "proxy.safetensors").write_bytes((tmp_path / "proxy.safetensors").read_bytes())
        site_file.write_text(site_file.read_text() + '\n[knowledge]\nproxy_set = "proxy.safetensors"\n')
        site_files[name] = site_file
        done = fedistill("coordinator", "add-site", name, str(tmp_path / name / "node_key.pub"), "--dir",
                         "coordinator", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    (tmp_path / "run.toml").write_text(run_toml())
    processes = Processes(tmp_path / "logs")
    try:
        processes.start("coordinator", "coordinator", "start", "coordinator", cwd=tmp_path)
        processes.wait_for_log("coordinator", "coordinator ready", timeout=90)
        for name, site_file in site_files.items():
            processes.start(name, "site", "start", str(site_file), cwd=tmp_path)
            processes.wait_for_log(name, "connects to", timeout=60)
        launched = fedistill("run", "run.toml", "--format", "json", cwd=tmp_path, timeout=720)
        assert launched.returncode == 0, launched.stderr + processes.log("coordinator")
    finally:
        processes.stop_all()
    run_dir = Path(json.loads(launched.stdout)["run_dir"])
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["status"], r["aggregation"]) for r in rounds] == [("aggregated", "secagg+")] * 2
    assert all(r["knowledge"]["server_steps"] == 20 for r in rounds)
    assert file_sha256(run_dir / PROXY_FILE) == file_sha256(tmp_path / "proxy.safetensors")
    for name, site_file in site_files.items():
        done = fedistill("site", "evidence", str(site_file.parent / "state"), str(run_dir / "sites" / name),
                         cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    verified = fedistill("verify", str(run_dir), "--format", "json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checks = json.loads(verified.stdout)["checks"]
    assert any("knowledge (hybrid, source local-student): 6 site releases" in check for check in checks), checks
