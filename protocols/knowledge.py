"""The knowledge channel: sites release soft labels on a registered public proxy set, summed under SecAgg+.

A run's ``knowledge`` settings say what travels up each round (``mode``), where each site's soft labels come from
(``source``), and which proxy set they are computed on, registered by the SHA-256 of its file (``proxy_digest``):
every site and the coordinator check that digest before they use the set, and refuse a mismatch by name.

Modes (``weights``, today's behaviour, is the absence of these settings):

- ``knowledge``: only soft labels travel up. Each site trains the round's student locally under DP-SGD, as in
  weights mode, and releases that local student's temperature-scaled class probabilities on the proxy inputs; the
  coordinator receives only their secure weighted mean and distils it into the global student on the proxy inputs
  (server-side KD). What a site sends is ``proxy_records x classes`` values whatever the student's size.
- ``hybrid``: the fragment update and the soft labels travel in the same masked vector; the coordinator applies the
  averaged update, then distils the averaged soft labels into the result (FedDF-like).

Sources, each private for a stated reason (:data:`WHY_PRIVATE`):

- ``local-student``: the site's local student after the round's DP-SGD steps. Its outputs on public inputs are
  post-processing of a DP model and cost nothing further; the site's ledger names the spend they post-process.
- ``public-teacher``: a teacher that never saw private records (the site's teacher declaration says ``public``).

- ``pate``: an ensemble of ``pate_teachers`` teachers, each trained on one disjoint partition of the site's records
  split by person (one person's records all land in one teacher), released PATE-style (Papernot et al., ICLR 2018)
  as the Gaussian-noised mean of the teachers' probability vectors on the proxy inputs (client/pate.py). One person
  changes one teacher, hence at most ``sqrt(2 * proxy_records)`` of the summed vector in L2
  (``KnowledgeSettings.pate_sensitivity``); the noise is ``pate_noise_multiplier`` times that. The release is made once per run
  and charged once to the site's accountant, composed with its DP-SGD steps; re-sending it in later rounds is
  post-processing. Only in ``hybrid`` mode: the site trains the round's student under DP-SGD as well.

The outputs of a single teacher trained on private records are never released, with or without noise: one record
can change all of them. A config that asks for them is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocols.canonical import file_sha256
from protocols.errors import ConfigError, UpdateRejected
from protocols.fields import reject_unknown_fields

KNOWLEDGE_MODES = ("knowledge", "hybrid")
KNOWLEDGE_SOURCES = ("local-student", "public-teacher", "pate")
# Never admissible: one record of the teacher's training data can change every one of its outputs.
REFUSED_SOURCES = {
    "private-teacher": "a single teacher trained on the site's private records: one record can change all of its "
                       "outputs, so no amount of added noise per output makes the release private",
    "teacher": "'teacher' does not say what the teacher was trained on; use 'public-teacher' for a teacher that never "
               "saw private records",
}
WHY_PRIVATE = {
    "local-student": "post-processing of the site's local student after its DP-SGD steps of this round, on public "
                     "inputs: no further privacy cost",
    "public-teacher": "outputs of a teacher that never saw private records (the site declared its training data "
                      "public), on public inputs: no privacy cost",
    "pate": "the Gaussian-noised mean of an ensemble of teachers trained on disjoint partitions of the site's records "
            "split by person (PATE): one person changes one teacher; charged once per run to the site's accountant, "
            "composed with its DP-SGD steps",
}
# The PATE settings that only a ``pate`` source may set (and the config carries only for it).
PATE_FIELDS = ("pate_teachers", "pate_noise_multiplier")
# The name the soft labels travel under inside the SecAgg+ vector, after the planned student tensors.
SOFT_LABELS = "knowledge.soft_labels"
# The proxy set as a site keeps it in its state directory (its inputs only, a safetensors file).
PROXY_FILE = "proxy.safetensors"
_HEX_DIGEST_LENGTH = 64
# Released probabilities may differ from a distribution by SecAgg+'s quantization and its own rounding, no more.
PROBABILITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class KnowledgeSettings:
    """What travels up, where the soft labels come from, the proxy set, and the server-side distillation."""

    mode: str
    source: str
    proxy_digest: str
    proxy_records: int
    classes: int
    # The temperature of the released probabilities; the coordinator distils at the same temperature.
    temperature: float = 2.0
    server_steps: int = 200
    server_batch_size: int = 256
    server_learning_rate: float = 1e-3
    server_optimizer: str = "adam"
    # Source ``pate``: the ensemble's size (disjoint partitions by person) and the Gaussian noise on the sum of the
    # teachers' probability vectors, as a multiple of its L2 sensitivity.
    pate_teachers: int = 16
    pate_noise_multiplier: float = 4.0
    # A causal-LM run's token-level layout: the number of real token positions in the proxy prompts (each a row of
    # the release; 0 for a classification run, whose rows are the proxy records). Its ``classes`` are then the
    # shared tokens (``classes - 1``, the most frequent in the proxy prompts) plus one bucket for every other token.
    proxy_positions: int = 0

    def __post_init__(self) -> None:
        where = "run config 'knowledge'"
        if self.source in REFUSED_SOURCES:
            raise ConfigError(f"{where}: field 'source' is {self.source!r}, refused: {REFUSED_SOURCES[self.source]}. "
                              f"Choose one of {', '.join(KNOWLEDGE_SOURCES)}.")
        checks = [(self.mode in KNOWLEDGE_MODES, "mode", "one of " + ", ".join(KNOWLEDGE_MODES), self.mode),
                  (self.source in KNOWLEDGE_SOURCES, "source", "one of " + ", ".join(KNOWLEDGE_SOURCES), self.source),
                  (isinstance(self.proxy_digest, str) and len(self.proxy_digest) == _HEX_DIGEST_LENGTH
                   and all(c in "0123456789abcdef" for c in self.proxy_digest), "proxy_digest",
                   "the SHA-256 of the proxy file (64 lowercase hex digits)", self.proxy_digest),
                  (_count(self.proxy_records), "proxy_records", "an integer >= 1", self.proxy_records),
                  (_count(self.classes) and self.classes >= 2, "classes", "an integer >= 2", self.classes),
                  (_number(self.temperature, 0.0, 100.0), "temperature", "a number in (0, 100]", self.temperature),
                  (_count(self.server_steps), "server_steps", "an integer >= 1", self.server_steps),
                  (_count(self.server_batch_size), "server_batch_size", "an integer >= 1", self.server_batch_size),
                  (_number(self.server_learning_rate, 0.0, 10.0), "server_learning_rate", "a number in (0, 10]",
                   self.server_learning_rate),
                  (self.server_optimizer in ("sgd", "adam"), "server_optimizer", "sgd or adam", self.server_optimizer),
                  (_count(self.pate_teachers) and self.pate_teachers >= 2, "pate_teachers", "an integer >= 2",
                   self.pate_teachers),
                  (_number(self.pate_noise_multiplier, 0.0, 1e6), "pate_noise_multiplier", "a positive number",
                   self.pate_noise_multiplier),
                  (isinstance(self.proxy_positions, int) and not isinstance(self.proxy_positions, bool)
                   and self.proxy_positions >= 0, "proxy_positions", "an integer >= 0", self.proxy_positions)]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{where}: field '{name}' must be {expected}, got {got!r}. Fix it and run again.")
        if self.mode == "knowledge" and self.source == "public-teacher":
            raise ConfigError(f"{where}: mode 'knowledge' with source 'public-teacher' would make every site spend a "
                              "round's DP-SGD steps it never releases; a site's public teacher without local training "
                              "is not built yet. Use mode 'hybrid', or source 'local-student'.")
        if self.mode == "knowledge" and self.source == "pate":
            raise ConfigError(f"{where}: mode 'knowledge' with source 'pate' would make every site spend a round's "
                              "DP-SGD steps it never releases; use mode 'hybrid' (weights, then the PATE release).")
        if self.source != "pate":
            defaults = {name: self.__dataclass_fields__[name].default for name in PATE_FIELDS}
            set_here = [name for name in PATE_FIELDS if getattr(self, name) != defaults[name]]
            if set_here:
                raise ConfigError(f"{where}: field(s) {', '.join(set_here)} apply to source 'pate' only, and the "
                                  f"source is {self.source!r}. Remove them, or use source 'pate'.")

    @property
    def sends_weights(self) -> bool:
        return self.mode == "hybrid"

    @property
    def token_level(self) -> bool:
        """A causal-LM run's release: next-token distributions at the proxy prompts' real positions."""
        return self.proxy_positions > 0

    @property
    def shared_tokens(self) -> int:
        """A token-level release's shared tokens (its last column is every other token)."""
        return self.classes - 1

    @property
    def soft_label_shape(self) -> tuple[int, int]:
        return (self.proxy_positions if self.token_level else self.proxy_records, self.classes)

    @property
    def pate_sensitivity(self) -> float:
        """The L2 sensitivity of the ensemble's summed probability vectors to one person: that person's teacher can
        move from any distribution to any other on every proxy record, ``sqrt(2)`` per record."""
        return math.sqrt(2.0 * self.proxy_records)

    @property
    def pate_noise_std(self) -> float:
        """The Gaussian noise's standard deviation on each entry of the summed probability vectors."""
        return self.pate_noise_multiplier * self.pate_sensitivity

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__
                if (name not in PATE_FIELDS or self.source == "pate") and (name != "proxy_positions"
                                                                          or self.token_level)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "run config 'knowledge'") -> KnowledgeSettings:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping with mode, source, proxy_digest, proxy_records and classes.")
        reject_unknown_fields(raw, tuple(cls.__dataclass_fields__), where)
        missing = [name for name in ("mode", "source", "proxy_digest", "proxy_records", "classes") if name not in raw]
        if missing:
            raise ConfigError(f"{where}: field(s) {', '.join(missing)} missing; a knowledge run names its mode, its "
                              "source and its proxy set.")
        return cls(**dict(raw))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low < value <= high)


def load_proxy(path: Path, settings: KnowledgeSettings, who: str) -> dict[str, np.ndarray]:
    """The proxy inputs in ``path``, after checking the file's SHA-256 against the run's registered digest and its
    record count; ``who`` (a site, the coordinator) is named in the refusal."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UpdateRejected(f"{who}: the run's proxy set is not at {path}; copy the file the operator ships "
                             f"(SHA-256 {settings.proxy_digest[:16]}...) there.")
    digest = file_sha256(path)
    if digest != settings.proxy_digest:
        raise UpdateRejected(f"{who}: the proxy set {path} has SHA-256 {digest[:16]}..., not the run's registered "
                             f"{settings.proxy_digest[:16]}...; it is not the set the run names. Nothing is released.")
    inputs = load_file(str(path))
    sizes = {len(values) for values in inputs.values()}
    if sizes != {settings.proxy_records}:
        raise UpdateRejected(f"{who}: the proxy set {path} holds {sorted(sizes)} records, the run registers "
                             f"{settings.proxy_records}.")
    return inputs


def proxy_file_bytes(inputs: Mapping[str, np.ndarray]) -> bytes:
    """A proxy set as the file every site is shipped (inputs only, never labels); its SHA-256 registers it."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(values) for name, values in inputs.items()})


def check_soft_labels(soft_labels: np.ndarray, settings: KnowledgeSettings, what: str) -> np.ndarray:
    """An aggregate (or a site's own release) that is a ``proxy_records x classes`` matrix of probability rows."""
    values = np.asarray(soft_labels, dtype=np.float64)
    if values.shape != settings.soft_label_shape:
        raise UpdateRejected(f"{what}: the soft labels have shape {values.shape}, the run's proxy set and classes "
                             f"give {settings.soft_label_shape}.")
    if not np.all(np.isfinite(values)):
        raise UpdateRejected(f"{what}: the soft labels hold non-finite values.")
    if values.min() < -PROBABILITY_TOLERANCE or values.max() > 1 + PROBABILITY_TOLERANCE or np.max(
            np.abs(values.sum(axis=1) - 1.0)) > PROBABILITY_TOLERANCE * settings.classes:
        raise UpdateRejected(f"{what}: the soft labels are not probability distributions (values outside [0, 1] or "
                             "rows that do not sum to 1).")
    clipped = np.clip(values, 0.0, None)
    return clipped / clipped.sum(axis=1, keepdims=True)
