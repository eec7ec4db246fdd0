"""Federation configuration: parsed once at the boundary into frozen, validated dataclasses.

The coordinator sends the hash of the resolved configuration with every instruction, and a site
checks that it matches the run it accepted. Every persisted form carries ``schema_version``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from protocols.canonical import digest_json
from protocols.curriculum import Continuation, Stage, parse_curriculum, stage_of
from protocols.errors import ConfigError
from protocols.fields import reject_unknown_fields
from protocols.knowledge import KnowledgeSettings
from protocols.secagg import SecureAggregationSettings

SCHEMA_VERSION = 1
FRAGMENT_PLANS = ("all", "cyclic", "progressive")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
STUDENT_FAMILIES = ("mlp", "bert", "causal_lm")
# Token-level KD divergences over the teacher's top-k plus its tail bucket (distill.token_kd.divergence).
CAUSAL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
CAUSAL_FRAGMENTS = ("lora", "blocks")
_HEX_DIGEST_LENGTH = 64
# SecAgg+ neighbours per site, itself included: every site of a consortium up to 33, then 33 (docs/privacy.md,
# "Large cohorts").
DEFAULT_NUM_SHARES = 33
OPTIMIZERS = ("sgd", "adam")
GRAD_SAMPLE_MODES = ("ghost", "hooks")
# The unit of privacy DP-SGD protects: one person (all of their records, where a site names its person column) or
# one record (a person with k records is then protected only by group privacy).
PRIVACY_UNITS = ("person", "record")


def _require(condition: bool, where: str, name: str, expected: str, got: Any) -> None:
    if not condition:
        raise ConfigError(f"{where}: field '{name}' must be {expected}, got {got!r}. Fix it and run again.")


def _int(raw: Mapping[str, Any], name: str, where: str, minimum: int, default: int | None = None) -> int:
    value = raw.get(name, default)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _require(ok, where, name, f"an integer >= {minimum}", value)
    return int(value)


def _float(raw: Mapping[str, Any], name: str, where: str, low: float, high: float, default: float | None = None,
           low_open: bool = False) -> float:
    value = raw.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    bracket = "(" if low_open else "["
    _require(ok, where, name, f"a number in {bracket}{low}, {high}]", value)
    return float(value)


def _bool(raw: Mapping[str, Any], name: str, where: str, default: bool) -> bool:
    value = raw.get(name, default)
    _require(isinstance(value, bool), where, name, "true or false", value)
    return bool(value)


def _optional_float(raw: Mapping[str, Any], name: str, where: str, low: float, high: float) -> float | None:
    """``None`` (or absent) stays ``None``; anything else must be a number in (low, high]."""
    if raw.get(name) is None:
        return None
    return _float(raw, name, where, low, high, low_open=True)


def _digest(raw: Mapping[str, Any], name: str, where: str) -> str | None:
    """``None`` (or absent) stays ``None``; anything else must be a lowercase hex SHA-256."""
    value = raw.get(name)
    if value is None:
        return None
    _require(isinstance(value, str) and len(value) == _HEX_DIGEST_LENGTH
             and all(c in "0123456789abcdef" for c in value), where, name, "a hex SHA-256 (64 characters)", value)
    return str(value)


def _num_shares(raw: Mapping[str, Any], where: str) -> float | int:
    """A share of the cohort in (0, 1], or an odd count of 3 or more (Flower's SecAgg+ reads an int as a count).

    Odd, because SecAgg+ makes each site share with the k sites on either side of it in a ring, 2k + 1 with itself;
    Flower tells the sites an even count but builds the ring one larger, and every site then fails the round."""
    value = raw.get("num_shares", DEFAULT_NUM_SHARES)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    count = number and isinstance(value, int) and value >= 3 and value % 2 == 1
    _require(count or (number and 0 < value <= 1), where, "num_shares",
             "a share of the cohort in (0, 1] or an odd number of sites of 3 or more (e.g. 33)", value)
    return int(value) if count else float(value)


def _choice(raw: Mapping[str, Any], name: str, where: str, choices: tuple[str, ...], default: str) -> str:
    value = raw.get(name, default)
    _require(value in choices, where, name, "one of " + ", ".join(choices), value)
    return str(value)


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA adapters on the named modules of every decoder block."""

    r: int
    alpha: int
    targets: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "targets": list(self.targets)}


@dataclass(frozen=True)
class CausalLMSettings:
    """A causal-LM student and how it is distilled, parsed from a ``causal_lm`` student spec's settings.

    The student's frozen part is the folder ``base`` (written by ``save_pretrained``: a layer subset of the
    teacher, its embedding frozen), pinned by ``base_digest`` so that every site and the coordinator start from
    the same weights; only the trainable tensors (LoRA adapters, or the decoder blocks) ever travel.
    ``temperatures`` is the grid each site's top-k cache is built on (docs/causal_lm.md).
    """

    base: str
    base_digest: str
    lora: LoraSettings | None
    top_k: int
    divergence: str
    beta: float
    temperatures: tuple[float, ...]
    max_length: int
    # Hidden-state alignment: (student decoder layer, teacher decoder layer) pairs and the term's weight (0: off).
    alignment: tuple[tuple[int, int], ...] = ()
    alignment_weight: float = 0.0
    # Sequence-level KD: every training document is followed by this many tokens its teacher writes after it
    # (greedy, generated once per site and cached), and the student distils on both; 0 is off.
    continuation_tokens: int = 0

    @property
    def fragments(self) -> str:
        return "lora" if self.lora is not None else "blocks"

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any]) -> CausalLMSettings:
        where = "student spec (causal_lm) settings"
        reject_unknown_fields(raw, ("base", "base_digest", "lora", "top_k", "divergence", "beta", "temperatures",
                                    "max_length", "alignment", "alignment_weight", "continuation_tokens"), where)
        base, digest = raw.get("base"), raw.get("base_digest")
        _require(isinstance(base, str) and bool(base), where, "base", "the path of the base student folder", base)
        _require(isinstance(digest, str) and len(digest) == _HEX_DIGEST_LENGTH, where, "base_digest",
                 "the SHA-256 digest of the base student folder (64 hex digits)", digest)
        lora_raw = raw.get("lora")
        lora = None
        if lora_raw is not None:
            _require(isinstance(lora_raw, Mapping), where, "lora", "a mapping with r, alpha and targets, or null",
                     lora_raw)
            reject_unknown_fields(lora_raw, ("r", "alpha", "targets"), f"{where} lora")
            targets = lora_raw.get("targets")
            _require(isinstance(targets, (list, tuple)) and bool(targets) and all(isinstance(t, str) for t in targets),
                     f"{where} lora", "targets", "a non-empty list of module names", targets)
            lora = LoraSettings(_int(lora_raw, "r", f"{where} lora", 1), _int(lora_raw, "alpha", f"{where} lora", 1),
                                tuple(targets))
        temperatures = raw.get("temperatures")
        _require(isinstance(temperatures, (list, tuple)) and bool(temperatures)
                 and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 < t <= 100
                         for t in temperatures), where, "temperatures", "a non-empty list of numbers in (0, 100]",
                 temperatures)
        pairs = raw.get("alignment") or []
        _require(isinstance(pairs, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(i) is int and i >= 0 for i in p) for p in pairs),
            where, "alignment", "a list of [student layer, teacher layer] pairs of layer indices", pairs)
        weight = _float(raw, "alignment_weight", where, 0.0, 100.0, 0.0)
        _require(weight == 0.0 or bool(pairs), where, "alignment_weight", "0 unless 'alignment' names layer pairs",
                 weight)
        return cls(base=base, base_digest=digest, lora=lora, top_k=_int(raw, "top_k", where, 1),
                   divergence=_choice(raw, "divergence", where, CAUSAL_DIVERGENCES, "forward_kl"),
                   beta=_float(raw, "beta", where, 0.0, 1.0, 0.5, low_open=True),
                   temperatures=tuple(sorted({float(t) for t in temperatures}, reverse=True)),
                   max_length=_int(raw, "max_length", where, 2),
                   alignment=tuple((int(a), int(b)) for a, b in pairs), alignment_weight=weight,
                   continuation_tokens=_int(raw, "continuation_tokens", where, 0, 0))

    @property
    def teacher_hidden_layers(self) -> tuple[int, ...]:
        """The teacher layers whose outputs a site caches: those of the alignment pairs, when alignment is on."""
        return tuple(teacher for _, teacher in self.alignment) if self.alignment_weight > 0 else ()


@dataclass(frozen=True)
class StudentSpec:
    """What a student is: a family (``mlp``, ``bert`` or ``causal_lm``) and the settings that build it."""

    family: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.family in STUDENT_FAMILIES, "student spec", "family", "one of " + ", ".join(STUDENT_FAMILIES),
                 self.family)
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        if self.family == "causal_lm":
            self.causal_lm()  # validated once, at the boundary

    def causal_lm(self) -> CausalLMSettings:
        """The settings of a ``causal_lm`` student, validated (a ConfigError names the field)."""
        if self.family != "causal_lm":
            raise ConfigError(f"student spec: family {self.family!r} has no causal-LM settings.")
        return CausalLMSettings.from_settings(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StudentSpec:
        if not isinstance(raw, Mapping) or "family" not in raw:
            raise ConfigError("student spec: expected a mapping with a 'family' field; check the run config's 'student'.")
        settings = raw.get("settings", {})
        if not isinstance(settings, Mapping):
            raise ConfigError("student spec: field 'settings' must be a mapping of builder settings.")
        return cls(family=str(raw["family"]), settings=settings)


@dataclass(frozen=True)
class FederationConfig:
    """Everything the coordinator and the sites must agree on for one run."""

    student: StudentSpec
    rounds: int = 20
    fragment_plan: str = "all"
    fragment_patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    local_steps: int = 100
    batch_size: int = 64
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    alpha: float = 0.5
    temperature_schedule: str = "constant"
    temperature_start: float = 2.0
    temperature_end: float = 2.0
    hidden_alignment_weight: float = 0.0
    seed: int = 0
    # Differential privacy: target_epsilon None means a non-private run, which any site with a cap refuses.
    target_epsilon: float | None = None
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "ghost"
    privacy_unit: str = "person"
    # The sites' evaluation of the global student on their test splits (protocols/evaluation.py): after every
    # evaluate_every-th round and the last (0: the last only), as histograms of evaluation_bins bins.
    site_evaluation: bool = True
    evaluate_every: int = 0
    evaluation_bins: int = 16
    # The coordinator stops the run cleanly when fewer sites than this accept a round.
    min_sites: int = 1
    # Partial participation: the sites asked each round, drawn afresh every round (protocols/sampling.py): a
    # number (0: every site) or a share of the sites (1.0: every site); at most one of them is set.
    sites_per_round: int = 0
    fraction_per_round: float = 1.0
    # An aggregate whose change to a fragment has a larger L2 norm is rejected (garbage, overflow, attack).
    max_update_norm: float = 100.0
    # Secure aggregation (Flower SecAgg+): protocols/secagg.py explains the encoding and its error bound.
    secure_aggregation: bool = True
    # Each site's SecAgg+ neighbours: a share of the cohort (at most 1.0), or a number of sites (3 or more; every
    # site when the cohort is smaller), docs/privacy.md says how to choose it for hundreds of sites.
    num_shares: float | int = DEFAULT_NUM_SHARES
    reconstruction_threshold: float = 0.6
    clipping_range: float = 4.0
    quantization_range: int = 2**24
    weight_scale: int = 10_000
    min_cohort: int = 3
    # The run's stages (protocols/curriculum.py); empty: the federated rounds alone.
    curriculum: tuple[Stage, ...] = ()
    # The finished run whose student this run starts from (``--from RUN_DIR``); None: a fresh student.
    continues: Continuation | None = None
    # The SHA-256 of the preprocessor file (distill/preprocessing.py) that turns every site's raw table into the
    # teacher's features; a site whose preprocessor is another refuses the run. None: no shared preprocessing.
    preprocessing_digest: str | None = None
    # The knowledge channel (protocols/knowledge.py): soft labels on a registered proxy set travel up, alone or with
    # the fragment update; None: weights only.
    knowledge: KnowledgeSettings | None = None

    def __post_init__(self) -> None:
        if self.knowledge is not None:
            if not self.secure_aggregation:
                raise ConfigError("run config: field 'knowledge' needs 'secure_aggregation' = true: soft labels reach "
                                  "the coordinator only as the SecAgg+ sum, never one site's in the clear.")
            causal, token_level = self.student.family == "causal_lm", self.knowledge.proxy_positions > 0
            if causal != token_level:
                raise ConfigError("run config 'knowledge': field 'proxy_positions' is the real token positions of a "
                                  "causal-LM run's proxy prompts (> 0), and must be 0 for a classification student; "
                                  f"this run's student is {self.student.family} and proxy_positions is "
                                  f"{self.knowledge.proxy_positions}.")
            if causal and self.knowledge.source != "local-student":
                raise ConfigError(f"run config 'knowledge': source {self.knowledge.source!r} is built for "
                                  "classification students only; a causal-LM run releases its local student's "
                                  "next-token distributions (source 'local-student').")
        if self.continues is not None and stage_of(self.curriculum, "coordinator") is not None:
            raise ConfigError("run config: a run that continues an earlier run (--from) starts from that run's "
                              "student, so it has no coordinator stage; remove the coordinator stage from its "
                              "curriculum.")
        if self.sites_per_round and self.fraction_per_round < 1.0:
            raise ConfigError("run config: set at most one of 'sites_per_round' and 'fraction_per_round'; both say "
                              "how many sites are asked each round.")
        if self.evaluation_bins % 2 or self.evaluation_bins > 1000:
            raise ConfigError(f"run config: field 'evaluation_bins' must be even (0.5 is a bin edge) and at most 1000, "
                              f"got {self.evaluation_bins}.")
        if self.quantization_range > 2**31 - 1:
            raise ConfigError("run config: field 'quantization_range' must stay below 2**31: Flower quantizes to int32.")
        if self.student.family == "causal_lm":
            self._check_causal_lm()
        if self.target_epsilon is not None and self.hidden_alignment_weight > 0:
            raise ConfigError("run config: field 'hidden_alignment_weight' must be 0 when 'target_epsilon' is set: the "
                              "site-local alignment projection is not trained under DP-SGD. Turn one of them off.")

    def _check_causal_lm(self) -> None:
        grid = self.student.causal_lm().temperatures
        low, high = min(self.temperature_start, self.temperature_end), max(self.temperature_start, self.temperature_end)
        if low < min(grid) - 1e-9 or high > max(grid) + 1e-9:
            raise ConfigError(f"run config: the temperature schedule {self.temperature_start:g} -> "
                              f"{self.temperature_end:g} leaves the causal-LM cache's temperatures {list(grid)}; add "
                              "its ends to the student's 'temperatures'.")
        if self.hidden_alignment_weight > 0:
            raise ConfigError("run config: field 'hidden_alignment_weight' must be 0 for a causal-LM student: its "
                              "hidden-state alignment is the student spec's 'alignment' and 'alignment_weight'.")

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None

    @property
    def site_evaluation_rounds(self) -> tuple[int, ...]:
        """After which rounds the sites evaluate the student on their test splits (classification students only: a
        causal-LM run's held-out perplexity is not released by the sites)."""
        from protocols.evaluation import evaluation_rounds

        if not self.site_evaluation or self.student.family == "causal_lm":
            return ()
        return evaluation_rounds(self.rounds, self.evaluate_every)

    @property
    def fewest_sites_per_round(self) -> int:
        """Below this many accepting sites a round cannot run: the policy's minimum, or SecAgg+'s cohort."""
        return max(self.min_sites, self.min_cohort) if self.secure_aggregation else self.min_sites

    def secagg_settings(self) -> SecureAggregationSettings:
        return SecureAggregationSettings(self.num_shares, self.reconstruction_threshold, self.clipping_range,
                                         self.quantization_range, self.weight_scale)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["student"] = self.student.to_dict()
        data["fragment_patterns"] = {name: list(patterns) for name, patterns in self.fragment_patterns}
        # Absent when empty, so that the hash of a single-stage run is what it was before curricula existed.
        data.pop("curriculum")
        if self.curriculum:
            data["curriculum"] = [stage.to_dict() for stage in self.curriculum]
        data.pop("continues")
        if self.continues is not None:
            data["continues"] = self.continues.to_dict()
        # Absent at their defaults, so that the hash of a run without them is what it was before they existed.
        for name, default in (("sites_per_round", 0), ("fraction_per_round", 1.0), ("preprocessing_digest", None)):
            if data[name] == default:
                data.pop(name)
        data.pop("knowledge")
        if self.knowledge is not None:
            data["knowledge"] = self.knowledge.to_dict()
        data["schema_version"] = SCHEMA_VERSION
        return data

    def config_hash(self) -> str:
        return digest_json(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "run config") -> FederationConfig:
        known = {f for f in cls.__dataclass_fields__} | {"schema_version"}
        reject_unknown_fields(raw, known, where)
        if isinstance(raw.get("student"), Mapping):
            reject_unknown_fields(raw["student"], ("family", "settings"), f"{where} student")
        version = raw.get("schema_version", SCHEMA_VERSION)
        _require(version == SCHEMA_VERSION, where, "schema_version", f"{SCHEMA_VERSION}", version)
        if "student" not in raw:
            raise ConfigError(f"{where}: field 'student' is missing; it says which student to build.")
        patterns_raw = raw.get("fragment_patterns", {}) or {}
        _require(isinstance(patterns_raw, Mapping), where, "fragment_patterns", "a mapping fragment -> [patterns]",
                 patterns_raw)
        patterns = tuple((str(name), tuple(str(p) for p in pats)) for name, pats in patterns_raw.items())
        student = raw["student"] if isinstance(raw["student"], StudentSpec) else StudentSpec.from_dict(raw["student"])
        return cls(
            student=student,
            curriculum=parse_curriculum(raw.get("curriculum"), student.family, where),
            continues=None if raw.get("continues") is None else Continuation.from_dict(raw["continues"], where),
            knowledge=None if raw.get("knowledge") is None else (
                raw["knowledge"] if isinstance(raw["knowledge"], KnowledgeSettings)
                else KnowledgeSettings.from_dict(raw["knowledge"], f"{where} 'knowledge'")),
            rounds=_int(raw, "rounds", where, 1, cls.rounds),
            fragment_plan=_choice(raw, "fragment_plan", where, FRAGMENT_PLANS, cls.fragment_plan),
            fragment_patterns=patterns,
            local_steps=_int(raw, "local_steps", where, 1, cls.local_steps),
            batch_size=_int(raw, "batch_size", where, 1, cls.batch_size),
            optimizer=_choice(raw, "optimizer", where, OPTIMIZERS, cls.optimizer),
            learning_rate=_float(raw, "learning_rate", where, 0.0, 10.0, cls.learning_rate, low_open=True),
            alpha=_float(raw, "alpha", where, 0.0, 1.0, cls.alpha),
            temperature_schedule=_choice(raw, "temperature_schedule", where, TEMPERATURE_SCHEDULES,
                                         cls.temperature_schedule),
            temperature_start=_float(raw, "temperature_start", where, 0.0, 100.0, cls.temperature_start, low_open=True),
            temperature_end=_float(raw, "temperature_end", where, 0.0, 100.0, cls.temperature_end, low_open=True),
            hidden_alignment_weight=_float(raw, "hidden_alignment_weight", where, 0.0, 100.0,
                                           cls.hidden_alignment_weight),
            seed=_int(raw, "seed", where, 0, cls.seed),
            target_epsilon=_optional_float(raw, "target_epsilon", where, 0.0, 1000.0),
            target_delta=_optional_float(raw, "target_delta", where, 0.0, 0.1),
            max_grad_norm=_float(raw, "max_grad_norm", where, 0.0, 1e6, cls.max_grad_norm, low_open=True),
            grad_sample_mode=_choice(raw, "grad_sample_mode", where, GRAD_SAMPLE_MODES, cls.grad_sample_mode),
            privacy_unit=_choice(raw, "privacy_unit", where, PRIVACY_UNITS, cls.privacy_unit),
            site_evaluation=_bool(raw, "site_evaluation", where, cls.site_evaluation),
            evaluate_every=_int(raw, "evaluate_every", where, 0, cls.evaluate_every),
            evaluation_bins=_int(raw, "evaluation_bins", where, 2, cls.evaluation_bins),
            min_sites=_int(raw, "min_sites", where, 1, cls.min_sites),
            sites_per_round=_int(raw, "sites_per_round", where, 0, cls.sites_per_round),
            fraction_per_round=_float(raw, "fraction_per_round", where, 0.0, 1.0, cls.fraction_per_round,
                                      low_open=True),
            preprocessing_digest=_digest(raw, "preprocessing_digest", where),
            max_update_norm=_float(raw, "max_update_norm", where, 0.0, 1e12, cls.max_update_norm, low_open=True),
            secure_aggregation=_bool(raw, "secure_aggregation", where, cls.secure_aggregation),
            num_shares=_num_shares(raw, where),
            reconstruction_threshold=_float(raw, "reconstruction_threshold", where, 0.0, 1.0,
                                            cls.reconstruction_threshold, low_open=True),
            # The site's weight (at most 1) travels inside the masked vector, so the range must hold it.
            clipping_range=_float(raw, "clipping_range", where, 1.0, 1e6, cls.clipping_range),
            quantization_range=_int(raw, "quantization_range", where, 2**8, cls.quantization_range),
            weight_scale=_int(raw, "weight_scale", where, 1, cls.weight_scale),
            min_cohort=_int(raw, "min_cohort", where, 2, cls.min_cohort),
        )


def load_versioned_toml(path: Path, schema_version: int, missing_hint: str) -> dict[str, Any]:
    """Read a fedistill TOML file (site.toml, run.toml) and check its schema_version; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"'{path}' does not exist; {missing_hint}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}.") from None
    if raw.get("schema_version") != schema_version:
        raise ConfigError(f"{path}: schema_version {raw.get('schema_version')!r} is not {schema_version}.")
    return raw
