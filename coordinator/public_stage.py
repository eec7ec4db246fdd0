"""The coordinator's stage of a causal-LM run: the base student distilled on public text, before any site trains.

The documents this project grew from distil in stages: general ability on a public corpus first, then the
private data. In a federation the first stage belongs to the coordinator: the teacher is public (it never saw a
site's records, client/teacher.py), the corpus is public, so the stage reads no site record and spends no privacy
budget. Its product is the run's **base student** (``CausalLMSettings.base``), which every site already receives
and checks against ``base_digest``; the stage is recorded inside that folder's config
(``fedistill_student.public_stage``), so the digest every site checks, and the signed coordinator ledger that
holds it, also pin how the base was made. The federated rounds then train their fragments (LoRA adapters or the
blocks) on top of it under DP-SGD.

What the stage trains: every tensor of the student outside its frozen, vocabulary-sized embedding (the decoder
blocks and norms), with token-level KD against the teacher's top-k targets on the public texts
(distill.causal_train), non-privately: there is nothing private to protect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from distill.cache import TopKTargetCache
from distill.causal_lm import (CausalLMTeacher, layer_subset_student, record_in_student, save_causal_lm_student,
                               tokenize_texts)
from distill.causal_train import CausalTrainSettings, distill_causal, split_sequences, teacher_targets
from distill.data import SplitData
from distill.models import path_digest
from distill.token_kd import DIVERGENCES
from distill.vocabulary import public_vocabulary, restrict_vocabulary, vocabulary_of
from protocols.config import OPTIMIZERS
from protocols.errors import ConfigError

SCHEMA_VERSION = 1
TEACHER_BATCH = 8


@dataclass(frozen=True)
class PublicStageSettings:
    """How the coordinator distils the base student on public text: optimizer steps of token-level KD."""

    steps: int
    batch_size: int
    learning_rate: float
    top_k: int
    optimizer: str = "adam"
    temperature: float = 1.0
    alpha: float = 0.5
    divergence: str = "forward_kl"
    seed: int = 0

    def __post_init__(self) -> None:
        where = "public stage settings"
        for name in ("steps", "batch_size", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{where}: field '{name}' must be a positive integer, got {getattr(self, name)!r}.")
        if not 0 < self.learning_rate <= 10:
            raise ConfigError(f"{where}: field 'learning_rate' must be in (0, 10], got {self.learning_rate!r}.")
        if not 0 < self.temperature <= 100:
            raise ConfigError(f"{where}: field 'temperature' must be in (0, 100], got {self.temperature!r}.")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{where}: field 'alpha' must be in [0, 1], got {self.alpha!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{where}: field 'optimizer' must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}.")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"{where}: field 'divergence' must be one of {', '.join(DIVERGENCES)}, "
                              f"got {self.divergence!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distill_on_public(student: nn.Module, teacher: CausalLMTeacher, public: SplitData,
                      settings: PublicStageSettings, cache_dir: Path) -> dict[str, Any]:
    """Distil ``student`` in place on the ``public`` texts (teacher ids, as tokenized) and record the stage in its
    config; returns that record. The teacher's top-k targets are cached in ``cache_dir`` (keyed by the teacher's
    digest, the texts' digest, k and the temperature), so a second base built from the same texts does not run the
    teacher again. Save the student afterwards (distill.causal_lm.save_causal_lm_student): the record travels in
    its config.json and so under its digest."""
    if len(public) < settings.batch_size:
        raise ConfigError(f"public stage: {len(public)} public texts are fewer than one batch "
                          f"({settings.batch_size}); give more public text or a smaller batch_size.")
    vocabulary = vocabulary_of(student)
    ids, mask = split_sequences(public)
    temperatures = (float(settings.temperature),)
    targets = TopKTargetCache(cache_dir).targets(
        public, teacher.digest, settings.top_k, temperatures,
        lambda: teacher_targets(teacher.model, ids, mask, settings.top_k, TEACHER_BATCH, temperatures, vocabulary)
    ).targets
    texts = vocabulary.remap_split(public) if vocabulary is not None else public
    trainable = [name for name, parameter in student.named_parameters() if parameter.requires_grad]
    outcome = distill_causal(student, texts, targets, CausalTrainSettings(
        steps=settings.steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        temperature=settings.temperature, alpha=settings.alpha, seed=settings.seed, divergence=settings.divergence,
        optimizer=settings.optimizer), trainable)
    record = {
        "schema_version": SCHEMA_VERSION,
        "where": "coordinator",
        "data": "public",
        "public_texts": len(public),
        "public_tokens": int(public.inputs["attention_mask"].sum()),
        "public_digest": public.digest(),
        "teacher_digest": teacher.digest,
        "settings": settings.to_dict(),
        "trained_tensors": len(trainable),
        "trained_parameters": int(sum(p.numel() for p in student.parameters() if p.requires_grad)),
        "mean_loss": outcome.mean_loss,
        "site_records_read": 0,
        "epsilon": 0.0,
    }
    record_in_student(student, "public_stage", record)
    return record


def public_split(tokenizer: Any, texts: Sequence[str], max_length: int) -> SplitData:
    """Public texts as a split (the teacher's ids, right-padded); a text of one token predicts nothing and is
    dropped. Each text is its own document."""
    encoded = tokenize_texts(tokenizer, texts, max_length)
    keep = encoded["attention_mask"].sum(axis=1) >= 2
    encoded = {key: value[keep] for key, value in encoded.items()}
    count = int(keep.sum())
    return SplitData(encoded, np.zeros(count, np.int64), np.arange(count, dtype=np.int64))


def initial_student(teacher: CausalLMTeacher, layers: Sequence[int], public_texts: Sequence[str], max_length: int,
                    vocabulary: int | None) -> nn.Module:
    """The teacher's ``layers`` (distill.causal_lm.layer_subset_student), on the ``vocabulary`` teacher tokens most
    frequent in the public texts plus ``<oov>`` (distill.vocabulary; the special tokens always kept), or on the
    teacher's whole vocabulary when ``vocabulary`` is None. Nothing is distilled yet."""
    student = layer_subset_student(teacher.model, layers)
    if vocabulary is None:
        return student
    if not public_texts:
        raise ConfigError("base student: a vocabulary subset is chosen from public text; give public texts.")
    tokenizer = teacher.tokenizer
    tokens = tokenize_texts(tokenizer, public_texts, max_length)
    special = [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.unk_token_id) if i is not None]
    return restrict_vocabulary(student, public_vocabulary(
        tokens["input_ids"], tokens["attention_mask"], teacher.model.get_input_embeddings().num_embeddings,
        vocabulary, special))


def public_sample(texts: Sequence[str], count: int, seed: int) -> tuple[str, ...]:
    """A fixed sample of ``count`` public texts (in their original order), the same for the same seed."""
    if count < 1:
        raise ConfigError(f"public stage: the number of public texts must be at least 1, got {count}.")
    chosen = np.random.default_rng(seed).permutation(len(texts))[:count]
    return tuple(texts[i] for i in sorted(chosen))


def read_public_texts(path: Path) -> tuple[str, ...]:
    """A public corpus file: UTF-8, one document per line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--public: '{path}' does not exist; give a UTF-8 text file with one public document per "
                          "line.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--public: '{path}' is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
                          "UTF-8, one public document per line.") from None
    texts = tuple(line.strip() for line in lines if line.strip())
    if not texts:
        raise ConfigError(f"--public: '{path}' holds no text; give one public document per line.")
    return texts


def build_base_student(teacher: CausalLMTeacher, out: Path, layers: Sequence[int], public_texts: Sequence[str],
                       max_length: int, vocabulary: int | None, stage: PublicStageSettings | None,
                       stage_texts: int | None, cache_dir: Path) -> dict[str, Any]:
    """The operator's base student for a causal-LM run, written to ``out`` with ``save_pretrained`` and the
    teacher's tokenizer: the teacher's ``layers``, an optional vocabulary subset chosen from the public texts, and,
    when ``stage`` is given, the public stage on ``stage_texts`` of them (a fixed sample by the stage's seed; all of
    them when None). Returns what the operator hands on: the folder, its digest (the run's ``base_digest``) and how
    it was made."""
    student = initial_student(teacher, layers, public_texts, max_length, vocabulary)
    record = None
    if stage is not None:
        texts = public_sample(public_texts, stage_texts, stage.seed) if stage_texts else tuple(public_texts)
        record = distill_on_public(student, teacher, public_split(teacher.tokenizer, texts, max_length), stage,
                                   cache_dir)
    save_causal_lm_student(student, out, teacher.tokenizer)
    subset = vocabulary_of(student)
    return {"base": str(Path(out).resolve()), "base_digest": path_digest(out), "teacher_digest": teacher.digest,
            "teacher_layers": list(layers), "vocabulary_tokens": subset.size if subset is not None else None,
            "max_length": max_length, "public_stage": record}
