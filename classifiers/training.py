"""Fitting and evaluating heads on cached features."""

from __future__ import annotations

import time
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


def fit_head(store: Store, cache: FeatureCache, kind_name: str,
             options: dict[str, str] | None = None, name: str | None = None,
             verbose: int = 0) -> tuple[dict[str, Any], Path]:
    """Fit one head on the cache's training rows (minus the validation rows) and save it.

    Returns the sidecar record and its path. Validation and test accuracy are recorded.
    """
    kind = get_head_kind(kind_name)
    name = check_head_name(name or kind_name)
    estimator = kind.create(options)
    if kind.file_format == "keras" and verbose:
        estimator.set_params(verbose=verbose)
    X = cache.features("train")
    y = cache.labels("train")
    held_out = validation_mask(cache.ids("train"))
    fit_rows = ~held_out
    n_classes = len(cache.class_names)
    started = time.perf_counter()
    try:
        if kind.file_format == "keras":
            estimator.fit(X[fit_rows], y[fit_rows], validation_data=(X[held_out], y[held_out]))
        else:
            estimator.fit(X[fit_rows], y[fit_rows])
    except ValueError as error:  # an option value the estimator refuses (parsing passed)
        if not options:
            raise
        given = " ".join(f"-p {key}={value}" for key, value in options.items())
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise HeadstartError(f"Head {kind.name} cannot be fitted with {given} ({reason}).") from None
    fit_seconds = time.perf_counter() - started
    metrics = {
        "test": accuracy_figures(cache.labels("test"),
                                 head_proba(estimator, cache.features("test"), n_classes)),
    }
    if held_out.any():  # a very small training split may hash no row into validation
        metrics["validation"] = accuracy_figures(
            y[held_out], head_proba(estimator, X[held_out], n_classes))
    record = {
        "classes": cache.class_names,
        "fit_seconds": round(fit_seconds, 3),
        "rows": {"train": int(fit_rows.sum()), "validation": int(held_out.sum())},
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
