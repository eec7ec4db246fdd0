"""Server-side distillation of the sites' summed knowledge: the global student learns the secure mean of the sites'
soft labels on the registered proxy inputs (protocols/knowledge.py).

The coordinator never holds one site's soft labels: it decodes the SecAgg+ mean (protocols/secagg.py), checks that
it is a matrix of probability rows, and distils it. The proxy inputs are public and the mean is post-processing of
the sites' releases, so this step reads no site record and costs no site any budget.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
from torch import nn

from distill.causal_knowledge import distil_on_release, proxy_prompts, shared_token_ids
from distill.causal_train import CausalTrainSettings
from distill.train import PROBABILITY_FLOOR, distil_to_probabilities, proxy_distillation
from protocols.canonical import digest_arrays
from protocols.knowledge import KnowledgeSettings


def distil_soft_labels(model: nn.Module, family: str, proxy: dict[str, np.ndarray], soft_labels: np.ndarray,
                       settings: KnowledgeSettings, seed: int) -> dict[str, Any]:
    """Take ``server_steps`` KD steps of ``model`` towards ``soft_labels`` on ``proxy`` at the run's temperature
    (distill.train.distil_to_probabilities); returns the step's record."""
    outcome = distil_to_probabilities(model, family, proxy, soft_labels, proxy_distillation(settings, seed))
    probabilities = np.clip(np.asarray(soft_labels, dtype=np.float64), PROBABILITY_FLOOR, None)
    return {"mode": settings.mode, "source": settings.source, "proxy_digest": settings.proxy_digest,
            "soft_labels_digest": digest_arrays({"soft_labels": np.asarray(soft_labels, dtype=np.float64)}),
            "server_steps": outcome.steps, "server_loss": outcome.mean_loss,
            "mean_entropy": float(-(probabilities * np.log(probabilities)).sum(axis=1).mean())}


def distil_token_soft_labels(model: nn.Module, proxy: dict[str, np.ndarray], soft_labels: np.ndarray,
                             settings: KnowledgeSettings, trainable: Collection[str], divergence: str, beta: float,
                             seed: int) -> dict[str, Any]:
    """A causal-LM run's server-side distillation: ``server_steps`` steps of token-level KD of the ``trainable``
    tensors (the round's planned fragments) towards the mean next-token release on the proxy prompts."""
    prompts = proxy_prompts(model, proxy)
    shared = shared_token_ids(prompts, settings.shared_tokens, model.get_output_embeddings().weight.shape[0])
    outcome = distil_on_release(model, prompts, soft_labels, shared, CausalTrainSettings(
        steps=settings.server_steps, batch_size=settings.server_batch_size, learning_rate=settings.server_learning_rate,
        temperature=settings.temperature, alpha=0.0, seed=seed, divergence=divergence, beta=beta,
        optimizer=settings.server_optimizer), trainable)
    probabilities = np.clip(np.asarray(soft_labels, dtype=np.float64), PROBABILITY_FLOOR, None)
    return {"mode": settings.mode, "source": settings.source, "proxy_digest": settings.proxy_digest,
            "soft_labels_digest": digest_arrays({"soft_labels": np.asarray(soft_labels, dtype=np.float64)}),
            "server_steps": outcome.steps, "server_loss": outcome.mean_loss, "shared_tokens": len(shared),
            "other_tokens_mass": float(probabilities[:, -1].mean()),
            "mean_entropy": float(-(probabilities * np.log(probabilities)).sum(axis=1).mean())}
