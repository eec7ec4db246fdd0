"""`site check` asks a real SuperLink on 127.0.0.1 (TLS, SuperNode authentication) whether the site's node key is
registered, leaves no node behind, and says "not checked" when the coordinator is unreachable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.operator import CoordinatorDir, flwr
from tests.deployment import Processes, fedistill, free_port, make_site

REGISTRATION = "node key registered"


def _check(site_file: Path) -> tuple[int, dict[str, dict]]:
    done = fedistill("site", "check", str(site_file), "--format", "json", cwd=site_file.parent)
    return done.returncode, {c["name"]: c for c in json.loads(done.stdout)["checks"]}


@pytest.mark.slow
def test_site_check_tells_a_registered_key_from_an_unregistered_one(tmp_path: Path) -> None:
    port = free_port()
    done = fedistill("coordinator", "init", "coordinator", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    coordinator = tmp_path / "coordinator"
    address = f"127.0.0.1:{port}"
    registered = make_site(tmp_path, "hospital-a", coordinator, address, 0, free_port())
    stranger = make_site(tmp_path, "hospital-b", coordinator, address, 1, free_port())
    done = fedistill("coordinator", "add-site", "hospital-a", str(registered.parent / "node_key.pub"), "--dir",
                     "coordinator", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    processes = Processes(tmp_path / "logs")
    try:
        processes.start("coordinator", "coordinator", "start", "coordinator", cwd=tmp_path)
        processes.wait_for_log("coordinator", "coordinator ready", timeout=90)

        code, checks = _check(registered)
        assert code == 0 and checks[REGISTRATION]["ok"] is True, checks
        assert "SHA256:" in checks[REGISTRATION]["detail"]

        code, checks = _check(stranger)
        assert code == 1 and checks[REGISTRATION]["ok"] is False and checks["coordinator"]["ok"] is True
        assert "does not know this site's node key" in checks[REGISTRATION]["detail"]
        assert "fedistill coordinator add-site hospital-b node_key.pub" in checks[REGISTRATION]["detail"]

        # The question changed nothing on the SuperLink: one node, registered, never activated.
        nodes = flwr(CoordinatorDir.load(coordinator), "supernode", "list")["nodes"]
        assert [(n["status"], n["online-at"]) for n in nodes] == [("registered", "N/A")]
    finally:
        processes.stop_all()

    code, checks = _check(registered)
    assert code == 1 and checks["coordinator"]["ok"] is False
    assert checks[REGISTRATION] == {"name": REGISTRATION, "ok": None, "detail": "not checked: coordinator unreachable"}
