"""``fedistill run run.toml``: submit a run to a running coordinator, wait for it, report how it ended.

The run's outcome is read from ``flwr list --format json``, never from ``flwr run``'s exit code (0 even
for a failed run). The ServerApp gets the whole federation config as JSON in Flower's run config, so
what ran is exactly what run.toml said, and its hash is in the run ledger.

A causal-LM student's ``base`` (``[federation.student.settings] base``) is the coordinator's copy of the run's
base student folder: a relative path is taken relative to run.toml, as every path in it, and the folder is
checked against ``base_digest`` before anything is submitted. Sites do not use this path: each has its own copy
(site.toml ``[student] base``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import distribution, version
from pathlib import Path
from typing import Any

import tomli_w

from coordinator.operator import CoordinatorDir, flwr
from protocols.config import FederationConfig, load_versioned_toml
from protocols.errors import ConfigError, FedistillError
from protocols.fields import reject_unknown_fields
from protocols.ledger import resumable_run

SCHEMA_VERSION = 1
# run.toml's top-level fields; [federation] is FederationConfig's, which refuses unknown fields itself.
RUN_FIELDS = ("schema_version", "coordinator", "out_dir", "wait_for_sites", "timeout_minutes", "federation")
POLL_S = 3.0
FINISHED = "finished"

# The ServerApp's entry point and run-config keys; the FAB carries only this file, and the apps' code is
# the fedistill installed beside the SuperLink and every SuperNode (runtime installs are off).
APP_VERSION = version("fedistill")
APP_PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedistill-app"
version = "{APP_VERSION}"
license = {{ file = "LICENSE" }}
dependencies = ["fedistill=={APP_VERSION}", "flwr>={version("flwr")}"]

[tool.flwr.app]
publisher = "fedistill"
fab-format-version = 1
flwr-version-target = "{version("flwr")}"

[tool.flwr.app.components]
serverapp = "coordinator.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
federation = ""
out-dir = ""
min-sites = 3
resume-run = ""
signing-key = ""
transport = ""
"""


@dataclass(frozen=True)
class RunFile:
    path: Path
    coordinator: CoordinatorDir
    out_dir: Path
    wait_for_sites: int
    timeout_s: float
    federation: FederationConfig

    @classmethod
    def load(cls, path: Path) -> RunFile:
        path = Path(path).resolve()
        where = str(path)
        raw = load_versioned_toml(path, SCHEMA_VERSION, "write one as docs/deploy.md shows.")
        reject_unknown_fields(raw, RUN_FIELDS, where)
        for key in ("coordinator", "out_dir"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ConfigError(f"{where}: field '{key}' must be a path (a string).")
        sites, minutes = raw.get("wait_for_sites", 3), raw.get("timeout_minutes", 120)
        if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
            raise ConfigError(f"{where}: field 'wait_for_sites' must be an integer >= 1, got {sites!r}.")
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
            raise ConfigError(f"{where}: field 'timeout_minutes' must be a positive number, got {minutes!r}.")
        if not isinstance(raw.get("federation"), dict):
            raise ConfigError(f"{where}: table [federation] is missing.")
        federation = FederationConfig.from_dict(_with_absolute_base(raw["federation"], path.parent),
                                                where=f"{where} [federation]")
        if federation.student.family == "causal_lm":
            _check_student_base(federation, where)
        if federation.secure_aggregation and sites < federation.min_cohort:
            raise ConfigError(f"{where}: wait_for_sites={sites} is below [federation] min_cohort="
                              f"{federation.min_cohort}, which secure aggregation needs.")
        return cls(path, CoordinatorDir.load(path.parent / raw["coordinator"]), (path.parent / raw["out_dir"]).resolve(),
                   sites, float(minutes) * 60, federation)

    def run_config(self, resume: str | None) -> dict[str, Any]:
        return {"federation": json.dumps(self.federation.to_dict(), sort_keys=True), "out-dir": str(self.out_dir),
                "min-sites": self.wait_for_sites, "resume-run": resume or "",
                "signing-key": str(self.coordinator.signing_key),
                "transport": json.dumps(self.coordinator.transport(), sort_keys=True)}


def _with_absolute_base(federation: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``[federation.student.settings] base`` of a causal-LM student, relative to run.toml's directory."""
    student = federation.get("student")
    settings = student.get("settings") if isinstance(student, Mapping) else None
    if not (isinstance(student, Mapping) and student.get("family") == "causal_lm" and isinstance(settings, Mapping)):
        return federation
    base = settings.get("base")
    if not isinstance(base, str) or not base or Path(base).is_absolute():
        return federation  # validated (and refused by name) by StudentSpec
    return {**federation, "student": {**student, "settings": {**settings, "base": str((directory / base).resolve())}}}


def _check_student_base(federation: FederationConfig, where: str) -> None:
    """The coordinator builds the run's student from this folder: refuse, before submitting, one that is missing
    or is not the folder ``base_digest`` pins (the ServerApp would fail on it after the run started)."""
    from distill.causal_lm import check_student_base

    check_student_base(federation.student.causal_lm(), f"{where}: [federation.student.settings] base",
                       "point base at the run's base student folder (relative paths are relative to run.toml) and "
                       "set base_digest to the digest of the folder every site was sent")


@dataclass(frozen=True)
class RunOutcome:
    flower_run_id: int
    run_id: str
    status: str
    details: str
    run_dir: Path
    record: dict[str, Any]

    @property
    def completed(self) -> bool:
        return self.status == f"{FINISHED}:completed"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "flower_run_id": self.flower_run_id, "run_id": self.run_id,
                "status": self.status, "details": self.details, "run_dir": str(self.run_dir),
                "flower": self.record}


def _app_dir(coordinator: CoordinatorDir, overrides: dict[str, Any]) -> tuple[Path, Path]:
    app = coordinator.path / "app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "LICENSE").write_text(distribution("fedistill").read_text("LICENSE") or "Apache-2.0\n")
    overrides_path = coordinator.path / "app-run-config.toml"
    overrides_path.write_text(tomli_w.dumps(overrides))
    return app, overrides_path


def _check_resumable(run: RunFile, resume: str) -> None:
    """Refuse before submitting: a resumed run must exist and continue with the configuration it started with."""
    ledger = run.out_dir / resume / "ledger.jsonl"
    if not ledger.is_file():
        known = sorted(p.name for p in run.out_dir.iterdir()) if run.out_dir.is_dir() else []
        raise ConfigError(f"--resume {resume}: no run ledger at {ledger.parent}; check the run id (runs in "
                          f"{run.out_dir}: {', '.join(known) or 'none'}).")
    resumable_run(ledger, resume, run.federation.config_hash())


def submit(run: RunFile, resume: str | None = None) -> int:
    """Start the run on the coordinator; returns Flower's run id."""
    if resume is not None:
        _check_resumable(run, resume)
    app, overrides = _app_dir(run.coordinator, run.run_config(resume))
    answer = flwr(run.coordinator, "run", str(app), "--run-config", str(overrides), timeout=300)
    if not answer.get("success"):
        raise FedistillError(f"the coordinator did not accept the run: {answer.get('error-message')}")
    return int(answer["run-id"])


def run_status(coordinator: CoordinatorDir, flower_run_id: int, run_id: str) -> dict[str, Any]:
    answer = flwr(coordinator, "list", "--run-id", str(flower_run_id))
    if answer.get("success") and answer.get("runs"):
        return answer["runs"][0]
    message = str(answer.get("error-message", ""))
    if "unavailable" in message:
        raise FedistillError(f"lost the coordinator at {coordinator.address} while waiting for run {run_id}. If it "
                             "crashed, start it again (`fedistill coordinator start`) and continue the run with "
                             f"`fedistill run RUN_TOML --resume {run_id}`.")
    raise FedistillError(f"the coordinator has no run {flower_run_id}: {message}")


def wait_for(run: RunFile, flower_run_id: int, resume: str | None,
             on_poll: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    deadline = time.monotonic() + run.timeout_s
    while True:
        record = run_status(run.coordinator, flower_run_id, resume or str(flower_run_id))
        if on_poll is not None:
            on_poll(record)
        status = str(record.get("status", ""))
        if status.startswith(FINISHED):
            run_id = resume or str(flower_run_id)
            # Flower reports "N/A" when a run has nothing to add to its status.
            details = str(record.get("status-details", ""))
            return RunOutcome(flower_run_id, run_id, status, "" if details == "N/A" else details,
                              run.out_dir / run_id, record)
        if time.monotonic() > deadline:
            raise FedistillError(f"run {flower_run_id} is still '{status}' after {run.timeout_s / 60:.0f} min; it goes "
                                 f"on at the coordinator (`flwr list` shows it). Raise timeout_minutes to wait longer.")
        time.sleep(POLL_S)
