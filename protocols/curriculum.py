"""A run's curriculum: the ordered stages a student goes through, each where its data lives.

The documents this project grew from distil in three stages: general ability on a public corpus, domain
adaptation on industry data, task tuning on the enterprise's own data. In a federation the stages map onto
where the data lives, and so onto what each one costs in privacy:

- ``coordinator``: distillation at the coordinator on a registered public set, from a public teacher; it reads no
  site record and spends no budget;
- ``federated``: the run's rounds (the run config's own ``rounds``, ``local_steps``, ``learning_rate`` ...), under
  each site's DP-SGD budget; its ``fragments``, when named, are the only ones the fragment plan picks from;
- ``site-local``: each site fine-tunes its own copy of the final federated student on its own records; the copy
  never leaves the site, and only its evaluation metrics do, when the site's policy releases them.

An empty curriculum is the single federated stage. Stages run in that order: at most one coordinator stage, the
federated stage, at most one site-local stage. Each non-federated stage names its own fragments, loss weights,
temperature, optimizer, learning rate and steps. Part of the run config, so its hash (which every site checks)
covers it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocols.errors import ConfigError
from protocols.fields import reject_unknown_fields

STAGE_PLACES = ("coordinator", "federated", "site-local")
# What a federated stage trains on at each site: every training record, or (incremental) only the records the site
# did not train on in an earlier run, plus its replay buffer (client/replay.py).
TRAINING_RECORDS = ("all", "new")
# Where a continuing run (--from) keeps the student it started from, inside its run directory.
START_STUDENT = "stages/start/model.safetensors"
STAGE_OPTIMIZERS = ("sgd", "adam")
# The most teacher-labelled synthetic records a coordinator stage may add: the transfer set stays in memory.
MAX_SYNTHETIC_RECORDS = 2_000_000
_TRAINING_FIELDS = ("steps", "batch_size", "optimizer", "learning_rate", "alpha", "temperature", "fragments")


@dataclass(frozen=True)
class Stage:
    """One stage. A federated stage carries only ``where`` and ``fragments``: its settings are the run config's."""

    where: str
    steps: int = 0
    batch_size: int = 0
    optimizer: str = "sgd"
    learning_rate: float = 0.0
    alpha: float = 0.5
    temperature: float = 2.0
    # The fragments this stage trains (by name, as the student's fragment spec has them); empty: all of them.
    # The others stay frozen: parameter isolation per stage.
    fragments: tuple[str, ...] = ()
    # Coordinator stage of a tabular student: mixup interpolations of public records, labelled by the public
    # teacher at the coordinator, added to the transfer set (0: the public records alone).
    synthetic_records: int = 0
    # Federated stage: "new" trains each site on the records it has not trained on before (an incremental run),
    # plus, when ``replay_min_entropy`` is set, its replay buffer: the earlier records the teacher finds hard, whose
    # predictive entropy (temperature 1) is at least that share of its maximum, log(classes).
    records: str = "all"
    replay_min_entropy: float | None = None
    # Site-local stage: parameter isolation per site, (site, fragments) pairs that replace ``fragments`` at that site.
    site_fragments: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Federated stage: keep the round (the start included) whose student scored best on the validation ROC-AUC the
    # sites release, instead of the last round's (coordinator/rounds.py).
    keep_best: bool = False

    @property
    def trains_here(self) -> bool:
        return self.where != "federated"

    def to_dict(self) -> dict[str, Any]:
        if self.where == "federated":
            # The incremental fields only when set, so that an earlier federated stage keeps its config hash.
            return {"where": "federated", "fragments": list(self.fragments)} | (
                {"records": self.records} if self.records != "all" else {}) | (
                {"replay_min_entropy": self.replay_min_entropy} if self.replay_min_entropy is not None else {}) | (
                {"keep_best": True} if self.keep_best else {})
        out: dict[str, Any] = {"where": self.where, "steps": self.steps, "batch_size": self.batch_size,
                               "optimizer": self.optimizer, "learning_rate": self.learning_rate,
                               "alpha": self.alpha, "temperature": self.temperature,
                               "fragments": list(self.fragments)}
        if self.where == "coordinator":
            out["synthetic_records"] = self.synthetic_records
        if self.site_fragments:
            out["site_fragments"] = {site: list(fragments) for site, fragments in self.site_fragments}
        return out

    def fragments_at(self, site: str) -> tuple[str, ...]:
        """The fragments a site-local stage trains at ``site``: its own list when the stage names one."""
        return dict(self.site_fragments).get(site, self.fragments)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Stage:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: a stage must be a table with at least 'where', got {raw!r}.")
        place = raw.get("where")
        if place not in STAGE_PLACES:
            raise ConfigError(f"{where}: field 'where' must be one of {', '.join(STAGE_PLACES)}, got {place!r}.")
        if place == "federated":
            reject_unknown_fields(raw, ("where", "fragments", "records", "replay_min_entropy", "keep_best"),
                                  f"{where} (federated: its settings are the run config's own rounds, local_steps, "
                                  "learning_rate ...)")
            records = raw.get("records", "all")
            if records not in TRAINING_RECORDS:
                raise ConfigError(f"{where}: field 'records' must be one of {', '.join(TRAINING_RECORDS)} (new: an "
                                  f"incremental run on the records a site has not trained on before), got {records!r}.")
            replay = (None if raw.get("replay_min_entropy") is None
                      else _number(raw, "replay_min_entropy", where, None, 0.0, 1.0))
            if replay is not None and records != "new":
                raise ConfigError(f"{where}: field 'replay_min_entropy' sets the replay buffer of an incremental run; set "
                                  "'records' to \"new\" as well, or remove it (with every record, there is nothing "
                                  "to replay).")
            keep_best = raw.get("keep_best", False)
            if not isinstance(keep_best, bool):
                raise ConfigError(f"{where}: field 'keep_best' must be true or false, got {keep_best!r}.")
            return cls("federated", fragments=_fragments(raw, where), records=records, replay_min_entropy=replay,
                       keep_best=keep_best)
        allowed = ("where", *_TRAINING_FIELDS) + (("synthetic_records",) if place == "coordinator" else
                                                  ("site_fragments",))
        reject_unknown_fields(raw, allowed, where)
        steps, batch_size = raw.get("steps"), raw.get("batch_size")
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{where}: field '{name}' must be an integer >= 1, got {value!r}.")
        optimizer = raw.get("optimizer", "sgd")
        if optimizer not in STAGE_OPTIMIZERS:
            raise ConfigError(f"{where}: field 'optimizer' must be one of {', '.join(STAGE_OPTIMIZERS)}, "
                              f"got {optimizer!r}.")
        rate = _number(raw, "learning_rate", where, None, 0.0, 10.0)
        if not rate > 0:
            raise ConfigError(f"{where}: field 'learning_rate' must be positive, got {rate!r}.")
        temperature = _number(raw, "temperature", where, 2.0, 0.0, 100.0)
        if not temperature > 0:
            raise ConfigError(f"{where}: field 'temperature' must be positive, got {temperature!r}.")
        fragments = _fragments(raw, where)
        synthetic = raw.get("synthetic_records", 0)
        if not (isinstance(synthetic, int) and not isinstance(synthetic, bool)
                and 0 <= synthetic <= MAX_SYNTHETIC_RECORDS):
            raise ConfigError(f"{where}: field 'synthetic_records' must be an integer in [0, {MAX_SYNTHETIC_RECORDS}],"
                              f" got {synthetic!r}.")
        return cls(place, steps=steps, batch_size=batch_size, optimizer=optimizer, learning_rate=rate,
                   alpha=_number(raw, "alpha", where, 0.5, 0.0, 1.0), temperature=temperature,
                   fragments=tuple(fragments), synthetic_records=synthetic,
                   site_fragments=_site_fragments(raw, where))


def _fragments(raw: Mapping[str, Any], where: str) -> tuple[str, ...]:
    fragments = raw.get("fragments", [])
    if not (isinstance(fragments, Sequence) and not isinstance(fragments, str)
            and all(isinstance(f, str) and f for f in fragments)):
        raise ConfigError(f"{where}: field 'fragments' must be a list of fragment names (empty: all), "
                          f"got {fragments!r}.")
    return tuple(fragments)


def _site_fragments(raw: Mapping[str, Any], where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    by_site = raw.get("site_fragments", {})
    if not isinstance(by_site, Mapping) or not all(isinstance(site, str) and site for site in by_site):
        raise ConfigError(f"{where}: field 'site_fragments' must map site names to lists of fragment names, "
                          f"got {by_site!r}.")
    return tuple(sorted((site, _fragments({"fragments": fragments}, f"{where} site_fragments.{site}"))
                        for site, fragments in by_site.items()))


def _number(raw: Mapping[str, Any], name: str, where: str, default: float | None, low: float, high: float) -> float:
    value = raw.get(name, default)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high):
        raise ConfigError(f"{where}: field '{name}' must be a number in [{low:g}, {high:g}], got {value!r}.")
    return float(value)


def parse_curriculum(raw: Any, family: str, where: str = "run config") -> tuple[Stage, ...]:
    """The validated stages of ``raw`` (a list of tables); ``()`` when absent (the federated stage alone)."""
    if raw is None or raw == [] or raw == ():
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ConfigError(f"{where}: field 'curriculum' must be a list of stages, got {raw!r}.")
    stages = tuple(Stage.from_dict(entry, f"{where} curriculum stage {i + 1}") for i, entry in enumerate(raw))
    places = [stage.where for stage in stages]
    if places.count("federated") != 1:
        raise ConfigError(f"{where}: field 'curriculum' must hold exactly one federated stage, got {places}.")
    order = {place: rank for rank, place in enumerate(STAGE_PLACES)}
    if any(order[a] > order[b] for a, b in zip(places, places[1:])) or len(set(places)) != len(places):
        raise ConfigError(f"{where}: field 'curriculum' must be at most one coordinator stage, the federated stage, "
                          f"then at most one site-local stage, in that order; got {places}.")
    if family == "causal_lm" and "coordinator" in places:
        raise ConfigError(f"{where}: a causal-LM run's coordinator stage is its base student's public stage "
                          "(`fedistill coordinator base-student ... --public`), pinned by the student's base_digest; "
                          "remove the coordinator stage from 'curriculum'.")
    if family == "causal_lm" and "site-local" in places:
        raise ConfigError(f"{where}: a site-local stage is built for classification students (mlp, bert) only; "
                          "remove it from the causal-LM run's 'curriculum'.")
    federated = stage_of(stages, "federated")
    if family == "causal_lm" and federated is not None and federated.keep_best:
        raise ConfigError(f"{where}: keeping the best round by validation ROC-AUC is built for classification "
                          "students (mlp, bert) only; remove 'keep_best' from the causal-LM run's federated stage.")
    if family == "causal_lm" and federated is not None and federated.records != "all":
        raise ConfigError(f"{where}: incremental rounds (federated stage 'records' = \"new\") are built for "
                          "classification students (mlp, bert) only; remove 'records' from the causal-LM run's "
                          "federated stage.")
    for stage in stages:
        if stage.synthetic_records and family != "mlp":
            raise ConfigError(f"{where}: the coordinator stage's 'synthetic_records' interpolates tabular records; "
                              f"a {family} student has none. Set it to 0.")
    return stages


def stage_of(stages: Sequence[Stage], place: str) -> Stage | None:
    return next((stage for stage in stages if stage.where == place), None)


@dataclass(frozen=True)
class Continuation:
    """The finished run a run continues from (``--from RUN_DIR``): its student is this run's starting point.

    Checked against that run's signed ledger before the run starts (coordinator/continuation.py), and part of the
    config, so every site's config hash covers which student the run starts from.
    """

    run_id: str
    config_hash: str
    # The digest of the student the earlier run's run-finished event records, and the hash of that event.
    student_digest: str
    ledger_head: str

    def to_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id, "config_hash": self.config_hash, "student_digest": self.student_digest,
                "ledger_head": self.ledger_head}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Continuation:
        fields = ("run_id", "config_hash", "student_digest", "ledger_head")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: field 'continues' must be a table with {', '.join(fields)}, got {raw!r}.")
        reject_unknown_fields(raw, fields, f"{where} continues")
        for name in fields:
            if not isinstance(raw.get(name), str) or not raw[name]:
                raise ConfigError(f"{where}: field 'continues.{name}' must be a non-empty string; `--from RUN_DIR` "
                                  "fills it in from the earlier run's ledger.")
        return cls(*(raw[name] for name in fields))
