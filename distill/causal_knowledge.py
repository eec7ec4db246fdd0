"""The knowledge channel of a causal-LM run: next-token distributions at the real positions of public proxy prompts.

Every site and the coordinator share one layout (protocols/knowledge.py, ``proxy_positions`` x ``classes``): a row
per real token position of the proxy prompts, in order, and a column per *shared token* (the ``classes - 1``
student ids most frequent among the prompts' real tokens, ties to the smaller id: :func:`shared_token_ids`, fixed by
the public prompts and the run's base student alone) plus one bucket for every other token. A release is its model's
temperature-T next-token distribution folded onto these outcomes (:func:`next_token_release`); its rows sum to 1, so
the SecAgg+ mean is one too.

The coordinator distils the mean back (:func:`distil_on_release`): as top-k targets (distill/token_kd.py) whose k
ids are the shared tokens at every position and whose tail bucket is the "every other token" mass, so the student
is compared on the same ``k + 1`` outcomes by the run's own divergence.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from torch import nn

from distill.causal_train import CausalTrainSettings, causal_logits, distill_causal
from distill.data import SplitData
from distill.token_kd import TopKTargets
from distill.train import PROBABILITY_FLOOR, TrainOutcome
from distill.vocabulary import vocabulary_of
from protocols.errors import ConfigError

# Proxy prompts per forward pass: [batch, length, vocabulary] logits stay a few tens of MB at 32k tokens.
RELEASE_BATCH = 8


def proxy_prompts(model: nn.Module, proxy: Mapping[str, np.ndarray]) -> SplitData:
    """The proxy prompts (teacher ids, as the proxy file holds them) in the model's own ids."""
    if set(proxy) != {"input_ids", "attention_mask"}:
        raise ConfigError(f"a causal-LM run's proxy set holds input_ids and attention_mask, not {sorted(proxy)}.")
    ids = np.asarray(proxy["input_ids"], dtype=np.int64)
    prompts = SplitData({"input_ids": ids, "attention_mask": np.asarray(proxy["attention_mask"], dtype=np.int64)},
                        np.zeros(len(ids), dtype=np.int64))
    vocabulary = vocabulary_of(model)
    return vocabulary.remap_split(prompts) if vocabulary is not None else prompts


def real_positions(proxy: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(proxy["attention_mask"]).sum())


def shared_token_ids(prompts: SplitData, count: int, vocab_size: int) -> np.ndarray:
    """The ``count`` student ids most frequent among the prompts' real tokens (ties: the smaller id)."""
    if not 1 <= count < vocab_size:
        raise ConfigError(f"a token-level release shares 1 to {vocab_size - 1} tokens, got {count}.")
    mask = prompts.inputs["attention_mask"] == 1
    counts = np.bincount(prompts.inputs["input_ids"][mask], minlength=vocab_size)
    return np.lexsort((np.arange(vocab_size), -counts))[:count].astype(np.int64)


@torch.no_grad()
def next_token_release(model: nn.Module, prompts: SplitData, shared: np.ndarray, temperature: float) -> np.ndarray:
    """[real positions, shared + 1]: the model's next-token probabilities at temperature T of each shared token,
    then of every other token, at every real position of the prompts in order."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        ids = torch.as_tensor(prompts.inputs["input_ids"])
        mask = torch.as_tensor(prompts.inputs["attention_mask"])
        index = torch.as_tensor(shared)
        for start in range(0, len(ids), RELEASE_BATCH):
            batch_ids, batch_mask = ids[start:start + RELEASE_BATCH], mask[start:start + RELEASE_BATCH]
            probabilities = torch.softmax(causal_logits(model, batch_ids, batch_mask).double() / temperature, dim=-1)
            real = probabilities[batch_mask.bool()]
            on_shared = real.index_select(-1, index)
            rows.append(torch.cat([on_shared, (1.0 - on_shared.sum(-1, keepdim=True)).clamp(min=0.0)], dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(rows).numpy() if rows else np.zeros((0, len(shared) + 1))


def release_as_targets(release: np.ndarray, prompts: SplitData, shared: np.ndarray, vocab_size: int,
                       temperature: float) -> TopKTargets:
    """A (mean) release as top-k targets at ``temperature``: at T the k + 1 distribution is exactly the release."""
    probabilities = np.clip(np.asarray(release, dtype=np.float64), PROBABILITY_FLOOR, None)
    log_p = np.log(probabilities / probabilities.sum(axis=1, keepdims=True))
    peak = log_p[:, :-1].max(axis=1, keepdims=True)
    mask = prompts.inputs["attention_mask"]
    lengths = mask.sum(axis=1).astype(np.int64)
    positions = np.concatenate([np.flatnonzero(row) for row in mask]).astype(np.int32) if len(mask) else \
        np.zeros(0, dtype=np.int32)
    targets = TopKTargets(token_ids=np.tile(shared.astype(np.int32), (len(probabilities), 1)),
                          logits=(temperature * (log_p[:, :-1] - peak)).astype(np.float32),
                          tail_logits=(log_p[:, -1:] - peak).astype(np.float32),
                          inverse_temperatures=np.asarray([1.0 / temperature]),
                          offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), positions=positions,
                          vocab_size=vocab_size)
    targets.validate()
    return targets


def distil_on_release(model: nn.Module, prompts: SplitData, release: np.ndarray, shared: np.ndarray,
                      settings: CausalTrainSettings, trainable: Collection[str]) -> TrainOutcome:
    """Token-level KD of ``model``'s ``trainable`` tensors towards a release on the proxy prompts (alpha is 0)."""
    vocab_size = model.get_output_embeddings().weight.shape[0]
    targets = release_as_targets(release, prompts, shared, vocab_size, settings.temperature)
    return distill_causal(model, prompts, targets, settings, trainable)
