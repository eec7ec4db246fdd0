"""``fedistill run run.toml``: submit a run to a running coordinator, wait for it, report how it ended.

The run's outcome is read from ``flwr list --format json``, never from ``flwr run``'s exit code (0 even
for a failed run). The ServerApp gets the whole federation config as JSON in Flower's run config, so
what ran is exactly what run.toml said, and its hash is in the run ledger.

A causal-LM student's ``base`` (``[federation.student.settings] base``) is the coordinator's copy of the run's
base student folder: a relative path is taken relative to run.toml, as every path in it, and the folder is
checked against ``base_digest`` before anything is submitted. Sites do not use this path: each has its own copy
(site.toml ``[student] base``).

A curriculum's coordinator stage runs here, before submitting (:func:`prepare_coordinator_stage`): run.toml's
``[coordinator_stage]`` names the public records and the public teacher on this machine, the stage distils the one
into the student on the other, and the ServerApp starts the rounds from what it saved (key ``coordinator-stage`` of
Flower's run config). No site record is read.

A knowledge run (``[federation.knowledge]``, docs/knowledge.md) names its proxy set with run.toml's ``proxy_set``:
the file the operator ships to every site (public inputs only). Its SHA-256 and record count are filled into the
config here (or checked, when the table states them), and the ServerApp keeps a copy in the run directory.

run.toml's ``parties`` names the operator's parties.toml (protocols/governance.py): parsed and checked here, before
anything is submitted, then recorded by the ServerApp in the run ledger's ``parties-declared`` event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import distribution, version
from pathlib import Path
from typing import Any

import tomli_w

from coordinator.operator import CoordinatorDir, flwr
from distill.data import SplitData
from protocols.config import FederationConfig, load_versioned_toml
from protocols.curriculum import Continuation, stage_of
from protocols.errors import ConfigError, DataError, FedistillError
from protocols.fields import reject_unknown_fields
from protocols.governance import PartiesDeclaration, load_parties
from protocols.ledger import resumable_run

SCHEMA_VERSION = 1
# run.toml's top-level fields; [federation] is FederationConfig's, which refuses unknown fields itself.
RUN_FIELDS = ("schema_version", "coordinator", "out_dir", "wait_for_sites", "timeout_minutes", "federation",
              "coordinator_stage", "proxy_set", "parties")
# [coordinator_stage]: the public records table (its columns as a classification site's [data] names them) and the
# public teacher.
STAGE_FIELDS = ("records", "label", "classes", "features", "person_id", "teacher")
# A logits file is aligned with the rows of one table; the stage runs its teacher on held-out splits and
# interpolations of the public records, so it needs a model.
LOGITS_FILE_SUFFIXES = (".npy", ".npz")
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
coordinator-stage = ""
start-student = ""
proxy-set = ""
signing-key = ""
transport = ""
parties = ""
"""


@dataclass(frozen=True)
class CoordinatorStageFile:
    """run.toml's ``[coordinator_stage]``: where the coordinator stage's public records and teacher are, and which
    columns of the records are the label, the features (in the student's input order) and the person."""

    records: Path
    label: str
    classes: tuple[str, ...]
    features: tuple[str, ...]
    person_id: str | None
    teacher: Path


@dataclass(frozen=True)
class RunFile:
    path: Path
    coordinator: CoordinatorDir
    out_dir: Path
    wait_for_sites: int
    timeout_s: float
    federation: FederationConfig
    coordinator_stage: CoordinatorStageFile | None = None
    # A knowledge run's proxy set (run.toml proxy_set), registered in the config by its SHA-256.
    proxy_set: Path | None = None
    # The operator's parties.toml (run.toml parties), recorded by the coordinator in the run ledger at run start.
    parties: PartiesDeclaration | None = None

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
        proxy_set, federation_table = _proxy_set(raw, path.parent, where)
        federation = FederationConfig.from_dict(_with_absolute_base(federation_table, path.parent),
                                                where=f"{where} [federation]")
        coordinator_stage = _coordinator_stage(raw, federation, path.parent, where)
        parties = raw.get("parties")
        if parties is not None and (not isinstance(parties, str) or not parties):
            raise ConfigError(f"{where}: field 'parties' must be the path of the run's parties.toml (relative to "
                              f"run.toml), got {parties!r}.")
        if federation.student.family == "causal_lm":
            _check_student_base(federation, where)
        if federation.secure_aggregation and sites < federation.min_cohort:
            raise ConfigError(f"{where}: wait_for_sites={sites} is below [federation] min_cohort="
                              f"{federation.min_cohort}, which secure aggregation needs.")
        return cls(path, CoordinatorDir.load(path.parent / raw["coordinator"]), (path.parent / raw["out_dir"]).resolve(),
                   sites, float(minutes) * 60, federation, coordinator_stage, proxy_set,
                   load_parties(path.parent / parties) if parties else None)

    @property
    def stage_dir(self) -> Path:
        """Where the coordinator stage is saved before submitting: the run has no id yet, so the folder is keyed by
        the configuration (which holds the stage's settings and seed)."""
        return self.coordinator.path / "stages" / self.federation.config_hash()[:16]

    def continuing(self, continues: Continuation) -> RunFile:
        """This run, continuing a finished run (``--from``): its config names that run and its final student."""
        return replace(self, federation=replace(self.federation, continues=continues))

    def run_config(self, resume: str | None, coordinator_stage: Path | None = None,
                   start_student: Path | None = None) -> dict[str, Any]:
        return {"federation": json.dumps(self.federation.to_dict(), sort_keys=True), "out-dir": str(self.out_dir),
                "min-sites": self.wait_for_sites, "resume-run": resume or "",
                "coordinator-stage": str(coordinator_stage or ""), "start-student": str(start_student or ""),
                "proxy-set": str(self.proxy_set or ""), "signing-key": str(self.coordinator.signing_key),
                "transport": json.dumps(self.coordinator.transport(), sort_keys=True),
                # Parsed and checked here; the ServerApp parses the content again and records it in the run ledger.
                "parties": json.dumps({"content": self.parties.to_dict(), "source_sha256": self.parties.source_sha256},
                                      sort_keys=True) if self.parties is not None else ""}


def _proxy_set(raw: dict[str, Any], directory: Path, where: str) -> tuple[Path | None, dict[str, Any]]:
    """(run.toml's ``proxy_set`` file, the [federation] table with the set's digest and record count filled in):
    required exactly when [federation.knowledge] is given; digests the table states must be the file's."""
    from safetensors import safe_open

    from protocols.canonical import file_sha256

    federation, named = raw["federation"], raw.get("proxy_set")
    knowledge = federation.get("knowledge")
    if knowledge is None:
        if named is not None:
            raise ConfigError(f"{where}: field 'proxy_set' names a proxy set, but [federation] has no knowledge "
                              "table; add [federation.knowledge] (mode, source: docs/knowledge.md) or remove it.")
        return None, federation
    if not isinstance(named, str) or not named:
        raise ConfigError(f"{where}: [federation.knowledge] needs a proxy set: set proxy_set = \"FILE\" to the "
                          "safetensors file of public inputs you ship to every site (relative to run.toml).")
    path = (directory / named).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: proxy_set '{path}' is not a file; point it at the proxy set you ship to every "
                          "site (a safetensors file of public inputs, docs/knowledge.md).")
    try:
        with safe_open(str(path), framework="numpy") as opened:
            sizes = {opened.get_slice(name).get_shape()[0] for name in opened.keys()}
            mask = opened.get_tensor("attention_mask") if "attention_mask" in opened.keys() else None
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise ConfigError(f"{where}: proxy_set '{path}' is not a safetensors file ({err}).") from None
    if len(sizes) != 1:
        raise ConfigError(f"{where}: proxy_set '{path}' holds tensors of different record counts {sorted(sizes)}.")
    found = {"proxy_digest": file_sha256(path), "proxy_records": sizes.pop()}
    student = federation.get("student")
    if isinstance(student, Mapping) and student.get("family") == "causal_lm" and mask is not None:
        found["proxy_positions"] = int(mask.sum())  # a causal-LM run's release has a row per real position
    if not isinstance(knowledge, dict):
        raise ConfigError(f"{where}: [federation] knowledge must be a table, got {knowledge!r}.")
    for key, value in found.items():
        if key in knowledge and knowledge[key] != value:
            raise ConfigError(f"{where}: [federation.knowledge] {key} is {knowledge[key]!r}, but proxy_set '{path}' "
                              f"gives {value!r}; it is not the set the config registers. Remove {key} (it is filled "
                              "in from the file) or ship the registered file.")
    return path, {**federation, "knowledge": {**knowledge, **found}}


def _coordinator_stage(raw: dict[str, Any], federation: FederationConfig, directory: Path,
                       where: str) -> CoordinatorStageFile | None:
    """``[coordinator_stage]``, required exactly when ``[federation] curriculum`` names a coordinator stage."""
    table, stage = raw.get("coordinator_stage"), stage_of(federation.curriculum, "coordinator")
    section = f"{where} [coordinator_stage]"
    if table is None:
        if stage is not None:
            raise ConfigError(f"{where}: [federation] curriculum names a coordinator stage, but table "
                              "[coordinator_stage] is missing; add it with the public records and the public teacher "
                              "the stage distils from (docs/deploy.md, 'A curriculum in deployment'), or remove the "
                              "coordinator stage from the curriculum.")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: coordinator_stage must be a table ([coordinator_stage]), got {table!r}.")
    reject_unknown_fields(table, STAGE_FIELDS, section)
    family = federation.student.family
    if family == "causal_lm":
        raise ConfigError(f"{section}: a causal-LM run's coordinator stage is its base student's public stage "
                          "(`fedistill coordinator base-student ... --public`), pinned by base_digest; remove "
                          "[coordinator_stage].")
    if family != "mlp":
        raise ConfigError(f"{section}: the stage reads a table of numeric features, which only an mlp student takes "
                          f"(its input_dim); a {family} student has none. Remove [coordinator_stage] and the "
                          "coordinator stage from the curriculum.")
    if stage is None:
        raise ConfigError(f"{section}: the table is given, but [federation] curriculum has no coordinator stage; add "
                          "one ({where = \"coordinator\", steps = ..., ...}, docs/curriculum.md) or remove "
                          "[coordinator_stage].")
    label = _stage_text(table, "label", section)
    classes = _stage_names(table, "classes", section, 2)
    features = _stage_names(table, "features", section, 1)
    if label in features:
        raise ConfigError(f"{section}: label column '{label}' is also listed in features.")
    settings = federation.student.settings
    for key, names, setting in (("features", features, "input_dim"), ("classes", classes, "num_classes")):
        if len(names) != settings.get(setting):
            raise ConfigError(f"{section}: {key} lists {len(names)} name(s), but the student's {setting} is "
                              f"{settings.get(setting)!r} ([federation.student] settings); the stage feeds the "
                              f"student these {key} in this order, so make the two agree.")
    records, teacher = (directory / _stage_text(table, key, section) for key in ("records", "teacher"))
    if not records.is_file():
        raise ConfigError(f"{section}: records '{records}' is not a file; point records at the public records table "
                          "(.csv, .jsonl or .parquet; relative paths are relative to run.toml).")
    if not teacher.exists():
        raise ConfigError(f"{section}: teacher '{teacher}' does not exist; point teacher at the public teacher "
                          "(a scikit-learn pickle, a TorchScript .pt or a checkpoint folder; relative to run.toml).")
    if teacher.suffix.lower() in LOGITS_FILE_SUFFIXES:
        raise ConfigError(f"{section}: teacher '{teacher}' is a logits file, aligned with the rows of one table; the "
                          "stage runs its teacher on a split of the public records and on their interpolations, so "
                          "it needs the model itself (a scikit-learn pickle, a TorchScript .pt, a checkpoint folder).")
    person_id = table.get("person_id", "")
    if not isinstance(person_id, str):
        raise ConfigError(f"{section}: person_id must be a column name (a string; \"\" for none), got {person_id!r}.")
    return CoordinatorStageFile(records.resolve(), label, classes, features, person_id or None, teacher.resolve())


def _stage_text(table: dict[str, Any], key: str, section: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{section}: field '{key}' must be set (a string), got {value!r}.")
    return value


def _stage_names(table: dict[str, Any], key: str, section: str, minimum: int) -> tuple[str, ...]:
    value = table.get(key)
    if not isinstance(value, list) or len(value) < minimum or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{section}: field '{key}' must be a list of at least {minimum} name(s), got {value!r}.")
    if len(set(value)) != len(value):
        raise ConfigError(f"{section}: field '{key}' names something twice: {value!r}.")
    return tuple(value)


@dataclass(frozen=True)
class CoordinatorStageRun:
    """What ``fedistill run`` says of the coordinator stage it ran (counts only, never a record)."""

    directory: Path
    records: int  # public records the stage trained on
    held_out: int  # public records of the held-out persons, not trained on
    synthetic_records: int
    steps: int
    seconds: float
    student_digest: str


def prepare_coordinator_stage(run: RunFile, read_records: Callable[[CoordinatorStageFile], SplitData]
                              ) -> CoordinatorStageRun:
    """The curriculum's coordinator stage, on this machine and before submitting: the public teacher distilled into
    the run's student on the [coordinator_stage] records, saved in :attr:`RunFile.stage_dir`.

    ``read_records`` is the sites' own reader (client.records, which this package may not import), so that the same
    columns mean the same at the coordinator and at every site.
    """
    # torch and the training stack, only for a run that has the stage (`fedistill run` stays quick without it).
    from coordinator.curriculum import run_coordinator_stage, save_stage, split_public
    from distill.models import load_teacher, teacher_digest

    table, stage = run.coordinator_stage, stage_of(run.federation.curriculum, "coordinator")
    if table is None or stage is None:
        raise ConfigError(f"{run.path}: no coordinator stage to run; its curriculum and [coordinator_stage] name none.")
    started = time.perf_counter()
    try:
        public = read_records(table)
    except DataError as err:  # the reader's hints speak of site.toml
        raise DataError(f"{run.path} [coordinator_stage]: {err} (For the coordinator stage the columns are those "
                        "[coordinator_stage] names in run.toml.)") from None
    config = run.federation
    transfer, held_out = split_public(public, config.seed)
    if not len(transfer):
        raise DataError(f"{run.path} [coordinator_stage]: records '{table.records}' hold {len(public)} record(s) of "
                        "too few persons: all of them fell into the held-out share. The stage needs more public "
                        "persons (or no person_id, so that each record is its own).")
    teacher = load_teacher(table.teacher)
    width = teacher.logits({"x": transfer.inputs["x"][:8]}).shape[-1]
    if width != len(table.classes):
        raise DataError(f"{run.path} [coordinator_stage]: teacher '{table.teacher}' gives {width} logit(s) per record, "
                        f"but classes names {len(table.classes)}; use the teacher of these classes.")
    result = run_coordinator_stage(config.student, transfer, teacher, teacher_digest(table.teacher), stage, config.seed,
                                   config.fragment_patterns)
    directory = save_stage(result, config.student, config, run.stage_dir)
    return CoordinatorStageRun(directory, len(transfer), len(held_out), stage.synthetic_records, stage.steps,
                               time.perf_counter() - started, result.record["student_digest"])


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


def submit(run: RunFile, resume: str | None = None, coordinator_stage: Path | None = None,
           start_student: Path | None = None) -> int:
    """Start the run on the coordinator; returns Flower's run id. ``coordinator_stage`` is the folder
    :func:`prepare_coordinator_stage` saved (a resumed run takes its own copy of the stage instead);
    ``start_student`` the ``model.safetensors`` a continuing run (``run.federation.continues``) starts from."""
    if resume is not None:
        _check_resumable(run, resume)
    app, overrides = _app_dir(run.coordinator, run.run_config(resume, coordinator_stage, start_student))
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
