"""A site's state directory: the one place a site keeps what must outlive a process.

Deployment runs every message in a fresh process, so nothing lives in module globals::

    <state-dir>/site.json            name, teacher path, teacher declaration (client.teacher), schema_version;
                                     a text (causal-LM) site also student_base, the run's base student folder;
                                     a site with its own knowledge-mode student, its knowledge_student_hidden;
                                     a site that states its records of processing, its governance
    <state-dir>/data.npz             the site's private splits (train / val / test)
    <state-dir>/teacher_cache.*      teacher outputs on the training split (distill.cache)
    <state-dir>/alignment.pt         the site's hidden-state projection, when alignment is on
    <state-dir>/policy.json          the site's privacy caps, delta and accountant (client.budget)
    <state-dir>/privacy.json         every calibration, spend and refusal (client.budget)
    <state-dir>/noise.key            a secret that seeds DP sampling and noise (mode 0600, never sent)
    <state-dir>/preprocessor.skops   a raw table's preprocessing, the run's (client.preprocessing checks it each round)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from client.teacher import TeacherDeclaration
from distill.data import SplitData, load_splits, save_splits
from protocols.accounting import SitePolicy
from protocols.canonical import atomic_write_json, sha256_hex
from protocols.errors import ConfigError
from protocols.governance import Governance

SCHEMA_VERSION = 1
SITE_FILE = "site.json"
DATA_FILE = "data.npz"
NOISE_KEY_FILE = "noise.key"


@dataclass(frozen=True)
class Site:
    name: str
    state_dir: Path
    teacher_path: Path
    teacher_declaration: TeacherDeclaration
    # A text (causal-LM) site's copy of the run's base student (site.toml [student] base, a save_pretrained folder):
    # the run config's base path is the coordinator's, so the site builds its student from this folder, after
    # checking it against the spec's base_digest. None for a classification site.
    student_base: Path | None = None
    # The hidden widths of this site's own MLP student in knowledge-mode runs (site.toml [knowledge] student_hidden);
    # None: the site trains the run's student. In knowledge mode only soft labels leave a site, so its student's
    # architecture is its own business (client/knowledge.py).
    knowledge_student_hidden: tuple[int, ...] | None = None
    # The site's records of processing (site.toml [governance]: lawful basis, categories, de-identification,
    # erasure), recorded in its run-accepted event; None: the site stated none, and the report says not assessed.
    governance: Governance | None = None

    @property
    def data_path(self) -> Path:
        return self.state_dir / DATA_FILE

    def splits(self) -> dict[str, SplitData]:
        splits = load_splits(self.data_path)
        if "train" not in splits:
            raise ConfigError(f"site '{self.name}': {self.data_path} has no 'train' split.")
        return splits

    def noise_secret(self) -> bytes:
        """The site's secret for DP randomness: anyone who knew it could subtract the noise, so it never leaves."""
        path = self.state_dir / NOISE_KEY_FILE
        if not path.is_file():
            write_noise_secret(self.state_dir, os.urandom(32))
        return bytes.fromhex(path.read_text().strip())

    def noise_seed(self, *parts: object) -> int:
        """60 bits for one stream of DP randomness, from the site's secret and ``parts`` (run id, round, purpose):
        the coordinator knows the parts, never the secret."""
        return int(sha256_hex(":".join([self.noise_secret().hex(), *map(str, parts)]))[:15], 16)

    @classmethod
    def load(cls, state_dir: Path) -> Site:
        state_dir = Path(state_dir)
        path = state_dir / SITE_FILE
        if not path.is_file():
            raise ConfigError(f"site state directory '{state_dir}' has no {SITE_FILE}; initialise the site first.")
        raw = json.loads(path.read_text())
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{path}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
        for key in ("name", "teacher"):
            if key not in raw:
                raise ConfigError(f"{path}: field '{key}' is missing.")
        if "teacher_declaration" not in raw:
            # Written by a version that did not record what the teacher was trained on. No default is assumed:
            # whether DP protects this site's records depends on it (client/teacher.py).
            raise ConfigError(f"{path}: field 'teacher_declaration' is missing (site.json was written by an older "
                              "fedistill that did not record what the teacher was trained on). Set [teacher] "
                              "training_data in site.toml and run `fedistill site start SITE_TOML`, which rewrites "
                              "site.json; for a simulated site, run the simulation again.")
        teacher = Path(raw["teacher"])
        base = raw.get("student_base")
        if base is not None and (not isinstance(base, str) or not base):
            raise ConfigError(f"{path}: field 'student_base' must be the path of the base student folder, "
                              f"got {base!r}.")
        student_base = None if base is None else Path(base)
        hidden = raw.get("knowledge_student_hidden")
        if hidden is not None:
            hidden = check_student_hidden(hidden, f"{path}: field 'knowledge_student_hidden'")
        governance = raw.get("governance")
        return cls(name=str(raw["name"]), state_dir=state_dir,
                   teacher_path=teacher if teacher.is_absolute() else state_dir / teacher,
                   teacher_declaration=TeacherDeclaration.from_dict(raw["teacher_declaration"],
                                                                    f"{path} teacher_declaration"),
                   student_base=(student_base if student_base is None or student_base.is_absolute()
                                 else state_dir / student_base),
                   knowledge_student_hidden=hidden,
                   governance=None if governance is None else Governance.from_dict(governance, f"{path} governance"))


def check_student_hidden(value: object, where: str) -> tuple[int, ...]:
    """A site's own MLP student's hidden widths: a list of positive integers (empty: a linear student)."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(width, int) and not isinstance(width, bool) and 1 <= width <= 65536 for width in value):
        raise ConfigError(f"{where} must be a list of hidden layer widths (integers from 1 to 65536; [] for a linear "
                          f"student), got {value!r}.")
    return tuple(value)


def write_noise_secret(state_dir: Path, secret: bytes) -> None:
    path = Path(state_dir) / NOISE_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret.hex() + "\n")


def create_site(state_dir: Path, name: str, splits: dict[str, SplitData], teacher_path: Path,
                policy: SitePolicy | None = None, noise_secret: bytes | None = None, *,
                teacher_declaration: TeacherDeclaration, student_base: Path | None = None,
                knowledge_student_hidden: tuple[int, ...] | None = None, governance: Governance | None = None) -> Site:
    """Write a site's state directory (the simulation harness does this for every virtual site).

    ``teacher_declaration`` says what the teacher was trained on; it has no default, since a DP run refuses a
    teacher that saw private records without DP (client/teacher.py). ``noise_secret`` lets a simulation be
    reproducible; a real site leaves it out and gets ``os.urandom``. ``student_base`` (a text site's copy of the
    run's base student folder) is recorded as an absolute path; a classification site's site.json has no such field.
    ``governance`` is what the site states about its records of processing (site.toml [governance]).
    """
    if not isinstance(teacher_declaration, TeacherDeclaration):
        raise ConfigError(f"site '{name}': teacher_declaration must be a TeacherDeclaration, "
                          f"got {teacher_declaration!r}.")
    state_dir = Path(state_dir)
    save_splits(state_dir / DATA_FILE, splits)
    (policy or SitePolicy()).save(state_dir)
    if noise_secret is not None:
        write_noise_secret(state_dir, noise_secret)
    record = {"schema_version": SCHEMA_VERSION, "name": name, "teacher": str(Path(teacher_path).resolve()),
              "teacher_declaration": teacher_declaration.to_dict()}
    if student_base is not None:
        record["student_base"] = str(Path(student_base).resolve())
    if knowledge_student_hidden is not None:
        record["knowledge_student_hidden"] = list(check_student_hidden(
            knowledge_student_hidden, f"site '{name}': knowledge_student_hidden"))
    if governance is not None:
        record["governance"] = governance.to_dict()
    atomic_write_json(state_dir / SITE_FILE, record)
    return Site.load(state_dir)
