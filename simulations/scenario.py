"""What a scenario hands the harness: per-site private splits, a teacher, a student spec and defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.teacher import TeacherDeclaration
from distill.data import SplitData
from distill.causal_lm import CausalLMTeacher
from distill.preprocessing import Preprocessor
from distill.models import Teacher
from protocols.config import StudentSpec
from protocols.errors import ConfigError


@dataclass(frozen=True)
class ScenarioOptions:
    sites: int | None = None
    seed: int = 0
    subsample: float = 1.0
    # A named size of a scenario that has several (health-tweets: smoke, tiny, full); None is its default.
    preset: str | None = None
    # Where a scenario keeps what is costly to rebuild and the same for every run (assembled teachers, base
    # students): the simulation's output folder's .cache unless given.
    cache_dir: Path | None = None
    # Told what a long set-up step is doing (the simulate command's progress line); None says nothing.
    progress: Callable[[str], None] | None = field(default=None, compare=False)


@dataclass
class Scenario:
    name: str
    description: str
    family: str
    class_names: tuple[str, ...]
    sites: dict[str, dict[str, SplitData]]
    teacher: Teacher | CausalLMTeacher
    save_teacher: Callable[[Path], Path]
    student: StudentSpec
    federation_defaults: dict[str, Any]
    # What the teacher was trained on, declared for every virtual site (client/teacher.py): no default, since
    # a DP run refuses a teacher fitted on private records without DP.
    teacher_declaration: TeacherDeclaration
    provenance: dict[str, Any] = field(default_factory=dict)
    # A causal-LM scenario whose base student is the product of a public stage (coordinator.public_stage): the
    # student folder before any distillation, for the undistilled baseline. None: the base itself is undistilled.
    initial_student: Path | None = None
    # The public reference set a classification teacher was fitted on (features and labels, no site record):
    # what the public-only baseline and a coordinator stage distil on. None: the scenario has none.
    public: SplitData | None = None
    # The preprocessing that turned the sites' raw tables into the teacher's features (distill/preprocessing.py),
    # fitted on the public set; the run saves it and pins its digest. None: the scenario's features need none.
    preprocessor: Preprocessor | None = None
    # A knowledge run's proxy inputs when they are not the public set's (a causal-LM scenario: public prompts as the
    # teacher tokenizes them, input_ids and attention_mask). None: the public set's inputs, if any.
    proxy: dict[str, np.ndarray] | None = None
    # The settings of each non-federated stage this scenario offers (protocols/curriculum.py), by place, and the
    # stages a run goes through unless told otherwise.
    stage_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_stages: tuple[str, ...] = ("federated",)
    # Federation defaults that replace ``federation_defaults`` when the run starts from a coordinator stage: a
    # distilled start wants gentler federated steps than a random one.
    after_coordinator_stage: dict[str, Any] = field(default_factory=dict)

    def curriculum(self, places: tuple[str, ...] | None) -> list[dict[str, Any]]:
        """The run config's ``curriculum`` for these stages (None: the default ones); [] for the federated stage
        alone, so that a single-stage run's config is what it always was."""
        places = self.default_stages if places is None else places
        unknown = [p for p in places if p != "federated" and p not in self.stage_settings]
        if unknown:
            offered = ", ".join(["federated", *self.stage_settings])
            raise ConfigError(f"--stages: the {self.name} scenario has no {', '.join(unknown)} stage; it offers "
                              f"{offered}.")
        if tuple(places) == ("federated",):
            return []
        return [{"where": place, **self.stage_settings.get(place, {})} for place in places]


def validate_options(options: ScenarioOptions, available_sites: int, default_sites: int, scenario: str) -> int:
    sites = default_sites if options.sites is None else options.sites
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1, got {sites}.")
    if sites > available_sites:
        raise ConfigError(f"--sites: the {scenario} scenario has {available_sites} sites available, got {sites}; "
                          f"choose --sites {available_sites} or fewer.")
    if not 0.0 < options.subsample <= 1.0:
        raise ConfigError(f"--subsample must be in (0, 1], got {options.subsample}.")
    return sites
