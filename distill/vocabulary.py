"""A student vocabulary smaller than the teacher's: a shared subset fixed from public text (issue 12, item 4).

With Gemma's 262,144 tokens the output layer costs 168M multiply-adds per token, more than the teacher's 18 layers
(100M): a 3-layer student that keeps the whole vocabulary is barely faster. The student here keeps only the ``V'``
token ids most frequent in public text (plus the tokenizer's special tokens), and one more id, ``<oov>``, that
stands for every other token. Its embedding rows are the teacher's rows of those ids (``<oov>``: the mean of the
dropped rows), tied to its output layer, so it is a standard causal LM of vocabulary ``V' + 1`` that
``save_pretrained`` writes and ``AutoModelForCausalLM`` loads; the kept teacher ids travel in its config
(``fedistill_student.vocabulary``), pinned with the base folder's digest.

What each side sees:

* the teacher reads the texts with its own ids; its distribution is mapped onto the ``V' + 1`` outcomes
  (:meth:`VocabularySubset.teacher_logits_on_subset`): every kept token keeps its logit, ``<oov>`` gets the
  log-sum-exp of all dropped ones, so at T = 1 the teacher's probability of ``<oov>`` is exactly its mass outside
  the subset (at another temperature the ``<oov>`` logit is tempered as one logit, an approximation that
  docs/causal_lm.md states);
* the student reads and predicts student ids (:meth:`VocabularySubset.student_ids`): a dropped token in its input
  becomes ``<oov>``;
* perplexity is always over the teacher's full vocabulary: a held-out token outside the subset costs the student
  ``-log p(<oov>) + log(V - V')``, its ``<oov>`` mass spread evenly over the dropped tokens
  (:func:`distill.causal_train.score_tokens`). Nothing is hidden by the smaller vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.causal_lm import STUDENT_CONFIG_KEY
from distill.data import SplitData
from protocols.errors import ConfigError


@dataclass(frozen=True, eq=False)
class VocabularySubset:
    """Student id ``i < V'`` is teacher id ``teacher_ids[i]``; student id ``V'`` is ``<oov>``."""

    teacher_ids: np.ndarray  # int64 [V'], distinct
    teacher_vocab_size: int

    def __post_init__(self) -> None:
        ids = np.asarray(self.teacher_ids, dtype=np.int64)
        if ids.ndim != 1 or not len(ids) or len(np.unique(ids)) != len(ids) or ids.min() < 0 or \
                ids.max() >= self.teacher_vocab_size or len(ids) >= self.teacher_vocab_size:
            raise ConfigError(f"vocabulary subset: need 1 to {self.teacher_vocab_size - 1} distinct teacher ids in "
                              f"0..{self.teacher_vocab_size - 1}.")
        object.__setattr__(self, "teacher_ids", ids)

    @property
    def size(self) -> int:
        """The student's vocabulary: the kept ids and ``<oov>``."""
        return len(self.teacher_ids) + 1

    @property
    def oov_id(self) -> int:
        return len(self.teacher_ids)

    @property
    def dropped(self) -> int:
        """How many teacher tokens ``<oov>`` stands for."""
        return self.teacher_vocab_size - len(self.teacher_ids)

    @property
    def oov_log_spread(self) -> float:
        """What a held-out token outside the subset costs beyond ``-log p(<oov>)``: ``<oov>`` spread evenly."""
        return math.log(self.dropped)

    def _table(self) -> np.ndarray:
        table = np.full(self.teacher_vocab_size, self.oov_id, dtype=np.int64)
        table[self.teacher_ids] = np.arange(len(self.teacher_ids))
        return table

    def student_ids(self, teacher_ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Teacher ids to student ids (a dropped token becomes ``<oov>``), numpy or torch alike."""
        table = self._table()
        if isinstance(teacher_ids, torch.Tensor):
            return torch.from_numpy(table)[teacher_ids]
        return table[np.asarray(teacher_ids, dtype=np.int64)]

    def remap_split(self, data: SplitData) -> SplitData:
        """A text split in student ids (the mask, labels and groups as they are)."""
        return SplitData({**data.inputs, "input_ids": self.student_ids(data.inputs["input_ids"])}, data.labels,
                         data.groups)

    def teacher_logits_on_subset(self, logits: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[..., V]`` onto the student's ``[..., V' + 1]`` outcomes: the kept tokens' logits, then
        the log-sum-exp of the dropped ones (float64 for the difference of two log-sum-exps)."""
        kept = torch.from_numpy(self.teacher_ids)
        total = torch.logsumexp(logits.double(), dim=-1)
        on_subset = logits.index_select(-1, kept)
        kept_total = torch.logsumexp(on_subset.double(), dim=-1)
        # log(exp(total) - exp(kept_total)), exact when the dropped mass is tiny; -inf when it is zero.
        oov = total + torch.log(-torch.expm1((kept_total - total).clamp(max=0.0)))
        return torch.cat([on_subset, oov.to(logits.dtype).unsqueeze(-1)], dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_ids": self.teacher_ids.tolist(), "teacher_vocab_size": self.teacher_vocab_size}

    @classmethod
    def from_dict(cls, raw: Any) -> VocabularySubset:
        if not isinstance(raw, dict) or set(raw) != {"teacher_ids", "teacher_vocab_size"}:
            raise ConfigError("vocabulary subset: expected teacher_ids and teacher_vocab_size.")
        return cls(np.asarray(raw["teacher_ids"], dtype=np.int64), int(raw["teacher_vocab_size"]))


def public_vocabulary(input_ids: np.ndarray, attention_mask: np.ndarray, teacher_vocab_size: int, size: int,
                      always: Sequence[int] = ()) -> VocabularySubset:
    """The ``size`` teacher ids most frequent in public text (ties: the smaller id), ``always`` included (the
    tokenizer's special tokens: padding and end of text must exist in the student). Reads public text only."""
    counts = np.bincount(np.asarray(input_ids)[np.asarray(attention_mask) == 1], minlength=teacher_vocab_size)
    forced = sorted({int(i) for i in always})
    if size <= len(forced) or size >= teacher_vocab_size:
        raise ConfigError(f"vocabulary size {size}: must exceed the {len(forced)} special tokens and stay below the "
                          f"teacher's {teacher_vocab_size}.")
    counts[forced] = -1  # placed first below, not counted twice
    order = np.lexsort((np.arange(teacher_vocab_size), -counts))
    frequent = [int(i) for i in order if counts[i] > 0][: size - len(forced)]
    return VocabularySubset(np.asarray(forced + frequent, dtype=np.int64), teacher_vocab_size)


def restrict_vocabulary(student: nn.Module, subset: VocabularySubset) -> nn.Module:
    """The student with only the subset's embedding rows (``<oov>``: the mean of the dropped rows), tied to its
    output layer, its config's vocabulary and special-token ids in student ids, and the subset recorded."""
    embedding = student.get_input_embeddings()
    weight = embedding.weight.detach()
    if weight.shape[0] != subset.teacher_vocab_size:
        raise ConfigError(f"vocabulary subset of {subset.teacher_vocab_size} ids for a student with "
                          f"{weight.shape[0]} embedding rows.")
    dropped = torch.ones(weight.shape[0], dtype=torch.bool)
    dropped[torch.from_numpy(subset.teacher_ids)] = False
    rows = torch.cat([weight[torch.from_numpy(subset.teacher_ids)], weight[dropped].mean(dim=0, keepdim=True)])
    requires_grad = embedding.weight.requires_grad
    embedding.weight = nn.Parameter(rows.clone(), requires_grad=requires_grad)
    embedding.num_embeddings = subset.size
    config = student.config
    table = subset._table()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, int(table[value]))
        elif isinstance(value, list):
            setattr(config, name, [int(table[v]) for v in value])
    config.vocab_size = subset.size
    if getattr(student, "generation_config", None) is not None:
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(student.generation_config, name, None)
            if isinstance(value, int):
                setattr(student.generation_config, name, int(table[value]))
            elif isinstance(value, list):
                setattr(student.generation_config, name, [int(table[v]) for v in value])
    student.tie_weights()
    if student.get_output_embeddings().weight is not embedding.weight:
        raise ConfigError(f"{type(student).__name__}: its output layer is not tied to its embedding; a vocabulary "
                          "subset needs a tied model.")
    record = getattr(config, STUDENT_CONFIG_KEY, None)
    if not isinstance(record, dict):
        record = {}
        setattr(config, STUDENT_CONFIG_KEY, record)
    record["vocabulary"] = subset.to_dict()
    return student


def vocabulary_of(model: nn.Module) -> VocabularySubset | None:
    """The subset a student was built with (from its config, so a loaded or LoRA-wrapped student has it too)."""
    config = getattr(model, "config", None)
    record = getattr(config, STUDENT_CONFIG_KEY, None) if config is not None else None
    if isinstance(record, dict) and record.get("vocabulary") is not None:
        return VocabularySubset.from_dict(record["vocabulary"])
    return None
