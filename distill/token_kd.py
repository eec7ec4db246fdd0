"""Token-level knowledge distillation for causal LMs against a cached top-k teacher (docs/causal_lm.md).

The teacher runs once per site. For every real token position the cache keeps the teacher's top-k token ids,
their logits (relative to the row's maximum) and, for a grid of temperatures, the log of the unnormalised
probability mass of the other ``vocab - k`` tokens (the *tail logit*). At temperature T the teacher's
distribution over the k + 1 outcomes "one of the top-k tokens" and "any other token" is then
``log_softmax([z_1/T, ..., z_k/T, tail(T)])``, exact on the grid and a convex-interpolated upper bound on the
tail between grid points. The student is compared on the same k + 1 outcomes, so every divergence below is a
proper divergence between two distributions, and with ``k == vocab`` it is the full-vocabulary one.

Losses are reduced per sequence (mean over its real tokens): the unit of privacy is one document, so Opacus's
per-sample clipping must see one loss per sequence. :func:`chunked_token_kd_loss` computes the same loss from
the student's last hidden states and its (frozen) output layer, a chunk of positions at a time, each chunk's
gradient taken during the forward pass, so the ``[batch, seq, vocab]`` logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from protocols.config import CAUSAL_DIVERGENCES
from protocols.errors import ConfigError

DIVERGENCES = CAUSAL_DIVERGENCES
REDUCTIONS = ("mean", "sum", "none")
# Uniform in 1/T from 1 to 0.1, i.e. T from 1 to 10 (the project's schedules run 10 -> 1). The tail logit is
# convex in 1/T, so the error of interpolating between neighbours shrinks with the square of the spacing.
DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(10.0 / n for n in range(10, 0, -1))
# Rows of [*, vocab] temporaries per step when building a cache: bounds memory at a 262,144-token vocabulary.
BUILD_CHUNK = 64
# A student's tail sum (relative to its maximum) below this is recomputed exactly: its terms have underflowed.
FAR_TAIL = 1e-30
# -100 is the ignore index of F.cross_entropy: positions without a next real token have no hard target.
NO_LABEL = -100


@dataclass(frozen=True, eq=False)  # eq on numpy fields would be ambiguous; compare to_arrays() instead
class TopKTargets:
    """The cached teacher targets of a batch of sequences, as compact numpy arrays.

    Positions are flattened (only real tokens, attention_mask 1): sequence ``i`` owns rows
    ``offsets[i]:offsets[i + 1]``, at token positions ``positions[...]`` of that sequence.
    """

    token_ids: np.ndarray  # int32 [N, k]: the teacher's top-k ids, most likely first
    logits: np.ndarray  # float16 (default) [N, k]: their logits minus the row's maximum, so <= 0
    tail_logits: np.ndarray  # float32 [N, G]: log sum over the other ids of exp((z - max) / T_g); -inf if k == vocab
    inverse_temperatures: np.ndarray  # float64 [G], ascending: 1 / T_g
    offsets: np.ndarray  # int64 [sequences + 1]
    positions: np.ndarray  # int32 [N]
    vocab_size: int
    # float32 [N, P, hidden]: the teacher's hidden states after P chosen layers at the same positions (for
    # hidden-state alignment, distill.causal_train); None when the cache holds none.
    hidden: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def has_tail(self) -> bool:
        """Whether there is a tail bucket at all: with k == vocab the top-k is the whole distribution."""
        return self.k < self.vocab_size

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store (``np.savez``-ready); :meth:`from_arrays` reads them back."""
        arrays = {"token_ids": self.token_ids, "logits": self.logits, "tail_logits": self.tail_logits,
                  "inverse_temperatures": self.inverse_temperatures, "offsets": self.offsets,
                  "positions": self.positions, "vocab_size": np.asarray(self.vocab_size, dtype=np.int64)}
        return arrays | ({"hidden": self.hidden} if self.hidden is not None else {})

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TopKTargets:
        """Targets from stored arrays, checked: a damaged cache must fail here, not train on garbage."""
        targets = cls(token_ids=np.asarray(arrays["token_ids"]), logits=np.asarray(arrays["logits"]),
                      tail_logits=np.asarray(arrays["tail_logits"]),
                      inverse_temperatures=np.asarray(arrays["inverse_temperatures"]),
                      offsets=np.asarray(arrays["offsets"]), positions=np.asarray(arrays["positions"]),
                      vocab_size=int(arrays["vocab_size"]),
                      hidden=np.asarray(arrays["hidden"]) if "hidden" in arrays else None)
        targets.validate()
        return targets

    def validate(self) -> None:
        n, k = self.token_ids.shape
        checks = [
            (self.token_ids.dtype == np.int32, "token_ids must be int32"),
            (self.logits.dtype in (np.float16, np.float32) and self.logits.shape == (n, k),
             "logits must be float16 or float32 of the shape of token_ids"),
            (self.tail_logits.dtype == np.float32 and self.tail_logits.shape == (n, len(self.inverse_temperatures)),
             "tail_logits must be float32 [positions, temperatures]"),
            (bool(np.all(np.diff(self.inverse_temperatures) > 0)), "inverse_temperatures must be strictly ascending"),
            (self.offsets.dtype == np.int64 and self.offsets[0] == 0 and self.offsets[-1] == n
             and bool(np.all(np.diff(self.offsets) >= 0)), "offsets must be int64, from 0 to the positions, ascending"),
            (self.positions.dtype == np.int32 and self.positions.shape == (n,), "positions must be int32 [positions]"),
            (0 < k <= self.vocab_size
             and (n == 0 or (self.token_ids.min() >= 0 and self.token_ids.max() < self.vocab_size)),
             "token ids must lie in the vocabulary"),
            (self.hidden is None or (self.hidden.dtype == np.float32 and self.hidden.ndim == 3
                                     and len(self.hidden) == n and bool(np.isfinite(self.hidden).all())),
             "hidden must be finite float32 [positions, layers, hidden]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid top-k targets: {message}.")

    def select(self, sequences: Sequence[int] | np.ndarray) -> TopKTargets:
        """The targets of some sequences, in the order given (a Poisson-sampled batch of documents)."""
        chosen = np.asarray(sequences, dtype=np.int64)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in chosen]) if len(chosen) else \
            np.zeros(0, dtype=np.int64)
        lengths = np.diff(self.offsets)[chosen]
        return TopKTargets(self.token_ids[rows], self.logits[rows], self.tail_logits[rows], self.inverse_temperatures,
                           np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.positions[rows],
                           self.vocab_size, self.hidden[rows] if self.hidden is not None else None)

    def tail_logit_at(self, temperature: float) -> np.ndarray:
        """The tail logit [N] at ``temperature``: a cached column, or the chord between its two neighbours in 1/T.

        ``log sum exp(beta * d)`` is convex in ``beta = 1/T``, so the chord lies above it: between grid points
        the tail mass is overestimated (never negative, the k + 1 distribution stays valid), by an amount
        measured in tests/test_token_kd.py and docs/causal_lm.md.
        """
        beta = 1.0 / temperature
        grid = self.inverse_temperatures
        exact = np.flatnonzero(np.isclose(grid, beta, rtol=1e-9, atol=0.0))
        if len(exact):
            return self.tail_logits[:, exact[0]].astype(np.float64)
        if not grid[0] < beta < grid[-1]:
            raise ConfigError(f"temperature {temperature} lies outside the cache's temperatures "
                              f"{1.0 / grid[-1]:g}..{1.0 / grid[0]:g}; rebuild the cache with it in the grid.")
        upper = int(np.searchsorted(grid, beta))
        weight = (beta - grid[upper - 1]) / (grid[upper] - grid[upper - 1])
        low, high = self.tail_logits[:, upper - 1].astype(np.float64), self.tail_logits[:, upper].astype(np.float64)
        return (1.0 - weight) * low + weight * high

    def teacher_log_probs(self, temperature: float) -> torch.Tensor:
        """The teacher's log-probabilities [N, k + 1] (top-k, then tail) at ``temperature``; [N, k] if k == vocab."""
        top = torch.from_numpy(self.logits.astype(np.float64)) / temperature
        if not self.has_tail:
            return F.log_softmax(top, dim=-1).float()
        tail = torch.from_numpy(self.tail_logit_at(temperature)).unsqueeze(-1)
        return F.log_softmax(torch.cat([top, tail], dim=-1), dim=-1).float()


def concatenate_targets(parts: Sequence[TopKTargets]) -> TopKTargets:
    """One cache from per-batch parts (the teacher runs over a site's data batch by batch)."""
    first = parts[0]
    for part in parts[1:]:
        if part.vocab_size != first.vocab_size or part.k != first.k or \
                not np.array_equal(part.inverse_temperatures, first.inverse_temperatures) or \
                (part.hidden is None) != (first.hidden is None):
            raise ValueError("cannot concatenate top-k targets with different vocabularies, k, temperatures or "
                             "hidden states.")
    lengths = np.concatenate([np.diff(part.offsets) for part in parts])
    hidden = np.concatenate([p.hidden for p in parts]) if first.hidden is not None else None
    return TopKTargets(np.concatenate([p.token_ids for p in parts]), np.concatenate([p.logits for p in parts]),
                       np.concatenate([p.tail_logits for p in parts]), first.inverse_temperatures,
                       np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       np.concatenate([p.positions for p in parts]), first.vocab_size, hidden)


@torch.no_grad()
def build_topk_targets(teacher_logits: torch.Tensor, attention_mask: torch.Tensor, k: int,
                       temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                       logit_dtype: type[np.floating] = np.float16) -> TopKTargets:
    """The cache entry of a batch: teacher logits [batch, seq, vocab], attention_mask [batch, seq] (0 = padding).

    float16 suffices for the top-k logits because they are stored relative to the row's maximum: the likely
    tokens sit near 0, where float16 is finest (rounding <= 0.002 for offsets above -8, <= 0.004 down to -16).
    The tail logits stay float32: they carry the mass of up to 262k tokens and are few per position.
    """
    vocab = teacher_logits.shape[-1]
    if not 0 < k <= vocab:
        raise ConfigError(f"top-k must lie in 1..{vocab} (the vocabulary), got {k}.")
    if any(t <= 0 for t in temperatures):
        raise ConfigError(f"temperatures must be positive, got {list(temperatures)}.")
    betas = np.unique(1.0 / np.asarray(temperatures, dtype=np.float64))
    mask = attention_mask.bool()
    sequence, position = mask.nonzero(as_tuple=True)  # row-major: sequence by sequence, positions ascending
    ids, logits, tails = [], [], []
    buffer = torch.empty(min(BUILD_CHUNK, len(sequence)), vocab)
    for start in range(0, len(sequence), BUILD_CHUNK):
        rows = teacher_logits[sequence[start:start + BUILD_CHUNK], position[start:start + BUILD_CHUNK]].float()
        shifted = rows - rows.max(dim=-1, keepdim=True).values
        top, top_ids = shifted.topk(k, dim=-1)
        peak = torch.zeros(len(rows), 1)  # already shifted: the maximum is 0
        out = buffer[:len(rows)]
        tails.append(torch.stack([_tail_exponentials(shifted, peak, top_ids, 1.0 / beta, out)[2] for beta in betas],
                                 dim=-1))
        ids.append(top_ids)
        logits.append(top)
    lengths = mask.sum(dim=1).numpy()
    empty = torch.zeros(0, k)
    return TopKTargets(
        token_ids=torch.cat(ids or [empty.long()]).numpy().astype(np.int32),
        logits=torch.cat(logits or [empty]).numpy().astype(logit_dtype),
        tail_logits=torch.cat(tails or [torch.zeros(0, len(betas))]).numpy().astype(np.float32),
        inverse_temperatures=betas,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        positions=position.numpy().astype(np.int32),
        vocab_size=vocab,
    )


def divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """A divergence over the last dimension between two distributions given as finite log-probabilities.

    ``forward_kl`` is KL(teacher || student) (mass-covering), ``reverse_kl`` KL(student || teacher)
    (mode-seeking). ``jsd`` is the generalised Jensen-Shannon divergence with mixture
    ``M = beta * teacher + (1 - beta) * student``, divided by ``beta * (1 - beta)``: that scale makes it tend to
    the forward KL as beta -> 0 and to the reverse KL as beta -> 1 (at 0 and 1 it is those), and gives it the
    same second-order behaviour as both KLs near student == teacher, so T^2 scaling applies alike.
    """
    if kind not in DIVERGENCES:
        raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {kind!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"the JSD's beta must lie in [0, 1], got {beta}.")
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
    mixture = torch.logaddexp(teacher_log_probs + np.log(beta), student_log_probs + np.log1p(-beta))
    to_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    to_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True).sum(-1)
    return (beta * to_teacher + (1.0 - beta) * to_student) / (beta * (1.0 - beta))


def _tail_exponentials(logits: torch.Tensor, peak: torch.Tensor, token_ids: torch.Tensor, temperature: float,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tail of rows of logits [n, vocab] at ``temperature``, outside ``token_ids`` [n, k], with row maxima ``peak``.

    Returns ``exp((s - peak) / T)`` with the k entries zeroed [n, vocab], its row sums [n], and the tail logit
    ``log sum_{v outside} exp(s_v / T)`` [n]. Zeroing k entries of the exponentials (rather than masking the logits
    with -inf and taking a logsumexp) takes three passes over the row instead of five or six. ``out`` [n, vocab]
    receives the exponentials: reusing one buffer saves the page faults of a fresh one (half the time, measured).
    """
    tail_exp = torch.add(-peak / temperature, logits, alpha=1.0 / temperature, out=out).exp_()
    tail_exp.scatter_(-1, token_ids, 0.0)
    tail_sum = tail_exp.sum(dim=-1)
    tail = peak.squeeze(-1) / temperature + tail_sum.log()
    # Where the tail is so far below the maximum that its terms underflow (gaps of ~87 nats in float32), those
    # rows are redone relative to the tail itself, exactly; their exponentials become the tail's softmax.
    far = tail_sum < FAR_TAIL
    if bool(far.any()):
        scaled = (logits[far] / temperature).scatter(-1, token_ids[far], float("-inf"))
        tail[far] = scaled.logsumexp(dim=-1)
        tail_exp[far] = (scaled - tail[far].unsqueeze(-1)).exp()
        tail_sum[far] = 1.0
    return tail_exp, tail_sum, tail


class _VocabStatistics(torch.autograd.Function):
    """The few numbers per position that the loss needs from the student's logits [n, vocab], in few passes.

    Outputs: the top-k logits over T [n, k]; the tail logit ``log sum_{v outside the top-k} exp(s_v / T)`` [n]; and
    for the hard target ``log sum_v exp(s_v)`` [n] and the label's logit [n]. The tail sums the exponentials with
    the k top entries zeroed, so a small tail loses nothing to ``1 - sum(top-k)`` cancellation. Backward writes
    the gradient from the saved exponentials in one pass, where autograd would chain several [n, vocab]
    temporaries (the loss runs about twice as fast, docs/causal_lm.md).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, labels: torch.Tensor, temperature: float,
                with_tail: bool, with_ce: bool) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.with_tail, ctx.with_ce = temperature, with_tail, with_ce
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        peak = logits.max(dim=-1, keepdim=True).values
        top = logits.gather(-1, token_ids) / temperature
        tail, lse, picked = (logits.new_zeros(len(logits)) for _ in range(3))
        tail_exp = tail_sum = all_exp = all_sum = None
        if with_tail:
            tail_exp, tail_sum, tail = _tail_exponentials(logits, peak, token_ids, temperature)
        if with_ce:
            all_exp = torch.sub(logits, peak).exp_()
            all_sum = all_exp.sum(dim=-1)  # >= 1: the maximum contributes exp(0)
            lse = peak.squeeze(-1) + all_sum.log()
            picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(token_ids, labels, tail_exp, tail_sum, all_exp, all_sum)
        return top, tail, lse, picked

    @staticmethod
    def backward(ctx, grad_top: torch.Tensor | None, grad_tail: torch.Tensor | None, grad_lse: torch.Tensor | None,
                 grad_picked: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        token_ids, labels, tail_exp, tail_sum, all_exp, all_sum = ctx.saved_tensors
        temperature = ctx.temperature
        grad = None
        if ctx.with_tail and grad_tail is not None:
            # d tail / d s_v = exp(s_v / T) / (T * tail sum) outside the top-k, 0 on it (zeroed entries).
            grad = tail_exp * (grad_tail / (temperature * tail_sum)).unsqueeze(-1)
        if ctx.with_ce and grad_lse is not None:
            scale = (grad_lse / all_sum).unsqueeze(-1)  # d lse / d s_v = softmax(s)_v
            grad = all_exp * scale if grad is None else grad.addcmul_(all_exp, scale)
        if grad is None:
            grad = torch.zeros(ctx.shape, dtype=ctx.dtype)
        if grad_top is not None:
            grad.scatter_add_(-1, token_ids, grad_top / temperature)
        if ctx.with_ce and grad_picked is not None:
            grad.scatter_add_(-1, labels.unsqueeze(-1), grad_picked.unsqueeze(-1))
        return grad, None, None, None, None, None


def _position_losses(rows: torch.Tensor, token_ids: torch.Tensor, teacher_log_probs: torch.Tensor,
                     labels: torch.Tensor, temperature: float, kind: str, beta: float, has_tail: bool,
                     with_ce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence and hard-target cross-entropy [n] for n positions of student logits ``rows`` [n, vocab]."""
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()  # sums over 262k exponentials need float32
    has_label = labels != NO_LABEL
    top, tail, lse, picked = _VocabStatistics.apply(rows, token_ids, torch.where(has_label, labels, 0), temperature,
                                                    has_tail, with_ce)
    # The student's k + 1 outcomes: its top-k logits and its tail logit, normalised together.
    student = F.log_softmax(torch.cat([top, tail.unsqueeze(-1)], dim=-1) if has_tail else top, dim=-1)
    kd = divergence(student, teacher_log_probs.to(student.dtype), kind, beta)
    ce = torch.where(has_label, lse - picked, 0.0) if with_ce else torch.zeros_like(kd)
    return kd, ce


class _EagerChunks(torch.autograd.Function):
    """Per-sequence losses [batch] whose gradient is computed chunk by chunk during the forward pass.

    Each chunk of positions runs its forward and backward at once and keeps only the gradient with respect to
    its rows of ``source`` ([chunk, hidden] or [chunk, vocab]), so its [chunk, vocab] intermediates are freed
    before the next chunk starts; the whole batch's never coexist. The loss of sequence b is a sum over its own
    positions, so backward only scales each position's stored gradient by the incoming gradient of its sequence:
    a second backward pass (Opacus's ghost clipping, retain_graph=True on the first) costs almost nothing.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, contributions: Callable[[torch.Tensor, int, int], torch.Tensor],
                sequence: torch.Tensor, position: torch.Tensor, batch: int, chunk_size: int,
                needs_grad: bool) -> torch.Tensor:
        total = len(sequence)
        values, gradients = [], []
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            rows = source[sequence[start:stop], position[start:stop]].detach().requires_grad_(needs_grad)
            with torch.set_grad_enabled(needs_grad):
                value = contributions(rows, start, stop)
                if needs_grad:
                    gradients.append(torch.autograd.grad(value.sum(), rows)[0])
            values.append(value.detach())
        ctx.source_shape = source.shape
        if needs_grad:
            ctx.save_for_backward(torch.cat(gradients), sequence, position)
        joined = torch.cat(values)
        return joined.new_zeros(batch).index_add_(0, sequence, joined)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gradients, sequence, position = ctx.saved_tensors
        grad_source = gradients.new_zeros(ctx.source_shape)
        grad_source[sequence, position] = grad_output[sequence].unsqueeze(-1) * gradients
        return grad_source, None, None, None, None, None, None


def _sequence_losses(source: torch.Tensor, head: nn.Module, targets: TopKTargets,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float, alpha: float,
                     kind: str, beta: float, chunk_size: int | None) -> torch.Tensor:
    """The per-sequence loss [batch] from ``source`` [batch, seq, *] whose rows ``head`` maps to logits."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}.")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}.")
    mask = attention_mask.bool()
    sequence, position = mask.nonzero(as_tuple=True)
    if (targets.sequences != mask.shape[0] or len(position) != len(targets.positions)
            or not np.array_equal(position.numpy(), targets.positions)
            or not np.array_equal(mask.sum(dim=1).numpy(), np.diff(targets.offsets))):
        # Targets built for other sequences (or another padding) would silently distil the wrong tokens.
        raise ValueError("the top-k targets do not match the batch's real token positions; select the targets "
                         "of exactly these sequences (TopKTargets.select) and keep the teacher's padding.")
    # The hard target of position t is the next real token; the last real token of a sequence has none.
    following = torch.zeros_like(mask)
    following[:, :-1] = mask[:, 1:]
    next_ids = torch.full_like(input_ids, NO_LABEL)
    next_ids[:, :-1] = input_ids[:, 1:]
    labels = torch.where(following, next_ids, NO_LABEL)[sequence, position]
    token_ids = torch.from_numpy(targets.token_ids.astype(np.int64))
    teacher = targets.teacher_log_probs(temperature)
    # Per-position weights that make each sequence's sum of contributions the mean over its real tokens (KD) and
    # over its tokens with a next token (CE); a sequence with none of them contributes 0 rather than 0/0.
    batch = mask.shape[0]
    tokens = mask.sum(dim=1).clamp(min=1).float()
    label_tokens = torch.zeros(batch).index_add_(0, sequence, (labels != NO_LABEL).float()).clamp(min=1.0)
    kd_weight = ((1.0 - alpha) * temperature ** 2 / tokens)[sequence]
    ce_weight = (alpha / label_tokens)[sequence]

    def contributions(rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        logits = head(rows)
        if logits.shape[-1] != targets.vocab_size:
            raise ValueError(f"the student has {logits.shape[-1]} outputs but the teacher's targets are over "
                             f"{targets.vocab_size} tokens; token-level KD needs the teacher's tokenizer.")
        kd, ce = _position_losses(logits, token_ids[start:stop], teacher[start:stop], labels[start:stop],
                                  temperature, kind, beta, targets.has_tail, alpha > 0)
        return kd_weight[start:stop] * kd + ce_weight[start:stop] * ce

    total = len(sequence)
    if chunk_size is None or chunk_size >= total:
        values = contributions(source[sequence, position], 0, total)
        return values.new_zeros(batch).index_add(0, sequence, values)
    needs_grad = torch.is_grad_enabled() and source.requires_grad
    return _EagerChunks.apply(source, contributions, sequence, position, batch, chunk_size, needs_grad)


def token_kd_loss(student_logits: torch.Tensor, targets: TopKTargets, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, temperature: float, alpha: float, divergence_kind: str = "forward_kl",
                  beta: float = 0.5, chunk_size: int | None = None) -> torch.Tensor:
    """One loss per sequence [batch]: ``alpha * CE(next token) + (1 - alpha) * T^2 * D(teacher_T, student_T)``.

    ``student_logits`` [batch, seq, vocab]; ``targets`` for exactly these sequences; each term is the mean over
    the sequence's real tokens (padding excluded). With ``chunk_size``, that many positions at a time bound the
    loss's own [*, vocab] intermediates (their gradient is taken during the forward pass); the logits themselves
    are already materialised, which :func:`chunked_token_kd_loss` avoids.
    """
    return _sequence_losses(student_logits, nn.Identity(), targets, input_ids, attention_mask, temperature, alpha,
                            divergence_kind, beta, chunk_size)


def chunked_token_kd_loss(hidden_states: torch.Tensor, head: nn.Module,
                          targets: TopKTargets, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          temperature: float, alpha: float, divergence_kind: str = "forward_kl", beta: float = 0.5,
                          chunk_size: int = 64) -> torch.Tensor:
    """:func:`token_kd_loss` from the student's last hidden states [batch, seq, hidden] and its output layer.

    ``head`` maps [n, hidden] to [n, vocab] logits (e.g. ``model.get_output_embeddings()``, with the config's
    ``final_logit_softcapping`` folded in where it is set). Only the hidden states get a gradient, so the head
    must be frozen (the issue's students share the teacher's frozen embedding); a trainable one is refused
    rather than silently left untrained, and under DP Opacus could not clip per-sample gradients it never sees.
    """
    if any(parameter.requires_grad for parameter in head.parameters()):
        raise ValueError("chunked_token_kd_loss needs a frozen output layer; train the output layer through "
                         "token_kd_loss on materialised logits instead.")
    return _sequence_losses(hidden_states, head, targets, input_ids, attention_mask, temperature, alpha,
                            divergence_kind, beta, chunk_size)


class TokenKDLoss(nn.Module):
    """:func:`token_kd_loss` with a settable ``reduction``, the form Opacus's ghost clipping wraps (it sets "none")."""

    def __init__(self, temperature: float, alpha: float, divergence_kind: str = "forward_kl", beta: float = 0.5,
                 chunk_size: int | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        self.temperature, self.alpha, self.divergence_kind, self.beta = temperature, alpha, divergence_kind, beta
        self.chunk_size, self.reduction = chunk_size, reduction

    def forward(self, student_logits: torch.Tensor, targets: TopKTargets, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        per_sequence = token_kd_loss(student_logits, targets, input_ids, attention_mask, self.temperature, self.alpha,
                                     self.divergence_kind, self.beta, self.chunk_size)
        if self.reduction == "none":
            return per_sequence
        return per_sequence.mean() if self.reduction == "mean" else per_sequence.sum()
