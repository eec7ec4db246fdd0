"""What a site declares about its teacher's training data, and the check a DP run makes on it.

DP-SGD on distillation targets protects a training record only if that record cannot change the targets of
the other records. That holds for a teacher that never saw the site's private records (a public pretrained
model, or one trained on public data) and for a teacher itself trained with DP. It does not hold for a teacher
fitted on the site's private records without DP: one record then changes the teacher, and with it the soft
labels of every other record, so the student's epsilon says nothing about those records (docs/privacy.md,
"The teacher is part of the DP statement").

So every site declares what its teacher was trained on (``[teacher] training_data`` in site.toml, carried into
site.json), and a site whose teacher saw its private records without DP refuses every DP run unless it
acknowledges, in writing, that the report will mark its record-level guarantee as void.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from protocols.errors import ConfigError, UpdateRejected
from protocols.fields import reject_unknown_fields

# public: never saw this site's private records (a public pretrained model, or one trained on public data);
# private-dp: trained on private records with differential privacy;
# private: trained on this site's (or other) private records without DP.
TEACHER_TRAINING_DATA = ("public", "private-dp", "private")


@dataclass(frozen=True)
class TeacherDeclaration:
    training_data: str
    acknowledge_non_dp: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.training_data not in TEACHER_TRAINING_DATA:
            raise ConfigError(
                f"[teacher] training_data must be one of {', '.join(TEACHER_TRAINING_DATA)}, got "
                f"{self.training_data!r} (public: the teacher never saw private records; private-dp: trained on "
                "private records with differential privacy; private: trained on private records without DP).")
        if not isinstance(self.acknowledge_non_dp, bool):
            raise ConfigError(f"[teacher] acknowledge_non_dp must be true or false, got {self.acknowledge_non_dp!r}.")
        if self.acknowledge_non_dp and self.training_data != "private":
            raise ConfigError(
                f"[teacher] acknowledge_non_dp = true is only for training_data = \"private\" (a teacher trained on "
                f"private records without DP), got training_data = {self.training_data!r}; remove "
                "acknowledge_non_dp: there is nothing to acknowledge.")
        if not isinstance(self.description, str):
            raise ConfigError(f"[teacher] description must be a string, got {self.description!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"training_data": self.training_data, "acknowledge_non_dp": self.acknowledge_non_dp,
                "description": self.description}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "teacher declaration") -> TeacherDeclaration:
        """Read a declaration written by :meth:`to_dict`; unknown fields and a missing training_data are errors."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be an object with training_data, acknowledge_non_dp and description, "
                              f"got {raw!r}.")
        reject_unknown_fields(raw, [f.name for f in fields(cls)], where)
        if "training_data" not in raw:
            raise ConfigError(f"{where}: [teacher] training_data is missing; declare one of "
                              f"{', '.join(TEACHER_TRAINING_DATA)}.")
        try:
            return cls(training_data=raw["training_data"], acknowledge_non_dp=raw.get("acknowledge_non_dp", False),
                       description=raw.get("description", ""))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def check_teacher_for_run(declaration: TeacherDeclaration, private_run: bool, site_name: str,
                          teacher_digest: str) -> dict:
    """Refuse a DP run whose targets come from a private, non-DP teacher the site has not acknowledged.

    Returns what the site records in its ledger's ``run-accepted`` event (``"teacher"``): the teacher's digest
    and its declaration. A non-private run accepts any teacher (it states no guarantee to void), but the record
    is the same, so an auditor sees which teacher every run used.
    """
    if private_run and declaration.training_data == "private" and not declaration.acknowledge_non_dp:
        raise UpdateRejected(
            f"site '{site_name}' refuses this differentially private run: its teacher is declared as trained on "
            "private records without differential privacy ([teacher] training_data = \"private\" in site.toml). "
            "DP-SGD on that teacher's targets does not protect those records (one record changes the teacher, and "
            "with it every other record's soft labels), so the run's epsilon would say nothing about them. Train the "
            "teacher with DP and declare training_data = \"private-dp\", use a public teacher (training_data = "
            "\"public\"), or set `[teacher] acknowledge_non_dp = true` in site.toml, knowing that the report will "
            "mark this site's record-level guarantee as void.")
    return {"digest": teacher_digest, "training_data": declaration.training_data,
            "acknowledged_non_dp": bool(declaration.acknowledge_non_dp), "description": declaration.description}
