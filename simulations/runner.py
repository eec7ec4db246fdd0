"""``fedistill simulate``: one multi-site run of a scenario, its baselines, and the run directory it leaves.

    runs/<run-id>/config.json      resolved configuration and its hash
    runs/<run-id>/metrics.jsonl    one line per round
    runs/<run-id>/student/         the final global student (checkpointed atomically every round)
    runs/<run-id>/summary.json     the comparison with the teacher and the baselines (docs/quickstart.md)
    runs/<run-id>/sites/<site>/    each virtual site's state directory, as a real site would keep it
    runs/<run-id>/teacher/         the teacher every site loads

``fedistill simulate --epsilon 1,3,8,inf`` runs one such directory per privacy level under a sweep
directory (same seed, same splits, baselines trained once) and writes ``sweep.json`` beside them.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file

from client.replay import TRAINING_SETS_FILE
from client.site import create_site
from compliance.continuation import continuation_of
from coordinator.checkpoint import save_student
from coordinator.curriculum import CoordinatorStageResult, keep_start, run_coordinator_stage, split_public
from coordinator.rounds import Coordinator
from distill.cache import TeacherLogitCache
from distill.data import SplitData
from distill.evaluate import classification_metrics, evaluate_across_sites
from distill.preprocessing import PREPROCESSOR_FILE
from distill.models import build_student, count_parameters, load_student_state, load_teacher, teacher_digest
from distill.train import predict_proba
from protocols.accounting import (ACCOUNTANTS, TEST_METRICS_RELEASES, PrivacyState, SitePolicy, group_privacy,
                                  json_epsilon, unit_of_privacy)
from protocols.canonical import atomic_write_bytes, atomic_write_json, sha256_hex
from protocols.curriculum import Continuation, stage_of
from protocols.config import FRAGMENT_PLANS, GRAD_SAMPLE_MODES, PRIVACY_UNITS, FederationConfig
from protocols.errors import ConfigError
from protocols.governance import Governance, PartiesDeclaration
from protocols.knowledge import KNOWLEDGE_MODES, PROXY_FILE, proxy_file_bytes
from simulations.baselines import run_baselines
from simulations.causal_runner import (PRIVACY_FREE_BASELINES, CausalEvaluation, causal_baselines,
                                      causal_summary, site_training)
from simulations.engine import FaultPlan, run_federation
from simulations.scenario import ScenarioOptions
from simulations.scenarios import load_scenario

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
    batch_size: int | None = None
    learning_rate: float | None = None
    # Privacy: None keeps the scenario's default target; math.inf asks for a non-private run.
    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    grad_sample_mode: str | None = None
    # The unit of privacy: "person" (all of a person's records, where the data names persons) or "record".
    privacy_unit: str = "person"
    # How the simulated sites release their test evaluation of the global student: noised (the default), clear or
    # none; and after which rounds (0: the last only).
    test_metrics: str = "noised"
    evaluate_every: int | None = None
    accountant: str = "prv"
    site_caps: dict[str, float] = field(default_factory=dict)
    max_records_per_person: int | None = None
    min_sites: int | None = None
    sites_per_round: int | None = None
    fraction_per_round: float | None = None
    # Fault injection: each site fails a round with this probability, plus the chosen (site, round)s.
    drop_rate: float = 0.0
    fail_sites: tuple[tuple[str, int], ...] = ()
    secure_aggregation: bool | None = None
    preset: str | None = None
    # The curriculum's stages by place, in order (protocols/curriculum.py); None: the scenario's default ones.
    stages: tuple[str, ...] | None = None
    # A finished run (its directory) whose student and sites this run continues: budgets compose across the two.
    from_run: Path | None = None
    # Each site's training split limited to this share of its persons (data that has not arrived yet).
    data_share: float = 1.0
    # Incremental: each site trains on the records it has not trained on before, plus (when set) its replay
    # buffer of earlier records on which the teacher's entropy is at least this share of its maximum.
    incremental: bool = False
    replay_min_entropy: float | None = None
    # Keep the round whose student scored best on the validation ROC-AUC the sites release, not the last one.
    keep_best: bool = False
    # What travels up each round (protocols/knowledge.py): weights, knowledge or hybrid; and the soft labels' source.
    knowledge_mode: str = "weights"
    knowledge_source: str = "local-student"
    # The proxy set: all of the scenario's public inputs, or a sample of this many (seeded by the run's seed).
    proxy_records: int | None = None
    # Source pate: the ensemble's size and its noise multiplier (None: protocols/knowledge.py's defaults).
    pate_teachers: int | None = None
    pate_noise_multiplier: float | None = None
    # A causal-LM knowledge run's shared tokens (its release's other columns: one bucket for every other token).
    shared_tokens: int = 63
    # Knowledge mode: sites that train their own MLP student (these hidden widths) instead of the run's.
    site_students: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # The coordinator's server-side distillation per round (None: protocols/knowledge.py's defaults).
    server_steps: int | None = None
    server_learning_rate: float | None = None
    # What only people know: the operator's parties.toml (recorded in the coordinator's ledger at run start) and
    # each site's [governance] table (recorded in its run-accepted event); docs/deploy.md, "Parties and governance".
    parties: PartiesDeclaration | None = None
    site_governance: dict[str, Governance] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.proxy_records is not None and self.proxy_records < 1:
            raise ConfigError(f"--proxy-records must be at least 1, got {self.proxy_records}.")
        if self.shared_tokens < 1:
            raise ConfigError(f"--shared-tokens must be at least 1, got {self.shared_tokens}.")
        if self.knowledge_mode not in ("weights", *KNOWLEDGE_MODES):
            raise ConfigError(f"--knowledge-mode must be one of weights, {', '.join(KNOWLEDGE_MODES)}, got "
                              f"{self.knowledge_mode!r}.")
        if self.test_metrics not in TEST_METRICS_RELEASES:
            raise ConfigError(f"--test-metrics must be one of {', '.join(TEST_METRICS_RELEASES)}, got "
                              f"{self.test_metrics!r}.")
        if self.evaluate_every is not None and self.evaluate_every < 0:
            raise ConfigError(f"--evaluate-every must be 0 (the last round only) or more, got {self.evaluate_every}.")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"--privacy-unit must be one of {', '.join(PRIVACY_UNITS)}, got {self.privacy_unit!r}.")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}.")
        if self.fragment_plan is not None and self.fragment_plan not in FRAGMENT_PLANS:
            raise ConfigError(f"--fragment-plan must be one of {', '.join(FRAGMENT_PLANS)}, got {self.fragment_plan!r}.")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"--local-steps must be at least 1, got {self.local_steps}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"--epsilon values must be positive (or inf for no DP), got {self.epsilon}.")
        if self.delta is not None and not 0 < self.delta < 0.1:
            raise ConfigError(f"--delta must be in (0, 0.1), got {self.delta}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"--clip must be positive, got {self.max_grad_norm}.")
        if self.grad_sample_mode is not None and self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"--grad-sample-mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                              f"got {self.grad_sample_mode!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}.")
        for site, cap in self.site_caps.items():
            if not cap > 0 or not math.isfinite(cap):
                raise ConfigError(f"--site-cap {site}={cap}: a cap must be a positive, finite epsilon.")
        if self.max_records_per_person is not None and self.max_records_per_person < 1:
            raise ConfigError(f"--max-records-per-person must be at least 1, got {self.max_records_per_person}.")
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ConfigError(f"--drop-rate must be in [0, 1], got {self.drop_rate}.")
        if self.min_sites is not None and self.min_sites < 1:
            raise ConfigError(f"--min-sites must be at least 1, got {self.min_sites}.")
        if not 0.0 < self.data_share <= 1.0:
            raise ConfigError(f"--data-share must be in (0, 1], got {self.data_share}.")
        if self.replay_min_entropy is not None and not self.incremental:
            raise ConfigError("--replay-min-entropy sets an incremental run's replay buffer; add --incremental.")


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


def _new_run_dir(out: Path, run_id: str) -> tuple[str, Path]:
    candidate, suffix = Path(out) / run_id, 1
    while candidate.exists():
        suffix += 1
        candidate = Path(out) / f"{run_id}-{suffix}"
    candidate.mkdir(parents=True)
    return candidate.name, candidate


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def epsilon_label(epsilon: float) -> str:
    """A privacy level as written on the command line and in directory names: ``inf`` means no DP."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _metric(entry: dict[str, Any], name: str = HEADLINE_METRIC) -> float | None:
    return entry["overall"][name]


def _local_only_summary(local: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_site": local}
    for name in ("accuracy", "roc_auc", "macro_f1", "kappa"):
        values = [v["overall"][name] for v in local.values() if v["overall"][name] is not None]
        out[name] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                     "max": float(np.max(values))} if values else None
    return out


def _knowledge(options: SimulationOptions, scenario, proxy_digest: str | None) -> dict[str, Any] | None:
    """The run config's ``knowledge`` for a knowledge or hybrid run: the scenario's public set is its proxy set."""
    if options.knowledge_mode == "weights":
        return None
    if scenario.public is None and scenario.proxy is None:
        raise ConfigError(f"--knowledge-mode {options.knowledge_mode}: the {scenario.name} scenario has no public "
                          "proxy set; use --knowledge-mode weights.")
    chosen = {name: value for name, value in (("pate_teachers", options.pate_teachers),
                                              ("pate_noise_multiplier", options.pate_noise_multiplier),
                                              ("server_steps", options.server_steps),
                                              ("server_learning_rate", options.server_learning_rate))
              if value is not None}
    proxy = proxy_inputs(scenario, options)
    # A causal-LM run's layout: the prompts' real token positions by the shared tokens and one bucket for the rest.
    # Released at the scenario's own distillation temperature (T = 1 for the text path: at a higher one most of the
    # mass leaves the shared tokens for the bucket, docs/causal_lm.md).
    token_level = {"proxy_positions": int(proxy["attention_mask"].sum()), "classes": options.shared_tokens + 1,
                   "temperature": float(scenario.federation_defaults["temperature_start"])} if (
        scenario.family == "causal_lm") else {"classes": len(scenario.class_names)}
    return {"mode": options.knowledge_mode, "source": options.knowledge_source, "proxy_digest": proxy_digest,
            "proxy_records": len(next(iter(proxy.values()))), **token_level, **chosen}


def proxy_inputs(scenario, options: SimulationOptions) -> dict[str, np.ndarray]:
    """The run's proxy set: the scenario's public inputs (never their labels), all or a seeded sample."""
    inputs = scenario.proxy if scenario.proxy is not None else scenario.public.inputs
    count = len(next(iter(inputs.values())))
    if options.proxy_records is None or options.proxy_records >= count:
        return dict(inputs)
    chosen = np.sort(np.random.default_rng(options.seed).choice(count, options.proxy_records, replace=False))
    return {name: values[chosen] for name, values in inputs.items()}


def _federation_config(options: SimulationOptions, scenario, continues: Continuation | None = None,
                       proxy_digest: str | None = None, preprocessing_digest: str | None = None) -> FederationConfig:
    overrides: dict[str, Any] = {key: value for key, value in (
        ("rounds", options.rounds), ("fragment_plan", options.fragment_plan), ("local_steps", options.local_steps),
        ("batch_size", options.batch_size), ("learning_rate", options.learning_rate), ("target_delta", options.delta), ("max_grad_norm", options.max_grad_norm),
        ("grad_sample_mode", options.grad_sample_mode), ("privacy_unit", options.privacy_unit),
        ("evaluate_every", options.evaluate_every),
        ("min_sites", options.min_sites), ("sites_per_round", options.sites_per_round),
        ("fraction_per_round", options.fraction_per_round),
        ("secure_aggregation", options.secure_aggregation)) if value is not None}
    if options.epsilon is not None:
        overrides["target_epsilon"] = None if math.isinf(options.epsilon) else options.epsilon
    stages = options.stages
    if stages is None and continues is not None:
        # A continuing run starts from the earlier run's student: the scenario's coordinator stage has no place.
        stages = tuple(place for place in scenario.default_stages if place != "coordinator")
    curriculum = scenario.curriculum(stages)
    if options.incremental or options.keep_best:
        curriculum = curriculum or [{"where": "federated"}]
        federated = next(stage for stage in curriculum if stage["where"] == "federated")
        if options.incremental:
            federated |= {"records": "new"} | ({"replay_min_entropy": options.replay_min_entropy}
                                               if options.replay_min_entropy is not None else {})
        if options.keep_best:
            federated["keep_best"] = True
    defaults = dict(scenario.federation_defaults)
    if continues is not None or any(stage["where"] == "coordinator" for stage in curriculum):
        # A distilled start, from a coordinator stage or an earlier run, wants the gentler federated steps.
        defaults |= scenario.after_coordinator_stage
    return FederationConfig.from_dict({**defaults, **overrides, "student": scenario.student,
                                       "seed": options.seed, **({"curriculum": curriculum} if curriculum else {}),
                                       **({"continues": continues.to_dict()} if continues is not None else {}),
                                       "knowledge": _knowledge(options, scenario, proxy_digest),
                                       "preprocessing_digest": preprocessing_digest},
                                      where="simulation options")


def _prepare_sites(scenario, options: SimulationOptions) -> None:
    if options.site_students and (options.knowledge_mode != "knowledge" or scenario.family != "mlp"):
        raise ConfigError("--site-student: a site's own student trains in --knowledge-mode knowledge only, where only "
                          f"soft labels travel, and only as an MLP (this run: mode {options.knowledge_mode}, student "
                          f"{scenario.family}).")
    for option, names in (("--site-cap", set(options.site_caps)), ("--fail-site", {s for s, _ in options.fail_sites}),
                          ("--site-student", set(options.site_students)),
                          ("--site-governance", set(options.site_governance))):
        unknown = sorted(names - set(scenario.sites))
        if unknown:
            raise ConfigError(f"{option} names unknown site(s) {', '.join(unknown)}; the sites are "
                              f"{', '.join(scenario.sites)}.")
    if options.max_records_per_person is not None:
        for offset, splits in enumerate(scenario.sites.values()):
            splits["train"] = splits["train"].limit_records_per_person(options.max_records_per_person,
                                                                       options.seed + offset)
    if options.data_share < 1.0:
        for offset, splits in enumerate(scenario.sites.values()):
            splits["train"] = _share_of_persons(splits["train"], options.data_share, options.seed + offset)


def _share_of_persons(train: SplitData, share: float, seed: int) -> SplitData:
    """The records of the first ``share`` of the split's persons, in a fixed order: a later run with a larger share
    holds these and more, as a site whose new records arrived."""
    groups = train.groups if len(train.groups) else np.arange(len(train))
    persons = np.random.default_rng(seed).permutation(np.unique(groups))
    kept = set(persons[:max(1, math.ceil(share * len(persons)))].tolist())
    return train.subset(np.flatnonzero([g in kept for g in groups]))


def _site_privacy(state_dir: Path, run_id: str, train_records_per_person: int, bounded: bool) -> dict[str, Any]:
    """The site's own account of the run, recomputed from its stored history (what a report would quote)."""
    policy = SitePolicy.load(state_dir)
    state = PrivacyState.load(state_dir)
    calibration = state.calibrations.get(run_id)
    spends = state.run_spends(run_id)
    steps = [s for s in spends if s.mechanism == "dp-sgd"]
    delta = calibration.delta if calibration else None
    epsilon = state.epsilon(delta, policy.accountant, run_id) if delta else (math.inf if spends else 0.0)
    lifetime = state.epsilon(delta, policy.accountant) if delta else (math.inf if state.spends else 0.0)
    unit = calibration.unit if calibration else "record"
    out: dict[str, Any] = {
        "unit": unit, "units": calibration.records if calibration else None,
        "epsilon": json_epsilon(epsilon), "delta": delta,
        # Every run this site took part in (a continuing run's sites keep their account): what its lifetime cap sees.
        "epsilon_lifetime": json_epsilon(lifetime), "runs_in_account": len({s.run_id for s in state.spends}),
        "accountant": policy.accountant, "cap_per_run": policy.epsilon_per_run,
        "cap_lifetime": policy.epsilon_lifetime,
        "noise_multiplier": calibration.noise_multiplier if calibration else None,
        "sample_rate": calibration.sample_rate if calibration else None,
        "steps": sum(s.steps for s in steps), "empty_batches": sum(s.empty_batches for s in steps),
        "rounds_trained": [s.round for s in steps],
        "pate_releases": [s.round for s in spends if s.mechanism == "pate"],
        "rounds_refused": [r["round"] for r in state.refusals if r["run_id"] == run_id],
        "max_records_per_person": train_records_per_person,
        "records_per_person_bounded": bounded,
    }
    sets = state_dir / TRAINING_SETS_FILE
    chosen = json.loads(sets.read_text())["runs"].get(run_id) if sets.is_file() else None
    if chosen is not None:
        out["training_set"] = {"records": chosen["mode"], "trained_on": len(chosen["keys"]), "new": chosen["new"],
                               "replay": chosen["replay"]}
    k = train_records_per_person
    if unit == "person":
        out["person_level"] = {"k": k, "epsilon": epsilon, "delta": delta, "by": "person-level DP-SGD"}
    elif delta and math.isfinite(epsilon) and k >= 1:
        out["person_level"] = group_privacy(k, epsilon, delta)
    return out


def simulate(options: SimulationOptions, reporter: Reporter | None = None, baselines: dict[str, Any] | None = None,
             run_name: str | None = None, client_mods: list[Callable] | None = None) -> dict[str, Any]:
    """One federated run of a scenario; ``baselines`` from an earlier run on the same splits are reused if given.

    ``client_mods`` wrap every site's ClientApp (outside SecAgg+): a researcher's probe, or a hostile site.
    """
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    reporter.stage(f"loading scenario {options.scenario}")
    scenario = load_scenario(options.scenario, ScenarioOptions(options.sites, options.seed, options.subsample,
                                                               options.preset, Path(options.out) / ".cache",
                                                               progress=reporter.stage))
    continues = continuation_of(options.from_run, scenario.student) if options.from_run is not None else None
    if options.from_run is not None:
        _check_same_sites(options.from_run, scenario)
    # A knowledge run's proxy set: the scenario's public inputs, never their labels, registered by the file's SHA-256.
    proxy = (proxy_file_bytes(proxy_inputs(scenario, options)) if options.knowledge_mode != "weights"
             and (scenario.public is not None or scenario.proxy is not None) else None)
    # The scenario's preprocessing, pinned by the digest of the file every site holds.
    preprocessor = scenario.preprocessor.to_bytes() if scenario.preprocessor is not None else None
    config = _federation_config(options, scenario, continues, sha256_hex(proxy) if proxy is not None else None,
                                sha256_hex(preprocessor) if preprocessor is not None else None)
    if config.secure_aggregation and len(scenario.sites) < config.min_cohort:
        raise ConfigError(f"--sites: secure aggregation needs at least min_cohort={config.min_cohort} sites, got "
                          f"{len(scenario.sites)}; use --sites {config.min_cohort} or more, or --no-secure-aggregation.")
    _prepare_sites(scenario, options)
    _, run_dir = _new_run_dir(options.out, run_name or f"{_stamp()}-{scenario.name}-seed{options.seed}")
    # A simulated run's id is a function of its configuration: simulated sites derive their noise secrets from
    # the seed, so a rerun reproduces the DP noise. A deployed run gets a fresh id from Flower, and fresh noise.
    run_id = f"{scenario.name}-seed{options.seed}-{config.config_hash()[:12]}"
    atomic_write_json(run_dir / "config.json", {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "scenario": scenario.name,
        "sites": list(scenario.sites), "seed": options.seed, "subsample": options.subsample,
        "site_caps": options.site_caps, "accountant": options.accountant,
        "fault_injection": {"drop_rate": options.drop_rate, "fail_sites": [list(f) for f in options.fail_sites]},
        "max_records_per_person": options.max_records_per_person, "data_share": options.data_share,
        "from_run": str(Path(options.from_run).resolve()) if options.from_run is not None else None,
        "federation": config.to_dict(), "config_hash": config.config_hash(), "versions": package_versions(),
    })
    teacher_path = scenario.save_teacher(run_dir / "teacher")
    if preprocessor is not None:
        atomic_write_bytes(run_dir / PREPROCESSOR_FILE, preprocessor)
    proxy_path = None
    if proxy is not None:
        proxy_path = run_dir / PROXY_FILE
        atomic_write_bytes(proxy_path, proxy)
    coordinator_stage = _coordinator_stage(scenario, config, run_dir, teacher_path, reporter)
    start_state = None
    if options.from_run is not None:
        start_state = keep_start(run_dir, Path(options.from_run) / "student" / "model.safetensors")
        reporter.stage(f"continuing run {continues.run_id}: its student, and its sites' ledgers and budgets")
    state_dirs = []
    for name, splits in scenario.sites.items():
        # A simulated site's policy caps each run at the run's target unless --site-cap says otherwise.
        # Simulated sites release their site-local and validation metrics (a real site's policy says; the default is
        # not to).
        policy = SitePolicy(epsilon_per_run=options.site_caps.get(name, config.target_epsilon),
                            accountant=options.accountant, release_local_metrics=True,
                            release_validation_metrics=True, test_metrics=options.test_metrics)
        secret = bytes.fromhex(sha256_hex(f"simulation:{options.seed}:{name}:noise"))
        if options.from_run is not None:
            # The same site, later: its ledger, keys, privacy account and training sets go on; its data and teacher
            # path are this run's.
            shutil.copytree(Path(options.from_run) / "sites" / name, run_dir / "sites" / name)
        state_dirs.append(create_site(run_dir / "sites" / name, name, splits, teacher_path, policy, secret,
                                      teacher_declaration=scenario.teacher_declaration,
                                      knowledge_student_hidden=options.site_students.get(name),
                                      governance=options.site_governance.get(name)).state_dir)
        if proxy is not None:
            atomic_write_bytes(state_dirs[-1] / PROXY_FILE, proxy)  # the operator ships the same file to every site
        if preprocessor is not None:
            atomic_write_bytes(state_dirs[-1] / PREPROCESSOR_FILE, preprocessor)

    causal = scenario.family == "causal_lm"
    if causal:
        reporter.stage("scoring the teacher on every site's held-out texts")
        evaluate: Callable[[Any], dict[str, Any]] = CausalEvaluation(scenario)
    else:
        def evaluate(model) -> dict[str, Any]:
            return evaluate_across_sites(lambda split: predict_proba(model, scenario.family, split), scenario.sites)

    def make_coordinator() -> Coordinator:
        reporter.rounds_started(config.rounds)
        return Coordinator(config, run_id, run_dir, evaluate=evaluate, on_round=reporter.round_finished,
                           coordinator_stage=coordinator_stage.record if coordinator_stage else None,
                           initial_state=coordinator_stage.state if coordinator_stage else start_state,
                           proxy_path=proxy_path, parties=options.parties)

    privacy_text = (f"DP-SGD at epsilon {config.target_epsilon:g} per site" if config.private else "no DP")
    reporter.stage(f"federated distillation: {len(state_dirs)} sites, {config.rounds} rounds, {privacy_text}")
    faults = FaultPlan(options.drop_rate, frozenset(options.fail_sites), options.seed)
    coordinator = run_federation(state_dirs, make_coordinator,
                                 faults=faults if options.drop_rate or options.fail_sites else None,
                                 client_mods=client_mods)
    federated_seconds = time.perf_counter() - started
    if causal:
        reporter.stage("baselines: teacher, undistilled, public-only, centralized distilled (non-private and at the "
                       "run's epsilon)" if baselines is None else "baseline: centralized distilled at the run's epsilon")
        if baselines is None or config.private:
            baselines = causal_baselines(scenario, config, evaluate,
                                         site_training(scenario, run_dir, teacher_path, config), reuse=baselines)
        reporter.stage("exporting the student, timing teacher and student")
        task = causal_summary(scenario, config, coordinator, run_dir, teacher_path, baselines, evaluate, run_id)
        return _write_summary(run_dir, {
            **_run_summary(scenario, config, coordinator, options, run_id, state_dirs, "document"), **task,
            "seconds": {"federated": round(federated_seconds, 1), "total": round(time.perf_counter() - started, 1)},
            "paths": {"run_dir": str(run_dir), "student": str(coordinator.student_dir),
                      "metrics": str(coordinator.metrics_path)}})

    if baselines is None:
        # The baselines reuse each site's cached teacher logits: the cache hits, the teacher is not run again.
        digest = teacher_digest(teacher_path)
        cached_logits = {
            name: TeacherLogitCache(run_dir / "sites" / name).outputs(
                splits["train"], digest, lambda: load_teacher(teacher_path)).logits
            for name, splits in scenario.sites.items()}
        reporter.stage("baselines (non-private): teacher, local-only, centralized")
        # The baselines start from scratch, so they train with the single-stage settings (a coordinator stage's
        # gentler federated rate would handicap them), the command line's overrides included.
        from_scratch = _federation_config(replace(options, stages=("federated",), knowledge_mode="weights"), scenario)
        baselines = run_baselines(scenario, from_scratch, cached_logits, progress=reporter.stage)

    final = coordinator.records[-1]
    # The last round's record holds its student's evaluation, unless the run kept an earlier round's student.
    kept_last = coordinator.kept_round in (None, final["round"])
    federated = final["evaluation"] if kept_last and "evaluation" in final else evaluate(coordinator.model)
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
        **_run_summary(scenario, config, coordinator, options, run_id, state_dirs, "record"),
        "class_names": list(scenario.class_names),
        "sites": {name: {split: {"records": len(data),
                                 "class_counts": {label: int((data.labels == i).sum())
                                                  for i, label in enumerate(scenario.class_names)},
                                 "persons": int(len(np.unique(data.groups)))}
                         for split, data in splits.items()} for name, splits in scenario.sites.items()},
        "headline_metric": HEADLINE_METRIC,
        "models": {
            "teacher": baselines["teacher"],
            "federated": federated,
            "centralized_distilled": baselines["centralized_distilled"],
            "centralized_labels_only": baselines["centralized_labels_only"],
            "local_only": local,
            **({"public_only": baselines["public_only"]} if "public_only" in baselines else {}),
        },
        "comparison": {
            "federated": _metric(federated),
            "centralized_distilled": _metric(baselines["centralized_distilled"]),
            "centralized_labels_only": _metric(baselines["centralized_labels_only"]),
            "local_only_mean": local[HEADLINE_METRIC]["mean"] if local[HEADLINE_METRIC] else None,
            "teacher": _metric(baselines["teacher"]),
            **({"public_only": _metric(baselines["public_only"])} if "public_only" in baselines else {}),
        },
        "stages": _stage_summaries(scenario, coordinator_stage, coordinator.model, federated,
                                   coordinator.site_local, state_dirs, run_id),
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
    if c.get("public_only") is not None and c["federated"] is not None:
        c["federated_minus_public_only"] = c["federated"] - c["public_only"]
    return _write_summary(run_dir, summary)


def _check_same_sites(from_run: Path, scenario) -> None:
    """A continuing simulation runs the earlier run's scenario with the same sites (their state goes on)."""
    prior = json.loads((Path(from_run) / "config.json").read_text())
    if prior.get("scenario") != scenario.name or prior.get("sites") != list(scenario.sites):
        raise ConfigError(f"--from {from_run}: that run is scenario {prior.get('scenario')} with sites "
                          f"{', '.join(prior.get('sites', []))}; this one is {scenario.name} with "
                          f"{', '.join(scenario.sites)}. Continue it with the same --scenario, --sites and --seed.")


def _coordinator_stage(scenario, config: FederationConfig, run_dir: Path, teacher_path: Path,
                       reporter: Reporter) -> CoordinatorStageResult | None:
    """The curriculum's coordinator stage, when it has one: distilled on the public records, kept in stages/."""
    stage = stage_of(config.curriculum, "coordinator")
    if stage is None:
        return None
    if scenario.public is None:
        raise ConfigError(f"curriculum: the {scenario.name} scenario has no public reference set for a coordinator "
                          "stage; remove the stage.")
    reporter.stage(f"coordinator stage: {stage.steps} steps on the public reference set"
                   + (f" plus {stage.synthetic_records:,} teacher-labelled interpolations" if stage.synthetic_records
                      else ""))
    transfer, holdout = split_public(scenario.public, config.seed)
    result = replace(run_coordinator_stage(scenario.student, transfer, scenario.teacher, teacher_digest(teacher_path),
                                           stage, config.seed, config.fragment_patterns), holdout=holdout)
    save_student(result.model, scenario.student, run_dir / "stages" / "coordinator", config,
                 {"stage": "coordinator", "student_digest": result.record["student_digest"]})
    return result


def _stage_summaries(scenario, coordinator_stage: CoordinatorStageResult | None,
                     federated_model, federated: dict[str, Any], site_local: dict[str, Any] | None,
                     state_dirs: list[Path], run_id: str) -> list[dict[str, Any]]:
    """Each stage's student on the sites' test splits and on the coordinator stage's public held-out records."""
    holdout = coordinator_stage.holdout if coordinator_stage is not None else None

    def on_holdout(model) -> dict[str, Any] | None:
        if holdout is None:
            return None
        return classification_metrics(holdout.labels, predict_proba(model, scenario.family, holdout), None)

    stages = []
    if coordinator_stage is not None:
        stages.append({"stage": "coordinator", "record": coordinator_stage.record,
                       "evaluation": evaluate_across_sites(
                           lambda split: predict_proba(coordinator_stage.model, scenario.family, split),
                           scenario.sites)["overall"],
                       "public_holdout": on_holdout(coordinator_stage.model)})
    stages.append({"stage": "federated", "evaluation": federated["overall"],
                   "public_holdout": on_holdout(federated_model)})
    if site_local is not None:
        stages.append(_site_local_summary(scenario, site_local, state_dirs, run_id, on_holdout))
    return stages


def _site_local_summary(scenario, site_local: dict[str, Any], state_dirs: list[Path], run_id: str,
                        on_holdout) -> dict[str, Any]:
    """What the sites released of their site-local stage, and (the harness holds every split) each site's own
    copy scored on its own test split, pooled: the test records as their sites would now serve them."""
    scores, labels, holdout = [], [], {}
    for name, state_dir in zip(scenario.sites, state_dirs):
        path = state_dir / "site-local" / run_id / "model.safetensors"
        if not path.is_file():
            continue
        model = build_student(scenario.student)
        load_student_state(model, scenario.family, load_file(str(path)))
        test = scenario.sites[name]["test"]
        scores.append(predict_proba(model, scenario.family, test))
        labels.append(test.labels)
        holdout[name] = (on_holdout(model) or {}).get("roc_auc")
    pooled = (classification_metrics(np.concatenate(labels), np.concatenate(scores), None) if scores else None)
    return {"stage": "site-local", "released": site_local["sites"], "failures": site_local["failures"],
            "rejected": site_local["rejected"],
            "evaluation": pooled, "public_holdout_by_site": holdout if any(v is not None for v in holdout.values())
            else None}


def _run_summary(scenario, config: FederationConfig, coordinator: Coordinator, options: SimulationOptions,
                 run_id: str, state_dirs: list[Path], unit_item: str) -> dict[str, Any]:
    """The part of ``summary.json`` every task shares: the run, its rounds, refusals, failures and privacy.
    ``unit_item`` is what one record is (a record, a document)."""
    final = coordinator.records[-1]
    sites = {name: _site_privacy(d, run_id, splits["train"].max_records_per_person(),
                                 options.max_records_per_person is not None)
             for (name, splits), d in zip(scenario.sites.items(), state_dirs)}
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "scenario": scenario.name,
        "description": scenario.description,
        "config_hash": config.config_hash(),
        "seed": options.seed,
        "rounds": config.rounds,
        "failed_rounds": [r["round"] for r in coordinator.records if r["status"] == "failed"],
        # A run that keeps its best round: that round (0: the start), and each round's pooled validation ROC-AUC.
        **({"kept_round": coordinator.kept_round,
            "validation_by_round": {str(r): v for r, v in sorted(coordinator.validation_scores.items())}}
           if coordinator.kept_round is not None else {}),
        "stopped": ({"round": final["round"], "reason": final["reason"]} if final["status"] == "stopped" else None),
        "refusals": {str(r["round"]): r["refusals"] for r in coordinator.records if r["refusals"]},
        # The sites' own test evaluations of the student, as released (noised by default) and pooled: what a deployed
        # run reports, through the same messages.
        "site_evaluation": [{key: evaluation[key] for key in ("round", "after_round", "pooled", "failures", "rejected")}
                            | {"sites": {site: {k: v for k, v in release.items() if k != "histogram"}
                                         for site, release in evaluation["sites"].items()}}
                            for evaluation in coordinator.site_evaluations.values()],
        "site_failures": {str(r["round"]): r["failures"] for r in coordinator.records if r["failures"]},
        "privacy": {
            "unit": _summary_unit(sites, unit_item),
            "mechanism": ("Poisson-sampled DP-SGD (Opacus), " + (
                "each sampled person's summed gradient clipped as one (hooks)" if "person" in
                {site["unit"] for site in sites.values()} else config.grad_sample_mode + " clipping")
                if config.private else "none: non-private run"),
            "target_epsilon": config.target_epsilon, "max_grad_norm": config.max_grad_norm if config.private else None,
            "sites": sites,
        },
        "provenance": scenario.provenance,
    }


def _summary_unit(sites: dict[str, dict[str, Any]], item: str) -> str:
    """The run's unit of privacy: the sites' own (each site calibrates for the persons its records name)."""
    units = {name: site["unit"] for name, site in sites.items()}
    if len(set(units.values())) == 1:
        return unit_of_privacy(next(iter(units.values())), item)
    return "per site: " + "; ".join(f"{name}: {unit_of_privacy(unit, item)}" for name, unit in units.items())


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


CLASSIFICATION_METRICS = ("roc_auc", "accuracy", "macro_f1", "kappa")
CLASSIFICATION_BASELINES = ("teacher", "centralized_distilled", "centralized_labels_only", "local_only_mean",
                            "public_only")


def reusable_baselines(summary: dict[str, Any]) -> dict[str, Any]:
    models = summary["models"]
    if summary.get("task") == "causal-lm":
        return {key: models[key] for key in PRIVACY_FREE_BASELINES if key in models}
    return {"teacher": models["teacher"], "local_only": models["local_only"]["per_site"],
            "centralized_distilled": models["centralized_distilled"],
            "centralized_labels_only": models["centralized_labels_only"],
            **({"public_only": models["public_only"]} if "public_only" in models else {})}


def simulate_sweep(options: SimulationOptions, levels: list[float], reporter: Reporter | None = None) -> dict[str, Any]:
    """One run per privacy level (``math.inf``: no DP) on the same seed and splits; baselines are trained once."""
    if not levels:
        raise ConfigError("--epsilon: give at least one privacy level, e.g. --epsilon 1,3,8,inf.")
    reporter = reporter or SilentReporter()
    sweep_id, sweep_dir = _new_run_dir(options.out, f"{_stamp()}-{options.scenario}-seed{options.seed}-sweep")
    baselines: dict[str, Any] | None = None
    rows = []
    for epsilon in levels:
        label = epsilon_label(epsilon)
        reporter.stage(f"privacy level epsilon = {label}")
        summary = simulate(replace(options, epsilon=epsilon, out=sweep_dir), reporter, baselines,
                           run_name=f"epsilon-{label}")
        baselines = baselines or reusable_baselines(summary)
        federated = summary["models"]["federated"]["overall"]
        rows.append({
            "target_epsilon": label,
            "federated": {m: federated[m] for m in summary.get("metrics", CLASSIFICATION_METRICS)},
            "epsilon_spent": {name: site["epsilon"] for name, site in summary["privacy"]["sites"].items()},
            "delta": {name: site["delta"] for name, site in summary["privacy"]["sites"].items()},
            "rounds_refused": {name: site["rounds_refused"] for name, site in summary["privacy"]["sites"].items()
                               if site["rounds_refused"]},
            "stopped": summary["stopped"],
            "run_dir": summary["paths"]["run_dir"],
            # A causal-LM run's central DP reference is trained at each level's own epsilon.
            **({"centralized_private": summary["comparison"]["centralized_private"]}
               if "centralized_private" in summary.get("comparison", {}) else {}),
        })
    causal = summary.get("task") == "causal-lm"
    baseline_keys = [key for key in (PRIVACY_FREE_BASELINES if causal else CLASSIFICATION_BASELINES)
                     if key in summary["comparison"]]
    sweep = {"schema_version": SCHEMA_VERSION, "sweep_id": sweep_id, "scenario": options.scenario,
             "seed": options.seed, "headline_metric": summary["headline_metric"],
             "metrics": list(summary.get("metrics", CLASSIFICATION_METRICS)),
             "unit_of_privacy": summary["privacy"]["unit"],
             "baselines": {key: summary["comparison"][key] for key in baseline_keys},
             "levels": rows, "sweep_dir": str(sweep_dir)}
    atomic_write_json(sweep_dir / "sweep.json", sweep)
    return sweep
