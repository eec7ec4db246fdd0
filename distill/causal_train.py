"""Training and evaluation of causal-LM students against cached top-k teacher targets (issue 12).

Plain functions, no Flower and no privacy engine (DP-SGD is :func:`client.privacy.private_distill_causal`, which
uses the same criterion). The pieces a site needs, in order:

* :func:`teacher_targets`: the teacher's top-k targets for a site's sequences, computed once (for the cache);
* :func:`distill_causal`: optimizer steps of token-level KD on the named trainable tensors (blocks or LoRA);
* :func:`score_tokens`, :func:`top1_agreement`: held-out perplexity of any causal LM and top-1 agreement.

Sequences are fixed-length, right-padded ``input_ids``/``attention_mask`` arrays
(:func:`distill.causal_lm.tokenize_texts`), so every sequence's positions are ``0..length-1``: the models are
given those positions explicitly, per sequence and contiguous, as Opacus's per-sample hooks need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.data import SplitData
from distill.token_kd import (DEFAULT_TEMPERATURES, DIVERGENCES, TopKTargets, build_topk_targets,
                              chunked_token_kd_loss, concatenate_targets, token_kd_loss)
from distill.train import TrainOutcome, make_optimizer, shuffled_batches
from distill.vocabulary import VocabularySubset, vocabulary_of
from protocols.errors import ConfigError, DataError

# Positions of [*, vocab] rows per chunk: with Gemma's 262,144 outputs, 64 rows are 64 MiB of float32, so the
# loss's and the evaluation's temporaries stay far below one batch of logits.
CHUNK = 64
# How far the chunked path's logits (output layer on the last hidden state) may drift from the model's own before
# the model is refused: float32 rounding of the same computation is far smaller, a missed logit scale far larger.
LOGIT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CausalTrainSettings:
    """One round of local token-level KD: ``alpha * CE(next token) + (1 - alpha) * T^2 * D(teacher, student)``."""

    steps: int
    batch_size: int
    learning_rate: float
    temperature: float
    alpha: float
    seed: int
    divergence: str = "forward_kl"
    beta: float = 0.5  # the generalised JSD's mixture weight (distill.token_kd.divergence)
    optimizer: str = "sgd"
    chunk_size: int = CHUNK
    # Hidden-state alignment: weight of the mean relative squared error between the student's outputs after these
    # decoder layers and the teacher's cached ones (TopKTargets.hidden, pair by pair, in this order).
    alignment_weight: float = 0.0
    alignment_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.alignment_weight < 0 or (self.alignment_weight > 0 and not self.alignment_layers):
            raise ConfigError(f"alignment_weight {self.alignment_weight}: must be >= 0, and > 0 only with "
                              "alignment layers.")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}.")
        if self.steps < 0 or self.batch_size < 1 or self.chunk_size < 1:
            raise ConfigError(f"steps must be >= 0, batch_size and chunk_size >= 1; got {self.steps}, "
                              f"{self.batch_size}, {self.chunk_size}.")


# --------------------------------------------------------------------------------------------- sequences
def sequence_tensors(input_ids: np.ndarray | torch.Tensor,
                     attention_mask: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[n, length]`` tensors, checked: same shape and right padding (each mask row is 1...1 0...0)."""
    ids, mask = torch.as_tensor(input_ids, dtype=torch.long), torch.as_tensor(attention_mask, dtype=torch.long)
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise DataError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be the same "
                        "[sequences, length].")
    if bool((mask[:, 1:] > mask[:, :-1]).any()) or bool(((mask != 0) & (mask != 1)).any()):
        # Left padding would shift every real token off the positions 0..length-1 that the models are given.
        raise DataError("attention_mask must be 0/1 and padded on the right (tokenize_texts does this).")
    return ids, mask


def split_sequences(data: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
    """A text split's ``input_ids`` and ``attention_mask`` as checked tensors."""
    missing = [name for name in ("input_ids", "attention_mask") if name not in data.inputs]
    if missing:
        raise DataError(f"a causal-LM split needs input_ids and attention_mask; {missing} missing.")
    return sequence_tensors(data.inputs["input_ids"], data.inputs["attention_mask"])


def position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """``0..length-1`` for every sequence, materialised with ``repeat``: Opacus breaks on an ``expand`` view (one
    row shared by the batch) wherever the ids reach a trained position embedding, as in BERT; Gemma's rotary
    positions have no parameters, but a family with learned positions must get per-sample, contiguous ids."""
    batch, length = input_ids.shape
    return torch.arange(length).repeat(batch, 1)


def causal_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's own full-vocabulary logits [batch, length, vocab], with per-sequence positions."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(input_ids)).logits


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    return (slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size))


def _real_width(mask: torch.Tensor) -> int:
    """The batch's longest text: with right padding every column after it is padding in every row, and a causal
    model's outputs at the real positions do not depend on it, so the forward pass can skip it."""
    return max(1, int(mask.sum(dim=1).max())) if len(mask) else mask.shape[1]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The outputs [batch, length, hidden] of the given decoder layers in the forward passes inside, by forward
    hooks on the layers themselves (transformers' ``hidden_states`` holds the last layer only after the final norm)."""
    decoder_layers = _base_model(model).get_decoder().layers
    if any(not 0 <= i < len(decoder_layers) for i in layers):
        raise ConfigError(f"alignment layers {list(layers)}: {type(_base_model(model)).__name__} has decoder layers "
                          f"0..{len(decoder_layers) - 1}.")
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return keep

    handles = [decoder_layers[i].register_forward_hook(hook(i)) for i in dict.fromkeys(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _at_real_positions(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, length, hidden] -> [real positions, hidden], sequence by sequence, positions ascending (the order of
    a TopKTargets' rows)."""
    return states[mask.bool()]


# --------------------------------------------------------------------------------------------- teacher targets
@torch.no_grad()
def teacher_targets(teacher: nn.Module, input_ids: np.ndarray | torch.Tensor,
                    attention_mask: np.ndarray | torch.Tensor, k: int, batch_size: int,
                    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                    vocabulary: VocabularySubset | None = None, hidden_layers: Sequence[int] = ()) -> TopKTargets:
    """The teacher's top-k targets (with their tail bucket, distill.token_kd) for every sequence, batch by batch.

    Run once per site and cached (``TopKTargets.to_arrays``): only one batch of the teacher's full-vocabulary
    logits exists at a time. ``temperatures`` is the grid the cache serves exactly; a run whose schedule uses
    fewer temperatures can build a cheaper cache (the tail costs one pass over the vocabulary per temperature).
    With a student ``vocabulary`` subset, the teacher's distribution is first mapped onto the student's outcomes
    (distill.vocabulary), so the targets' ids are student ids. ``hidden_layers``: also keep the teacher's outputs
    after these decoder layers at every real position (float32: Gemma's residual stream overflows float16), for
    hidden-state alignment.
    """
    ids, mask = sequence_tensors(input_ids, attention_mask)
    if len(ids) == 0:
        raise DataError("teacher_targets: no sequences.")
    parts = []
    with _eval_mode(teacher):
        for rows in _batches(len(ids), batch_size):
            width = _real_width(mask[rows])
            batch_mask = mask[rows, :width]
            with layer_outputs(teacher, hidden_layers) as outputs:
                logits = causal_logits(teacher, ids[rows, :width], batch_mask)
            if vocabulary is not None:
                logits = vocabulary.teacher_logits_on_subset(logits)
            part = build_topk_targets(logits, batch_mask, k, temperatures)
            if hidden_layers:
                hidden = torch.stack([_at_real_positions(outputs[i], batch_mask) for i in hidden_layers], dim=1)
                part = replace(part, hidden=hidden.numpy().astype(np.float32))
            parts.append(part)
    return concatenate_targets(parts)


@torch.no_grad()
def teacher_continuations(teacher: nn.Module, input_ids: np.ndarray | torch.Tensor,
                          attention_mask: np.ndarray | torch.Tensor, new_tokens: int, batch_size: int,
                          pad_token_id: int) -> dict[str, np.ndarray]:
    """Every sequence followed by ``new_tokens`` tokens the teacher writes after it (greedy, end-of-text suppressed
    until then): right-padded ``input_ids``/``attention_mask`` of width ``L + new_tokens``, in the teacher's ids.

    The material of sequence-level KD: the student learns the teacher's own continuations of a site's documents,
    as one more stretch of each document's sequence, so one DP-SGD sample is still one document (its
    continuation is a function of it and of the public teacher only). Batches are generated left-padded, as
    ``generate`` needs, and put back right-padded.
    """
    if new_tokens < 1:
        raise ConfigError(f"teacher continuations: new_tokens must be at least 1, got {new_tokens}.")
    ids, mask = sequence_tensors(input_ids, attention_mask)
    lengths = mask.sum(dim=1)
    if len(ids) == 0 or int(lengths.min()) < 1:
        raise DataError("teacher continuations: every sequence needs at least one real token to continue.")
    width = ids.shape[1] + new_tokens
    out_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.int64)
    out_mask = torch.zeros((len(ids), width), dtype=torch.int64)
    with _eval_mode(teacher):
        for rows in _batches(len(ids), batch_size):
            batch_lengths = lengths[rows]
            longest = int(batch_lengths.max())
            left_ids = torch.full((len(batch_lengths), longest), pad_token_id, dtype=torch.int64)
            left_mask = torch.zeros_like(left_ids)
            for offset, (row, length) in enumerate(zip(ids[rows], batch_lengths.tolist())):
                left_ids[offset, longest - length:] = row[:length]
                left_mask[offset, longest - length:] = 1
            generated = teacher.generate(input_ids=left_ids, attention_mask=left_mask, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
            generated = generated[:, longest:longest + new_tokens]
            if generated.shape[1] != new_tokens:
                raise DataError(f"teacher continuations: the teacher wrote {generated.shape[1]} tokens, not "
                                f"{new_tokens}.")
            for offset, (index, length) in enumerate(zip(range(rows.start, rows.stop), batch_lengths.tolist())):
                out_ids[index, :length] = ids[index, :length]
                out_ids[index, length:length + new_tokens] = generated[offset]
                out_mask[index, :length + new_tokens] = 1
    return {"input_ids": out_ids.numpy(), "attention_mask": out_mask.numpy()}


# --------------------------------------------------------------------------------------------- the criterion
class OutputLayer(nn.Module):
    """A causal LM's output layer as its forward applies it: the projection, then the final-logit soft-capping
    that Gemma 2 and 3 configs may set (``final_logit_softcapping``)."""

    def __init__(self, projection: nn.Module, softcap: float | None) -> None:
        super().__init__()
        self.projection, self.softcap = projection, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.projection(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the wrapper itself has no decoder accessor of its own)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SequenceKDLoss:
    """The per-sequence token-level KD loss of one student on a batch: the criterion of the plain and the DP loop.

    With a frozen output layer (the students of issue 12 share the teacher's frozen embedding) the loss runs on
    the decoder's last hidden states through :func:`distill.token_kd.chunked_token_kd_loss`, so the batch's
    ``[batch, length, vocab]`` logits never exist; with a trainable one it needs the model's logits
    (:func:`distill.token_kd.token_kd_loss`). ``reduction`` is "mean" or "none" (one loss per sequence): Opacus's
    ghost clipping sets it to "none" to clip each sequence, the unit of privacy, separately. Build it with
    :func:`kd_criterion`, which checks the chunked path against the model's own logits.
    """

    def __init__(self, model: nn.Module, settings: CausalTrainSettings, reduction: str = "mean") -> None:
        self.model, self.settings, self.reduction = model, settings, reduction
        base = _base_model(model)
        projection = base.get_output_embeddings()
        self.trains_output_layer = projection is None or any(p.requires_grad for p in projection.parameters())
        self.decoder = None if self.trains_output_layer else base.get_decoder()
        self.head = None if self.trains_output_layer else \
            OutputLayer(projection, getattr(base.config, "final_logit_softcapping", None))

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [batch, length, hidden], which the output layer maps to the logits."""
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(input_ids)).last_hidden_state

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: TopKTargets) -> torch.Tensor:
        s = self.settings
        width = _real_width(attention_mask)
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        aligned = s.alignment_layers if s.alignment_weight > 0 else ()
        with layer_outputs(self.model, aligned) as outputs:
            if self.trains_output_layer:
                logits = causal_logits(self.model, input_ids, attention_mask)
                per_sequence = token_kd_loss(logits, targets, input_ids, attention_mask, s.temperature, s.alpha,
                                             s.divergence, s.beta, s.chunk_size)
            else:
                per_sequence = chunked_token_kd_loss(self.last_hidden(input_ids, attention_mask), self.head,
                                                     targets, input_ids, attention_mask, s.temperature, s.alpha,
                                                     s.divergence, s.beta, s.chunk_size)
        if aligned:
            per_sequence = per_sequence + s.alignment_weight * alignment_loss(outputs, aligned, targets,
                                                                              attention_mask)
        if self.reduction == "none":
            return per_sequence
        if self.reduction == "mean":
            return per_sequence.mean()
        raise ConfigError(f"reduction must be 'mean' or 'none', got {self.reduction!r}.")


def alignment_loss(outputs: Mapping[int, torch.Tensor], layers: Sequence[int], targets: TopKTargets,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Per sequence [batch]: the mean over its real positions and over the layer pairs of the relative squared error
    ``|h_student - h_teacher|^2 / |h_teacher|^2`` (scale-free: Gemma's residual stream grows to norms in the
    hundreds). Each entry depends on its own sequence only, so per-sequence clipping stays per document."""
    if targets.hidden is None or targets.hidden.shape[1] != len(layers):
        raise ConfigError(f"hidden-state alignment on {len(layers)} layer pair(s) needs the teacher's hidden states "
                          "for as many layers in the cache; rebuild it with hidden_layers.")
    mask = attention_mask.bool()
    sequence = mask.nonzero(as_tuple=True)[0]
    teacher = torch.from_numpy(targets.hidden.astype(np.float32))
    errors = []
    for pair, layer in enumerate(layers):
        student = _at_real_positions(outputs[layer], attention_mask)
        reference = teacher[:, pair]
        errors.append(((student - reference) ** 2).sum(-1) / (reference ** 2).sum(-1).clamp_min(1e-6))
    per_position = torch.stack(errors).mean(dim=0)
    counts = mask.sum(dim=1).clamp_min(1).to(per_position.dtype)
    return torch.zeros(len(mask), dtype=per_position.dtype).index_add(0, sequence, per_position) / counts


@torch.no_grad()
def kd_criterion(model: nn.Module, settings: CausalTrainSettings, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> SequenceKDLoss:
    """The criterion of ``model`` after its trainable tensors are set, checked on the first sequence: the chunked
    path assumes the logits are the output layer applied to the last hidden state, which some families break
    (a logit scale after the projection); such a model is refused rather than distilled into the wrong function."""
    criterion = SequenceKDLoss(model, settings)
    if not criterion.trains_output_layer:
        probe_ids, probe_mask = input_ids[:1], attention_mask[:1]
        with _eval_mode(model):
            expected = causal_logits(model, probe_ids, probe_mask)
            got = criterion.head(criterion.last_hidden(probe_ids, probe_mask))
        if not torch.allclose(got, expected, rtol=LOGIT_TOLERANCE, atol=LOGIT_TOLERANCE):
            raise ConfigError(f"{type(_base_model(model)).__name__}: its logits are not its output layer applied to "
                              "its last hidden state (a logit scale?); the chunked KD loss would train another model.")
    return criterion


# --------------------------------------------------------------------------------------------- training
@contextmanager
def trainable_only(model: nn.Module, trainable: Collection[str]) -> Iterator[list[nn.Parameter]]:
    """Only the named tensors (``named_parameters`` names) require grad inside; yields them. Afterwards every
    tensor is as frozen as before: a layer-subset student's embedding and a LoRA student's base stay frozen."""
    named = dict(model.named_parameters())
    unknown = sorted(set(trainable) - set(named))
    if not trainable or unknown:
        raise ConfigError(f"trainable tensors: {unknown or 'none given'}; expected names of "
                          f"{type(model).__name__}.named_parameters(), e.g. from trainable_tensor_names.")
    before = {name: parameter.requires_grad for name, parameter in named.items()}
    try:
        for name, parameter in named.items():
            parameter.requires_grad_(name in trainable)
        yield [parameter for name, parameter in named.items() if name in trainable]
    finally:
        for name, parameter in named.items():
            parameter.requires_grad_(before[name])


def check_targets(targets: TopKTargets, sequences: int) -> None:
    """The cache must be the split's: ``TopKTargets.select`` then checks each batch's positions."""
    if targets.sequences != sequences:
        raise DataError(f"the teacher's targets cover {targets.sequences} sequences but the split has {sequences}; "
                        "rebuild the cache for this split.")


def distill_causal(model: nn.Module, data: SplitData, targets: TopKTargets, settings: CausalTrainSettings,
                   trainable: Collection[str]) -> TrainOutcome:
    """``settings.steps`` optimizer steps of token-level KD on ``data`` against its cached ``targets``.

    Only the ``trainable`` tensors change (decoder blocks or LoRA adapters); batches are reshuffled passes of
    exactly ``batch_size`` sequences (:func:`distill.train.shuffled_batches`), as in :func:`distill.train.distill`.
    The mean loss is the mean over steps of the batch's mean per-sequence loss.
    """
    input_ids, attention_mask = split_sequences(data)
    check_targets(targets, len(data))
    generator = torch.Generator().manual_seed(settings.seed)
    total = 0.0
    with trainable_only(model, trainable) as parameters:
        criterion = kd_criterion(model, settings, input_ids, attention_mask)
        optimizer = make_optimizer(settings.optimizer, parameters, settings.learning_rate)
        model.train()
        for index in shuffled_batches(len(data), settings.batch_size, settings.steps, generator):
            loss = criterion(input_ids[index], attention_mask[index], targets.select(index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
    return TrainOutcome(mean_loss=total / max(settings.steps, 1), steps=settings.steps, examples=len(data))


# --------------------------------------------------------------------------------------------- evaluation
LogitsOf = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenScores:
    """One causal LM on held-out sequences, at every real token that is followed by a real token (the tokens it
    predicts): the next token's negative log-likelihood and the model's top-1 prediction there."""

    nll: np.ndarray  # float64 [P]
    top1: np.ndarray  # int64 [P]
    sequence: np.ndarray  # int64 [P]: which sequence
    position: np.ndarray  # int64 [P]: the predicting position (it predicts the token at position + 1)

    @property
    def tokens(self) -> int:
        return len(self.nll)

    @property
    def perplexity(self) -> float:
        """exp of the mean next-token NLL over all predicted tokens (each token weighs the same, not each text)."""
        if not self.tokens:
            raise DataError("perplexity: no sequence has two real tokens.")
        return math.exp(float(self.nll.mean()))


@torch.no_grad()
def score_tokens(model: nn.Module, input_ids: np.ndarray | torch.Tensor, attention_mask: np.ndarray | torch.Tensor,
                 batch_size: int, logits_of: LogitsOf = causal_logits) -> TokenScores:
    """:class:`TokenScores` of any causal LM (student, teacher, undistilled student), ``batch_size`` sequences at a
    time: one batch of full-vocabulary logits exists at once, its rows reduced ``CHUNK`` positions at a time.

    ``input_ids`` are the teacher's ids. A student with a vocabulary subset (distill.vocabulary) reads them as its
    own ids, and a held-out token outside its subset costs ``-log p(<oov>) + log(dropped tokens)``: the NLL stays
    over the teacher's full vocabulary. Its top-1 is reported in teacher ids (``<oov>`` as -1, which no teacher
    prediction equals). ``logits_of`` computes the logits of a batch of the model's own ids: the model itself by
    default, an exported copy of it (serving's onnxruntime sessions) otherwise.
    """
    ids, mask = sequence_tensors(input_ids, attention_mask)
    vocabulary = vocabulary_of(model)
    model_ids = vocabulary.student_ids(ids) if vocabulary is not None else ids
    to_teacher = torch.from_numpy(np.append(vocabulary.teacher_ids, -1)) if vocabulary is not None else None
    nll, top1, sequence, position = [], [], [], []
    with _eval_mode(model):
        for rows in _batches(len(ids), batch_size):
            width = _real_width(mask[rows])
            batch_ids, batch_mask = model_ids[rows, :width], mask[rows, :width]
            logits = logits_of(model, batch_ids, batch_mask)
            # Right padding: a position predicts a real token exactly when the next position is real.
            row, column = batch_mask[:, 1:].bool().nonzero(as_tuple=True)
            for start in range(0, len(row), CHUNK):
                r, c = row[start:start + CHUNK], column[start:start + CHUNK]
                scores = logits[r, c].double()
                target = batch_ids[r, c + 1]
                token_nll = scores.logsumexp(dim=-1) - scores.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                best = scores.argmax(dim=-1)
                if vocabulary is not None:
                    token_nll = token_nll + (target == vocabulary.oov_id).double() * vocabulary.oov_log_spread
                    best = to_teacher[best]
                nll.append(token_nll)
                top1.append(best)
            sequence.append(row + rows.start)
            position.append(column)
            del logits
    empty = torch.zeros(0, dtype=torch.long)
    return TokenScores(nll=torch.cat(nll or [empty.double()]).numpy(), top1=torch.cat(top1 or [empty]).numpy(),
                       sequence=torch.cat(sequence or [empty]).numpy(), position=torch.cat(position or [empty]).numpy())


def top1_agreement(student: TokenScores, teacher: TokenScores) -> float:
    """Share of predicted tokens where the student's top-1 token is the teacher's, on the same sequences."""
    if not (np.array_equal(student.sequence, teacher.sequence) and np.array_equal(student.position, teacher.position)):
        raise DataError("top1_agreement: the two scores are not over the same sequences and positions.")
    if not student.tokens:
        raise DataError("top1_agreement: no sequence has two real tokens.")
    return float(np.mean(student.top1 == teacher.top1))


CAUSAL_METRICS = ("perplexity", "top1_agreement", "nll")


def _metrics(scores: TokenScores, teacher: TokenScores | None) -> dict[str, float | int | None]:
    nll = float(scores.nll.mean()) if scores.tokens else None
    return {"perplexity": math.exp(nll) if nll is not None else None, "nll": nll,
            "top1_agreement": top1_agreement(scores, teacher) if teacher is not None and scores.tokens else None,
            "tokens": scores.tokens}


def split_scores(model: nn.Module, splits: Mapping[str, SplitData], batch_size: int) -> dict[str, TokenScores]:
    """:func:`score_tokens` of one model on each named split (e.g. every site's test texts)."""
    return {name: score_tokens(model, data.inputs["input_ids"], data.inputs["attention_mask"], batch_size)
            for name, data in splits.items()}


def evaluate_causal_lm(scores: Mapping[str, TokenScores],
                       teacher: Mapping[str, TokenScores] | None = None) -> dict[str, Any]:
    """Per split and pooled over every predicted token: perplexity, mean NLL and top-1 agreement with the teacher.

    Pooling is by token (a site with more text weighs more), as a deployed model meets tokens, not sites.
    """
    per_site = {name: _metrics(s, teacher[name] if teacher else None) for name, s in scores.items()}
    pooled = TokenScores(np.concatenate([s.nll for s in scores.values()]),
                         np.concatenate([s.top1 for s in scores.values()]),
                         np.concatenate([s.sequence + 10**9 * i for i, s in enumerate(scores.values())]),
                         np.concatenate([s.position for s in scores.values()]))
    pooled_teacher = None
    if teacher:
        parts = [teacher[name] for name in scores]
        pooled_teacher = TokenScores(np.concatenate([t.nll for t in parts]), np.concatenate([t.top1 for t in parts]),
                                     np.concatenate([t.sequence + 10**9 * i for i, t in enumerate(parts)]),
                                     np.concatenate([t.position for t in parts]))
    return {"overall": _metrics(pooled, pooled_teacher), "per_site": per_site}
