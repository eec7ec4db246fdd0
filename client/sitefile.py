"""``site.toml``: everything a deployed site is configured with, parsed once into frozen dataclasses.

Relative paths are relative to the file itself, so a site directory can be moved as a whole. Every error
names the table and field (``[data] label``) and says what to put there.

A site is either a classification site (``[data] label``, ``classes``, ``features``; a teacher that gives logits; or,
for a raw table with categorical columns and raw amounts, ``[data] preprocessor``, the run's preprocessing, which
names the label, the classes and the raw columns itself) or a text (causal-LM) site (``[data] text`` and ``max_length``; a causal-LM teacher, a GGUF file or checkpoint folder;
``[student] base``, its copy of the run's base student). The state directory it prepares is the same either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.records import (RecordSchema, TextData, TextSchema, load_documents, load_raw_records, load_records,
                             tokenize_documents)
from client.site import Site, check_student_hidden, create_site
from client.teacher import TEACHER_TRAINING_DATA, TeacherDeclaration
from distill.data import SplitData
from distill.preprocessing import PREPROCESSOR_FILE, Preprocessor, load_preprocessor
from protocols.accounting import ACCOUNTANTS, TEST_METRICS_RELEASES, SitePolicy
from protocols.canonical import atomic_write_bytes, sha256_hex
from protocols.config import load_versioned_toml
from protocols.errors import ConfigError
from protocols.fields import reject_unknown_fields
from protocols.governance import GOVERNANCE_FIELDS, Governance
from protocols.knowledge import PROXY_FILE

SCHEMA_VERSION = 1
SITE_FILE_NAME = "site.toml"
NODE_KEY_NAME = "node_key"

TEMPLATE = """\
# fedistill site configuration. Fill in every field marked FILL IN, then run
#   fedistill site check {site_file}
# Relative paths are relative to this file.
schema_version = 1

[site]
name = "{name}"                  # the name the consortium operator registered for this site
state_dir = "state"              # budget, ledger and keys of this site: back it up, never share it
node_key = "node_key"            # this site's private node key (made by `site init`; never send it anywhere)

[coordinator]
address = "FILL IN: host:port"   # the coordinator's address, from the operator (e.g. "coord.example.org:9092")
ca_certificate = "ca.crt"        # the consortium's CA certificate, from the operator

[data]
path = "FILL IN: records.csv"    # your records: CSV, JSON lines (.jsonl) or Parquet; they never leave this machine
label = "FILL IN"                # the column holding the label
classes = ["negative", "positive"]  # the label values, in the order of the teacher's output logits
features = ["FILL IN"]           # numeric feature columns, in the order the teacher expects them
person_id = ""                   # optional: the column naming the person (patient, customer) of each record
max_records_per_person = 0       # keep at most this many records per person (0: keep all); needs person_id
test_share = 0.2                 # persons held out as this site's test split, never trained on: each run's
                                 # evaluation of the student (docs/privacy.md); 0: none (this site evaluates nothing)
# A raw table (categorical columns, raw amounts, missing values; docs/deploy.md, "A bank's raw table"): name the
# preprocessor file the consortium operator shipped with the run, and remove label, classes and features, which it
# names itself (a site.toml that keeps them must list exactly its label, classes in order, and raw columns):
#   preprocessor = "preprocessor.skops"
# A text (causal-LM) site replaces label, classes and features with (docs/deploy.md, "A causal-LM site"):
#   text = "note_text"             # the column holding each document's text
#   max_length = 48                # tokens per document (the run's student max_length); longer ones are cut
#   order_by = "written_at"        # optional: split oldest first (train 70%, validation 10%, test 20%)
# and adds a [student] table:  base = "base-student"  (the run's base student folder, from the consortium)

[teacher]
path = "FILL IN: teacher.pkl"    # a scikit-learn pickle, a TorchScript .pt, a transformers directory or logits .npz
                                 # (a text site: a causal-LM checkpoint folder with its tokenizer, or a .gguf file)
# What the teacher was trained on. DP protects a record only if it cannot change the teacher's targets for the
# other records, so this decides whether the site's epsilon means anything:
#   "public"      the teacher never saw this site's private records (a public pretrained model, public data)
#   "private-dp"  the teacher was trained on private records with differential privacy
#   "private"     the teacher was trained on private records without DP: this site refuses every DP run
#                 unless acknowledge_non_dp = true, and the report then marks its record-level guarantee void
training_data = "FILL IN: public, private-dp or private"
acknowledge_non_dp = false       # only with training_data = "private": take part in DP runs anyway, guarantee void
description = ""                 # optional: which model, trained on what (recorded in the ledger with every run)

[privacy]
epsilon_per_run = 8.0            # this site refuses any round that would take one run past this epsilon
epsilon_lifetime = 30.0          # ... or all runs together past this one
delta = 1e-5                     # the site states at most this delta (and at most 1/(10 n) for n records)
accountant = "prv"               # prv or rdp (Opacus accountants)
release_local_metrics = false    # a run's site-local stage: may this site's test metrics of its own copy leave?
release_validation_metrics = false  # a run that keeps its best round: may each round's validation ROC-AUC leave?
test_metrics = "noised"          # the test evaluation of each run's student: noised (charged to the budget), clear or none
evaluation_noise_multiplier = 10.0  # noised: the Gaussian noise std on each cell of the released test histogram

[node]
runtime_port = 9094              # local port of the SuperNode's runtime API (127.0.0.1 only); one per site on a host

# Knowledge runs (docs/knowledge.md): the proxy set the consortium operator ships (public inputs only). Every round
# the site checks it against the run's registered SHA-256 before it trains. Uncomment when you received one:
# [knowledge]
# proxy_set = "proxy.safetensors"
# student_hidden = [64, 64]      # optional, knowledge mode only: train this site's own MLP (these hidden widths)
#                                # instead of the run's student; only its soft labels leave the site

# Your records of processing (GDPR Art. 30, HIPAA 164.514), recorded in your ledger when you accept a run and shown
# in the run's compliance report; a field left out is reported "not assessed" (docs/deploy.md, "Parties and
# governance"). Uncomment and fill in:
# [governance]
# lawful_basis = "GDPR Art. 6(1)(e) and 9(2)(j); HIPAA 45 CFR 164.512(i)"
# data_subjects = ["patients"]
# data_categories = ["demographics", "laboratory results"]
# special_categories = ["health data (GDPR Art. 9)"]   # [] for none
# deidentification = "pseudonymised"   # identified, pseudonymised, limited-data-set, safe-harbor,
#                                      # expert-determination (with deidentification_reference) or anonymised
# erasure = "records deleted 12 months after the study ends"
"""


# A classification site holds out this share of its persons as its test split unless [data] test_share says.
DEFAULT_TEST_SHARE = 0.2


# Every table and field site.toml may hold. A field not listed is refused by name: a misspelt
# `epsilon_per_run` that were ignored would leave the site with no per-run cap at all.
FIELDS: dict[str, tuple[str, ...]] = {
    "site": ("name", "state_dir", "node_key"),
    "coordinator": ("address", "ca_certificate"),
    "data": ("path", "label", "classes", "features", "person_id", "max_records_per_person", "test_share", "text",
             "max_length", "order_by", "preprocessor"),
    "teacher": ("path", "training_data", "acknowledge_non_dp", "description"),
    "privacy": ("epsilon_per_run", "epsilon_lifetime", "delta", "accountant", "release_local_metrics",
                "release_validation_metrics", "test_metrics", "evaluation_noise_multiplier"),
    "node": ("runtime_port",),
    "student": ("base",),
    "knowledge": ("proxy_set", "student_hidden"),
    "governance": GOVERNANCE_FIELDS,
}
OPTIONAL_TABLES = ("node", "student", "knowledge", "governance")
# A classification site's [data] fields, and a text (causal-LM) site's: a site is one or the other.
CLASSIFICATION_FIELDS = ("label", "classes", "features", "preprocessor")
TEXT_ONLY_FIELDS = ("max_length", "order_by")
MAX_TOKENS_PER_DOCUMENT = 1_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _tables(raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Every table of site.toml, each checked for unknown fields before any value is read."""
    reject_unknown_fields(raw, {"schema_version", *FIELDS}, where)
    tables = {}
    for name, fields in FIELDS.items():
        table = raw.get(name, {} if name in OPTIONAL_TABLES else None)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: table [{name}] is missing; `fedistill site init` writes one to copy from.")
        reject_unknown_fields(table, fields, f"{where} [{name}]")
        tables[name] = table
    return tables


def _text(table: dict[str, Any], section: str, key: str, where: str, required: bool = True) -> str:
    value = table.get(key, "" if not required else None)
    if not isinstance(value, str) or (required and (not value or value.startswith("FILL IN"))):
        raise ConfigError(f"{where}: [{section}] {key} must be set (a string), got {value!r}.")
    return value


def _number(table: dict[str, Any], section: str, key: str, where: str, low: float, high: float) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise ConfigError(f"{where}: [{section}] {key} must be a number in ({low:g}, {high:g}], got {value!r}.")
    return float(value)


def _strings(table: dict[str, Any], section: str, key: str, where: str, minimum: int) -> tuple[str, ...]:
    value = table.get(key)
    if (not isinstance(value, list) or len(value) < minimum or not all(isinstance(v, str) and v for v in value)
            or any(v.startswith("FILL IN") for v in value)):
        raise ConfigError(f"{where}: [{section}] {key} must be a list of at least {minimum} column name(s), "
                          f"got {value!r}.")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: [{section}] {key} names a column twice: {value!r}.")
    return tuple(value)


def _teacher_declaration(teacher: dict[str, Any], where: str) -> TeacherDeclaration:
    """``[teacher] training_data`` (required), ``acknowledge_non_dp`` and ``description`` (optional)."""
    choices = ", ".join(TEACHER_TRAINING_DATA)
    training_data = teacher.get("training_data")
    if not isinstance(training_data, str) or not training_data or training_data.startswith("FILL IN"):
        raise ConfigError(f"{where}: [teacher] training_data must be set to one of {choices} (what the teacher was "
                          f"trained on; see the comment in `fedistill site init`'s template), got {training_data!r}.")
    acknowledge = teacher.get("acknowledge_non_dp", False)
    if not isinstance(acknowledge, bool):
        raise ConfigError(f"{where}: [teacher] acknowledge_non_dp must be true or false, got {acknowledge!r}.")
    try:
        return TeacherDeclaration(training_data, acknowledge, _text(teacher, "teacher", "description", where,
                                                                    required=False))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _preprocessor(data: dict[str, Any], base: Path, where: str) -> tuple[Path | None, Preprocessor | None]:
    """``[data] preprocessor``, loaded (skops, known types only): its spec names the table's columns."""
    if "preprocessor" not in data or "text" in data:  # a text site's is refused by _schema, naming both fields
        return None, None
    path = base / _text(data, "data", "preprocessor", where)
    return path, load_preprocessor(path, where=f"{where}: [data] preprocessor")


def _preprocessed_schema(data: dict[str, Any], preprocessor: Preprocessor, where: str,
                         person_id: str | None) -> RecordSchema:
    """A raw table's columns, from the run's preprocessing spec. A field site.toml also gives must say what the spec
    says: a different label column, class order or column list would train against the wrong logits or inputs."""
    spec = preprocessor.spec
    if "label" in data and data["label"] != spec.label:
        raise ConfigError(f"{where}: [data] label is {data['label']!r}, but the run's preprocessing ([data] "
                          f"preprocessor) reads the label from column '{spec.label}'; remove [data] label (the "
                          "preprocessor names it), or rename the table's label column.")
    if "classes" in data and data["classes"] != list(spec.classes):
        raise ConfigError(f"{where}: [data] classes is {data['classes']!r}, but the teacher's logit order is the "
                          f"run's preprocessing spec's, {list(spec.classes)}; remove [data] classes (the "
                          "preprocessor names them), or list exactly these, in this order.")
    if "features" in data and data["features"] != list(spec.raw_columns):
        raise ConfigError(f"{where}: [data] features is {data['features']!r}, but the run's preprocessing ([data] "
                          f"preprocessor) reads the raw columns {list(spec.raw_columns)} and makes the teacher's "
                          f"{preprocessor.input_dim} features from them; remove [data] features, or list exactly "
                          "those columns.")
    if person_id and spec.person_id and person_id != spec.person_id:
        raise ConfigError(f"{where}: [data] person_id is {person_id!r}, but the run's preprocessing names the person "
                          f"column '{spec.person_id}'; remove [data] person_id, or rename the table's column.")
    return RecordSchema(spec.label, spec.classes, spec.raw_columns, person_id or spec.person_id)


def _schema(raw: dict[str, Any], data: dict[str, Any], student: dict[str, Any], base: Path, where: str,
            person_id: str | None, preprocessor: Preprocessor | None) -> tuple[RecordSchema | TextSchema, Path | None]:
    """``[data]`` of a classification site (label, classes, features, or a preprocessor) or of a text site (text,
    max_length, order_by, and then ``[student] base``); mixing the two is refused by naming both fields."""
    if "text" in data:
        for key in CLASSIFICATION_FIELDS:
            if key in data:
                raise ConfigError(f"{where}: [data] text and [data] {key}: a site is either a text (causal-LM) site or "
                                  "a classification site; remove one.")
        text = _text(data, "data", "text", where)
        max_length = data.get("max_length")
        if (isinstance(max_length, bool) or not isinstance(max_length, int)
                or not 2 <= max_length <= MAX_TOKENS_PER_DOCUMENT):
            raise ConfigError(f"{where}: [data] max_length must be an integer >= 2 (tokens per document; the run's "
                              f"student max_length), got {max_length!r}.")
        order_by = _text(data, "data", "order_by", where, required=False) or None
        for key, column in (("person_id", person_id), ("order_by", order_by)):
            if column == text:
                raise ConfigError(f"{where}: [data] {key} names the text column '{text}'; it must be another column.")
        if "student" not in raw:
            raise ConfigError(f"{where}: table [student] is missing; a text (causal-LM) site needs [student] base = "
                              "\"PATH\", the folder of the run's base student that the consortium distributed.")
        return (TextSchema(text, max_length, person_id, order_by),
                base / _text(student, "student", "base", where))
    for key in TEXT_ONLY_FIELDS:
        if key in data:
            raise ConfigError(f"{where}: [data] {key} is only for a text (causal-LM) site, which names its text column "
                              "in [data] text; a classification site has label, classes and features. Remove "
                              f"[data] {key}, or give [data] text instead of label, classes and features.")
    if "student" in raw:
        raise ConfigError(f"{where}: table [student] is only for a text (causal-LM) site ([data] text); a "
                          "classification site's student is built from the run config alone. Remove [student].")
    if preprocessor is not None:
        return _preprocessed_schema(data, preprocessor, where, person_id), None
    label = _text(data, "data", "label", where)
    features = _strings(data, "data", "features", where, 1)
    if label in features:
        raise ConfigError(f"{where}: [data] label column '{label}' is also listed in [data] features.")
    return RecordSchema(label, _strings(data, "data", "classes", where, 2), features, person_id), None


def check_student_base(path: Path, where: str = "[student] base") -> str:
    """Refuse a missing or incomplete base student folder (before any digest is taken); returns its model type.

    The run config pins the folder by digest; this only catches a folder that is plainly not there, so that
    ``site start`` and ``site check`` say so at once rather than the first round.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{where} '{path}' does not exist; copy the run's base student folder (from the consortium "
                          "operator) there, or fix [student] base in site.toml.")
    if not path.is_dir():
        raise ConfigError(f"{where} '{path}' is a file; it must be the run's base student folder (written by "
                          "save_pretrained).")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{where} '{path}' has no config.json; it must be the run's base student folder as the "
                          "consortium distributed it (written by save_pretrained), copied whole.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"{where} '{path}': config.json is not a model configuration ({err}); copy the folder "
                          "again.") from None
    if not any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ConfigError(f"{where} '{path}' has no weights (no *.safetensors or *.bin file); copy the run's base "
                          "student folder again, whole.")
    return str(model_type)


@dataclass(frozen=True)
class SiteFile:
    path: Path
    name: str
    state_dir: Path
    node_key: Path
    coordinator_address: str
    ca_certificate: Path
    data_path: Path
    schema: RecordSchema | TextSchema  # TextSchema: a text (causal-LM) site
    max_records_per_person: int
    teacher_path: Path
    teacher_declaration: TeacherDeclaration
    policy: SitePolicy
    runtime_port: int
    # A text site's copy of the run's base student folder ([student] base); None for a classification site.
    student_base: Path | None = None
    # The proxy set of knowledge runs ([knowledge] proxy_set), copied into the state directory by prepare_state.
    proxy_set: Path | None = None
    # This site's own MLP student in knowledge-mode runs ([knowledge] student_hidden); None: the run's student.
    knowledge_student_hidden: tuple[int, ...] | None = None
    # The site's records of processing ([governance]); None when site.toml has no such table.
    governance: Governance | None = None
    # A classification site's share of persons held out as its test split ([data] test_share).
    test_share: float = DEFAULT_TEST_SHARE
    # A raw table's preprocessing ([data] preprocessor, the file the operator shipped), loaded; prepare_state copies
    # the file into the state directory, where every round checks it against the run's preprocessing_digest.
    preprocessor_path: Path | None = None
    preprocessor: Preprocessor | None = field(default=None, compare=False, repr=False)

    @property
    def text_site(self) -> bool:
        return isinstance(self.schema, TextSchema)

    @classmethod
    def load(cls, path: Path) -> SiteFile:
        path = Path(path).resolve()
        where = str(path)
        raw = load_versioned_toml(path, SCHEMA_VERSION, "create one with `fedistill site init DIR --name NAME`.")
        tables = _tables(raw, where)
        site, coordinator, data = tables["site"], tables["coordinator"], tables["data"]
        teacher, privacy, node, student = tables["teacher"], tables["privacy"], tables["node"], tables["student"]
        base = path.parent
        address = _text(coordinator, "coordinator", "address", where)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}: [coordinator] address must be host:port, got {address!r}.")
        name = _text(site, "site", "name", where)
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: [site] name may hold letters, digits, '-' and '_' only, got {name!r}.")
        person_id = _text(data, "data", "person_id", where, required=False) or None
        max_per_person = data.get("max_records_per_person", 0)
        if isinstance(max_per_person, bool) or not isinstance(max_per_person, int) or max_per_person < 0:
            raise ConfigError(f"{where}: [data] max_records_per_person must be an integer >= 0, got {max_per_person!r}.")
        preprocessor_path, preprocessor = _preprocessor(data, base, where)
        if max_per_person and not (person_id or (preprocessor is not None and preprocessor.spec.person_id)):
            raise ConfigError(f"{where}: [data] max_records_per_person needs [data] person_id (which column names "
                              "the person).")
        accountant = privacy.get("accountant", "prv")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"{where}: [privacy] accountant must be one of {', '.join(ACCOUNTANTS)}, "
                              f"got {accountant!r}.")
        test_metrics = privacy.get("test_metrics", "noised")
        if test_metrics not in TEST_METRICS_RELEASES:
            raise ConfigError(f"{where}: [privacy] test_metrics must be one of {', '.join(TEST_METRICS_RELEASES)} (how "
                              f"the site's test evaluation of each run's student leaves it), got {test_metrics!r}.")
        evaluation_noise = _number(privacy, "privacy", "evaluation_noise_multiplier", where, 0.1, 1e6)
        test_share = data.get("test_share", DEFAULT_TEST_SHARE)
        if isinstance(test_share, bool) or not isinstance(test_share, (int, float)) or not 0 <= test_share <= 0.5:
            raise ConfigError(f"{where}: [data] test_share must be a number in [0, 0.5] (the share of persons held out "
                              f"to evaluate each run's student), got {test_share!r}.")
        runtime_port = node.get("runtime_port", 9094)
        if isinstance(runtime_port, bool) or not isinstance(runtime_port, int) or not 0 < runtime_port < 65536:
            raise ConfigError(f"{where}: [node] runtime_port must be a port number, got {runtime_port!r}.")
        release = privacy.get("release_local_metrics", False)
        release_validation = privacy.get("release_validation_metrics", False)
        for field_name, value in (("release_local_metrics", release), ("release_validation_metrics",
                                                                          release_validation)):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: [privacy] {field_name} must be true or false, got {value!r}.")
        teacher_declaration = _teacher_declaration(teacher, where)
        schema, student_base = _schema(raw, data, student, base, where, person_id, preprocessor)
        proxy_set = _text(tables["knowledge"], "knowledge", "proxy_set", where, required=False)
        own_hidden = tables["knowledge"].get("student_hidden")
        if own_hidden is not None:
            if isinstance(schema, TextSchema):
                raise ConfigError(f"{where}: [knowledge] student_hidden is an MLP student's hidden widths, for a "
                                  "classification site; a text site trains the run's causal-LM student. Remove it.")
            own_hidden = check_student_hidden(own_hidden, f"{where}: [knowledge] student_hidden")
        governance = Governance.from_dict(tables["governance"], f"{where}: [governance]") if "governance" in raw \
            else None
        return cls(
            path=path, name=name, state_dir=base / _text(site, "site", "state_dir", where),
            node_key=base / _text(site, "site", "node_key", where), coordinator_address=address,
            ca_certificate=base / _text(coordinator, "coordinator", "ca_certificate", where),
            data_path=base / _text(data, "data", "path", where),
            schema=schema,
            max_records_per_person=max_per_person, teacher_path=base / _text(teacher, "teacher", "path", where),
            teacher_declaration=teacher_declaration,
            policy=SitePolicy(epsilon_per_run=_number(privacy, "privacy", "epsilon_per_run", where, 0, 1e6),
                              epsilon_lifetime=_number(privacy, "privacy", "epsilon_lifetime", where, 0, 1e6),
                              delta=_number(privacy, "privacy", "delta", where, 0, 0.999999),
                              accountant=accountant, release_local_metrics=release,
                              release_validation_metrics=release_validation, test_metrics=test_metrics,
                              **({} if evaluation_noise is None else
                                 {"evaluation_noise_multiplier": evaluation_noise})),
            runtime_port=runtime_port, student_base=student_base,
            proxy_set=base / proxy_set if proxy_set else None, knowledge_student_hidden=own_hidden,
            governance=governance, test_share=float(test_share), preprocessor_path=preprocessor_path,
            preprocessor=preprocessor)

    def prepare_state(self) -> Site:
        """Write the site's state directory from its records and policy: what the ClientApp loads each message.

        Budget history (privacy.json), the ledger and the noise secret are kept: only the records, the teacher
        path and declaration and the policy are refreshed, so restarting a site never resets what it has spent.
        A text site loads its teacher for its tokenizer, tokenizes its documents once (train, validation and test,
        in order) and records its base student folder, which must be there. A ``[knowledge] proxy_set`` is copied in
        as the site's proxy set (checked against each knowledge run's registered digest before the site trains), and
        a ``[data] preprocessor`` as the site's preprocessor (checked against each run's ``preprocessing_digest``);
        a copy left from an earlier site.toml that no longer names one is removed, or every run would be refused.
        """
        if self.proxy_set is not None and not self.proxy_set.is_file():
            raise ConfigError(f"{self.path}: [knowledge] proxy_set '{self.proxy_set}' is not a file; copy the proxy "
                              "set the consortium operator shipped there, or remove the [knowledge] table.")
        site = self._create_site()
        if self.proxy_set is not None:
            atomic_write_bytes(site.state_dir / PROXY_FILE, self.proxy_set.read_bytes())
        if self.preprocessor_path is not None:
            atomic_write_bytes(site.state_dir / PREPROCESSOR_FILE, self.preprocessor_path.read_bytes())
        else:
            (site.state_dir / PREPROCESSOR_FILE).unlink(missing_ok=True)
        return site

    def records(self) -> SplitData:
        """A classification site's whole table as one split: through its preprocessor when it has one."""
        if isinstance(self.schema, TextSchema):
            raise ConfigError(f"{self.path}: a text site ([data] text) has documents, not records.")
        if self.preprocessor is not None:
            return load_raw_records(self.data_path, self.preprocessor, self.schema.person_id)
        return load_records(self.data_path, self.schema)

    def _create_site(self) -> Site:
        if isinstance(self.schema, TextSchema):
            from distill.causal_lm import load_causal_lm_teacher

            check_student_base(self.student_base, f"{self.path}: [student] base")
            text = self.text_data(load_causal_lm_teacher(self.teacher_path).tokenizer)
            return create_site(self.state_dir, self.name, text.splits, self.teacher_path, self.policy,
                               teacher_declaration=self.teacher_declaration, student_base=self.student_base,
                               governance=self.governance)
        records = self.records()
        if self.max_records_per_person:
            records = records.limit_records_per_person(self.max_records_per_person, seed=0)
        return create_site(self.state_dir, self.name, held_out_by_person(records, self.test_share), self.teacher_path,
                           self.policy,
                           teacher_declaration=self.teacher_declaration,
                           knowledge_student_hidden=self.knowledge_student_hidden, governance=self.governance)

    def text_data(self, tokenizer: Any) -> TextData:
        """A text site's documents, tokenized with its teacher's tokenizer and split in order."""
        if not isinstance(self.schema, TextSchema):
            raise ConfigError(f"{self.path}: not a text site ([data] text is not set).")
        documents = load_documents(self.data_path, self.schema)
        return tokenize_documents(self.data_path, documents, self.schema, tokenizer, self.max_records_per_person)


def held_out_by_person(records: SplitData, share: float) -> dict[str, SplitData]:
    """The site's training split and, with ``share`` > 0, its test split: each person (each record, without a person
    column) is held out by a hash of its id, so a person is in one split only and the split does not move when
    other records are added."""
    if share <= 0:
        return {"train": records}
    keys = records.groups if len(records.groups) else np.array(
        [int(sha256_hex(f"record:{index}")[:15], 16) for index in range(len(records))], dtype=np.int64)
    test = (keys % 10_000) < round(share * 10_000)
    return {"train": records.subset(np.flatnonzero(~test)), "test": records.subset(np.flatnonzero(test))}


def write_template(directory: Path, name: str) -> Path:
    path = directory / SITE_FILE_NAME
    if path.exists():
        raise ConfigError(f"'{path}' already exists; edit it, or choose another directory.")
    path.write_text(TEMPLATE.format(name=name, site_file=path))
    return path
