"""Evaluation: ROC-AUC (the headline on imbalanced binary tasks), accuracy, macro-F1 and Cohen's kappa.

Threshold-dependent metrics use a decision threshold chosen on validation data, never on the test split.
A metric that is undefined for a split (ROC-AUC with a single class) is reported as ``None`` with a reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def choose_threshold(labels: np.ndarray, positive_scores: np.ndarray) -> float:
    """The positive-class threshold that maximises F1 of the positive class on validation data.

    Falls back to 0.5 when validation holds a single class (no threshold can be learned from it).
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return 0.5
    candidates = np.unique(np.quantile(positive_scores, np.linspace(0.0, 1.0, 201)))
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        f1 = f1_score(labels, (positive_scores >= threshold).astype(int), zero_division=0)
        if f1 > best_f1:
            best, best_f1 = float(threshold), f1
    return best


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Metrics of one split. ``threshold`` applies to binary tasks; multi-class uses the arg-max."""
    labels = np.asarray(labels)
    n_classes = probabilities.shape[1]
    result: dict[str, Any] = {"n": int(len(labels)), "positives": int((labels == 1).sum()) if n_classes == 2 else None}
    if len(labels) == 0:
        return result | {"accuracy": None, "roc_auc": None, "macro_f1": None, "kappa": None,
                         "undefined": "empty split"}
    if n_classes == 2 and threshold is not None:
        predictions = (probabilities[:, 1] >= threshold).astype(int)
    else:
        predictions = probabilities.argmax(axis=1)
    present = np.unique(labels)
    undefined = []
    if len(present) < 2:
        roc_auc = None
        undefined.append("roc_auc: the split holds a single class")
    elif n_classes == 2:
        roc_auc = float(roc_auc_score(labels, probabilities[:, 1]))
    else:
        try:
            roc_auc = float(roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(n_classes))))
        except ValueError as err:
            roc_auc, _ = None, undefined.append(f"roc_auc: {err}")
    kappa = cohen_kappa_score(labels, predictions) if len(present) > 1 or len(np.unique(predictions)) > 1 else None
    if kappa is None:
        undefined.append("kappa: labels and predictions hold a single identical class")
    result |= {
        "accuracy": float(accuracy_score(labels, predictions)),
        "roc_auc": roc_auc,
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "kappa": None if kappa is None or np.isnan(kappa) else float(kappa),
    }
    if undefined:
        result["undefined"] = "; ".join(undefined)
    return result


def evaluate_across_sites(predict, sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-site and pooled test metrics of one model.

    ``predict`` maps a :class:`distill.data.SplitData` to class probabilities. The decision threshold is
    chosen once on the pooled validation splits and applied to every test split; the overall metrics use
    the pooled test splits.
    """
    val = {name: predict(splits["val"]) for name, splits in sites.items()}
    test = {name: predict(splits["test"]) for name, splits in sites.items()}
    val_labels = np.concatenate([sites[n]["val"].labels for n in sites])
    val_scores = np.concatenate([val[n] for n in sites])
    binary = val_scores.shape[1] == 2
    threshold = choose_threshold(val_labels, val_scores[:, 1]) if binary else None
    overall = classification_metrics(np.concatenate([sites[n]["test"].labels for n in sites]),
                                     np.concatenate([test[n] for n in sites]), threshold)
    per_site = {name: classification_metrics(sites[name]["test"].labels, test[name], threshold) for name in sites}
    # The pooled validation metrics (the split the threshold was chosen on): what choosing a round may look at.
    validation = classification_metrics(val_labels, val_scores, threshold)
    return {"threshold": threshold, "overall": overall, "per_site": per_site, "validation": validation}
