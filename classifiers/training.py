"""Fitting and evaluating heads on cached features."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from classifiers.evaluation import accuracy_figures, classification_report, full_proba
from classifiers.persistence import load_fitted_head, save_fitted_head
from classifiers.registry import get_head_kind
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.fingerprint import unit_fraction
from store.heads import check_head_name, list_heads
from store.store import Store

VALIDATION_FRACTION = 0.1
VALIDATION_SALT = "headstart-validation:"


def validation_mask(ids: np.ndarray, fraction: float = VALIDATION_FRACTION) -> np.ndarray:
    """Rows held out for validation, chosen by a hash of each sample id (same for every head)."""
    return np.fromiter((unit_fraction(str(i), VALIDATION_SALT) < fraction for i in ids),
                       dtype=bool, count=len(ids))


def head_proba(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """A head's probabilities over all of the cache's classes."""
    return full_proba(estimator.predict_proba(X), estimator.classes_, n_classes)


def augmented_views(store: Store, cache: FeatureCache) -> list[FeatureCache]:
    """The cached views of `cache` with the newest augmentation settings."""
    views = store.views_of(cache)
    if not views:
        raise HeadstartError(
            f"Cache {cache.name} has no augmented views; run its extract command again with "
            "--augment K first.")
    newest = max(views, key=lambda v: v.created).augmentation
    return [v for v in views if v.augmentation == newest]


@dataclass
class TrainingRows:
    """The rows a head is fitted on, and the validation rows it is judged on."""

    X_fit: np.ndarray
    y_fit: np.ndarray
    fit_ids: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    val_ids: np.ndarray
    views: list[str] = field(default_factory=list)  # fingerprints of the view caches used


def training_rows(store: Store, cache: FeatureCache, augmented: bool = False) -> TrainingRows:
    """Split a cache's training rows into fit and validation rows (by sample id).

    With `augmented`, the views of the fit images are added to the fit rows; no view of a
    validation image is ever trained on.
    """
    X = cache.features("train")
    y = cache.labels("train")
    ids = cache.ids("train")
    held_out = validation_mask(ids)
    parts = [(X[~held_out], y[~held_out], ids[~held_out])]
    used: list[str] = []
    if augmented:
        for view in augmented_views(store, cache):
            view_ids = view.ids("train")
            keep = ~validation_mask(view_ids)
            parts.append((view.features("train")[keep], view.labels("train")[keep], view_ids[keep]))
            used.append(view.fingerprint)
    X_fit, y_fit, fit_ids = (np.concatenate(column) for column in zip(*parts))
    return TrainingRows(X_fit, y_fit, fit_ids, X[held_out], y[held_out], ids[held_out], used)


def fit_head(store: Store, cache: FeatureCache, kind_name: str,
             options: dict[str, str] | None = None, name: str | None = None,
             verbose: int = 0, augmented: bool = False) -> tuple[dict[str, Any], Path]:
    """Fit one head on the cache's training rows (minus the validation rows) and save it.

    With `augmented`, the cached augmented views of the training images are trained on too.
    Returns the sidecar record and its path. Validation and test accuracy are recorded.
    """
    kind = get_head_kind(kind_name)
    name = check_head_name(name or kind_name)
    estimator = kind.create(options)
    if kind.file_format == "keras" and verbose:
        estimator.set_params(verbose=verbose)
    rows = training_rows(store, cache, augmented)
    n_classes = len(cache.class_names)
    started = time.perf_counter()
    if kind.file_format == "keras":
        estimator.fit(rows.X_fit, rows.y_fit, validation_data=(rows.X_val, rows.y_val))
    else:
        estimator.fit(rows.X_fit, rows.y_fit)
    fit_seconds = time.perf_counter() - started
    metrics = {
        "validation": accuracy_figures(rows.y_val, head_proba(estimator, rows.X_val, n_classes)),
        "test": accuracy_figures(cache.labels("test"),
                                 head_proba(estimator, cache.features("test"), n_classes)),
    }
    record = {
        "classes": cache.class_names,
        "fit_seconds": round(fit_seconds, 3),
        "rows": {"train": int(len(rows.y_fit)), "validation": int(len(rows.y_val))},
        "views": rows.views,
        "metrics": metrics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sidecar = save_fitted_head(store, cache, name, kind, estimator, record)
    return record, sidecar


def evaluate_heads(store: Store, cache: FeatureCache, names: list[str] | None = None
                   ) -> list[dict[str, Any]]:
    """Test-split reports for the named heads, or for every head of the cache."""
    if names is None:
        names = [r["name"] for r in list_heads(store, cache)]
    if not names:
        return []
    X_test, y_test = cache.features("test"), cache.labels("test")
    reports = []
    for name in names:
        estimator, record = load_fitted_head(store, cache, name)
        proba = head_proba(estimator, X_test, len(cache.class_names))
        reports.append({"head": name, "kind": record["kind"], "cache": cache.name,
                        **classification_report(y_test, proba, cache.class_names)})
    return reports
