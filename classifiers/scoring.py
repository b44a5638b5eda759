"""A fitted estimator's class probabilities over all of a cache's classes, from features or
from a split of its caches read block by block."""

from __future__ import annotations

from typing import Any

import numpy as np

from classifiers.evaluation import full_proba
from classifiers.sources import CacheSet

PREDICT_BLOCK_BYTES = 64 * 1000**2  # features scored per predict call


def head_proba(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """A head's probabilities over all of the cache's classes."""
    return full_proba(estimator.predict_proba(X), estimator.classes_, n_classes)


def source_proba(estimator: Any, source: CacheSet, split: str, mask: np.ndarray | None = None,
                 block_bytes: int = 0) -> np.ndarray:
    """A head's probabilities for a split's rows (where `mask` is true), read block by block."""
    n_classes = len(source.class_names)
    parts = [head_proba(estimator, X, n_classes) for _, X in
             source.iter_blocks(split, mask, target_bytes=block_bytes or PREDICT_BLOCK_BYTES)]
    return np.concatenate(parts) if parts else np.zeros((0, n_classes))
