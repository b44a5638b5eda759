"""Classification metrics on a split of a cache."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                             top_k_accuracy_score)


def full_proba(proba: np.ndarray, classes: Sequence[int], n_classes: int) -> np.ndarray:
    """Spread a head's probability columns (its `classes_`) over all of the cache's classes."""
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, np.asarray(classes, dtype=int)] = proba
    return full


def accuracy_figures(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, plus top-5 accuracy when there are more than 5 classes."""
    figures = {"accuracy": float(accuracy_score(y_true, proba.argmax(axis=1)))}
    if proba.shape[1] > 5:
        figures["top5_accuracy"] = float(top_k_accuracy_score(
            y_true, proba, k=5, labels=np.arange(proba.shape[1])))
    return figures


def classification_report(y_true: np.ndarray, proba: np.ndarray,
                          class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy figures, per-class precision/recall/F1/support and the confusion matrix."""
    labels = np.arange(len(class_names))
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0)
    return {
        **accuracy_figures(y_true, proba),
        "rows": int(len(y_true)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
    }
