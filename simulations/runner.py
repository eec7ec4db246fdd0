"""``fedistill simulate``: one multi-site run of a scenario, its baselines, and the run directory it leaves.

    runs/<run-id>/config.json      resolved configuration and its hash
    runs/<run-id>/metrics.jsonl    one line per round
    runs/<run-id>/student/         the final global student (checkpointed atomically every round)
    runs/<run-id>/summary.json     the comparison with the teacher and the baselines (docs/quickstart.md)
    runs/<run-id>/sites/<site>/    each virtual site's state directory, as a real site would keep it
    runs/<run-id>/teacher/         the teacher every site loads
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from client.site import create_site
from coordinator.rounds import Coordinator
from distill.cache import TeacherLogitCache
from distill.evaluate import evaluate_across_sites
from distill.models import count_parameters, load_teacher, teacher_digest
from distill.train import predict_proba
from protocols.canonical import atomic_write_json
from protocols.config import FRAGMENT_PLANS, FederationConfig
from protocols.errors import ConfigError
from simulations.baselines import run_baselines
from simulations.engine import run_federation
from simulations.scenario import ScenarioOptions, load_scenario

SCHEMA_VERSION = 1
HEADLINE_METRIC = "roc_auc"


@dataclass(frozen=True)
class SimulationOptions:
    scenario: str = "hospitals"
    sites: int | None = None
    rounds: int | None = None
    seed: int = 0
    out: Path = Path("runs")
    subsample: float = 1.0
    fragment_plan: str | None = None
    local_steps: int | None = None

    def __post_init__(self) -> None:
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}.")
        if self.fragment_plan is not None and self.fragment_plan not in FRAGMENT_PLANS:
            raise ConfigError(f"--fragment-plan must be one of {', '.join(FRAGMENT_PLANS)}, got {self.fragment_plan!r}.")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"--local-steps must be at least 1, got {self.local_steps}.")


class Reporter(Protocol):
    def stage(self, text: str) -> None: ...

    def rounds_started(self, total: int) -> None: ...

    def round_finished(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def stage(self, text: str) -> None:
        pass

    def rounds_started(self, total: int) -> None:
        pass

    def round_finished(self, record: dict[str, Any]) -> None:
        pass


def package_versions() -> dict[str, str]:
    names = ("fedistill", "flwr", "torch", "transformers", "opacus", "scikit-learn", "numpy")
    return {"python": platform.python_version()} | {name: version(name) for name in names}


def _new_run_dir(out: Path, scenario: str, seed: int) -> tuple[str, Path]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}-{scenario}-seed{seed}"
    candidate, suffix = Path(out) / run_id, 1
    while candidate.exists():
        suffix += 1
        candidate = Path(out) / f"{run_id}-{suffix}"
    candidate.mkdir(parents=True)
    return candidate.name, candidate


def _metric(entry: dict[str, Any], name: str = HEADLINE_METRIC) -> float | None:
    return entry["overall"][name]


def _local_only_summary(local: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_site": local}
    for name in ("accuracy", "roc_auc", "macro_f1", "kappa"):
        values = [v["overall"][name] for v in local.values() if v["overall"][name] is not None]
        out[name] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                     "max": float(np.max(values))} if values else None
    return out


def simulate(options: SimulationOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    reporter.stage(f"loading scenario {options.scenario}")
    scenario = load_scenario(options.scenario, ScenarioOptions(options.sites, options.seed, options.subsample))
    overrides = {key: value for key, value in (("rounds", options.rounds), ("fragment_plan", options.fragment_plan),
                                               ("local_steps", options.local_steps)) if value is not None}
    config = FederationConfig.from_dict({**scenario.federation_defaults, **overrides, "student": scenario.student,
                                         "seed": options.seed}, where="simulation options")
    run_id, run_dir = _new_run_dir(options.out, scenario.name, options.seed)
    atomic_write_json(run_dir / "config.json", {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "scenario": scenario.name,
        "sites": list(scenario.sites), "seed": options.seed, "subsample": options.subsample,
        "federation": config.to_dict(), "config_hash": config.config_hash(), "versions": package_versions(),
    })
    teacher_path = scenario.save_teacher(run_dir / "teacher")
    state_dirs = [create_site(run_dir / "sites" / name, name, splits, teacher_path).state_dir
                  for name, splits in scenario.sites.items()]

    def evaluate(model) -> dict[str, Any]:
        return evaluate_across_sites(lambda split: predict_proba(model, scenario.family, split), scenario.sites)

    def make_coordinator() -> Coordinator:
        reporter.rounds_started(config.rounds)
        return Coordinator(config, run_id, run_dir, evaluate=evaluate, on_round=reporter.round_finished)

    reporter.stage(f"federated distillation: {len(state_dirs)} sites, {config.rounds} rounds")
    coordinator = run_federation(state_dirs, make_coordinator)
    federated_seconds = time.perf_counter() - started

    # The baselines reuse each site's cached teacher logits: the cache hits, the teacher is not run again.
    digest = teacher_digest(teacher_path)
    cached_logits = {
        name: TeacherLogitCache(run_dir / "sites" / name).outputs(
            splits["train"], digest, lambda: load_teacher(teacher_path)).logits
        for name, splits in scenario.sites.items()}
    reporter.stage("baselines: teacher, local-only, centralized")
    baselines = run_baselines(scenario, config, cached_logits, progress=reporter.stage)

    final = coordinator.records[-1]
    federated = final["evaluation"]
    student_bytes = sum(f.stat().st_size for f in coordinator.student_dir.glob("*.safetensors"))
    teacher_size = scenario.teacher.size()
    student_params = count_parameters(coordinator.model)
    if teacher_size["measure"] == "parameters":
        size = {"measure": "parameters", "teacher": teacher_size["value"], "student": student_params,
                "ratio": student_params / teacher_size["value"]}
    else:
        size = {"measure": "serialized-bytes", "teacher": teacher_size["value"], "student": student_bytes,
                "ratio": student_bytes / teacher_size["value"],
                "note": f"the teacher is a {scenario.teacher.kind}; its size is compared as serialized bytes"}
    size["student_parameters"] = student_params
    local = _local_only_summary(baselines["local_only"])
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "scenario": scenario.name,
        "description": scenario.description,
        "config_hash": config.config_hash(),
        "seed": options.seed,
        "rounds": config.rounds,
        "failed_rounds": [r["round"] for r in coordinator.records if r["status"] != "aggregated"],
        "class_names": list(scenario.class_names),
        "sites": {name: {split: {"records": len(data),
                                 "class_counts": {label: int((data.labels == i).sum())
                                                  for i, label in enumerate(scenario.class_names)},
                                 "persons": int(len(np.unique(data.groups)))}
                         for split, data in splits.items()} for name, splits in scenario.sites.items()},
        "provenance": scenario.provenance,
        "headline_metric": HEADLINE_METRIC,
        "models": {
            "teacher": baselines["teacher"],
            "federated": federated,
            "centralized_distilled": baselines["centralized_distilled"],
            "centralized_labels_only": baselines["centralized_labels_only"],
            "local_only": local,
        },
        "comparison": {
            "federated": _metric(federated),
            "centralized_distilled": _metric(baselines["centralized_distilled"]),
            "centralized_labels_only": _metric(baselines["centralized_labels_only"]),
            "local_only_mean": local[HEADLINE_METRIC]["mean"] if local[HEADLINE_METRIC] else None,
            "teacher": _metric(baselines["teacher"]),
        },
        "size": size,
        "teacher_forward_passes": {name: TeacherLogitCache(d).teacher_forward_passes
                                   for name, d in zip(scenario.sites, state_dirs)},
        "seconds": {"federated": round(federated_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "paths": {"run_dir": str(run_dir), "student": str(coordinator.student_dir),
                  "metrics": str(coordinator.metrics_path)},
    }
    c = summary["comparison"]
    if None not in (c["federated"], c["centralized_distilled"]):
        c["federated_minus_centralized"] = c["federated"] - c["centralized_distilled"]
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
