"""Server-side distillation of the sites' summed knowledge: the global student learns the secure mean of the sites'
soft labels on the registered proxy inputs (protocols/knowledge.py).

The coordinator never holds one site's soft labels: it decodes the SecAgg+ mean (protocols/secagg.py), checks that
it is a matrix of probability rows, and distils it. The proxy inputs are public and the mean is post-processing of
the sites' releases, so this step reads no site record and costs no site any budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from distill.data import SplitData
from distill.train import TrainSettings, distill
from protocols.canonical import digest_arrays
from protocols.knowledge import KnowledgeSettings

# Probabilities below this are floored before their logarithm: the target's log-probabilities stay finite.
PROBABILITY_FLOOR = 1e-8


def distil_soft_labels(model: nn.Module, family: str, proxy: dict[str, np.ndarray], soft_labels: np.ndarray,
                       settings: KnowledgeSettings, seed: int) -> dict[str, Any]:
    """Take ``server_steps`` KD steps of ``model`` towards ``soft_labels`` on ``proxy``; returns the step's record.

    The targets enter the distillation loss as logits ``T * log p``, so that at the run's temperature T the
    teacher distribution the student matches is exactly ``p``; alpha is 0 (the proxy set has no labels).
    """
    probabilities = np.clip(np.asarray(soft_labels, dtype=np.float64), PROBABILITY_FLOOR, None)
    logits = (settings.temperature * np.log(probabilities)).astype(np.float32)
    data = SplitData(dict(proxy), probabilities.argmax(axis=1).astype(np.int64))
    outcome = distill(model, family, data, logits,
                      TrainSettings(steps=settings.server_steps, batch_size=settings.server_batch_size,
                                    learning_rate=settings.server_learning_rate, temperature=settings.temperature,
                                    alpha=0.0, seed=seed, optimizer=settings.server_optimizer))
    return {"mode": settings.mode, "source": settings.source, "proxy_digest": settings.proxy_digest,
            "soft_labels_digest": digest_arrays({"soft_labels": np.asarray(soft_labels, dtype=np.float64)}),
            "server_steps": outcome.steps, "server_loss": outcome.mean_loss,
            "mean_entropy": float(-(probabilities * np.log(probabilities)).sum(axis=1).mean())}
