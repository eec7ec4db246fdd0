"""What a scenario hands the harness: per-site private splits, a teacher, a student spec and defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.data import SplitData
from distill.models import Teacher
from protocols.config import StudentSpec
from protocols.errors import ConfigError


@dataclass(frozen=True)
class ScenarioOptions:
    sites: int | None = None
    seed: int = 0
    subsample: float = 1.0


@dataclass
class Scenario:
    name: str
    description: str
    family: str
    class_names: tuple[str, ...]
    sites: dict[str, dict[str, SplitData]]
    teacher: Teacher
    save_teacher: Callable[[Path], Path]
    student: StudentSpec
    federation_defaults: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


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
