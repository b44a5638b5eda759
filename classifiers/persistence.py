"""Saving and loading fitted heads through the store's verified sidecars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np

from classifiers.registry import HeadKind, get_head_kind
from extract.runtime import load_keras
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.heads import load_head_record, save_head
from store.store import Store

#: The kind recorded in an ensemble's sidecar (see classifiers.ensembles).
ENSEMBLE_KIND = "ensemble"


def save_fitted_head(store: Store, cache: FeatureCache, name: str, kind: HeadKind,
                     estimator: Any, record: dict[str, Any]) -> Path:
    """Save a fitted estimator with its sidecar; returns the sidecar path."""
    record = {"kind": kind.name, "options": kind.options_of(estimator), **record}
    if kind.file_format == "keras":
        record["state"] = {
            "classes_": np.asarray(estimator.classes_).tolist(),
            "n_features_in_": int(estimator.n_features_in_),
            "history_": getattr(estimator, "history_", {}),
        }
        return save_head(store, cache, name, record, lambda p: estimator.model_.save(p), ".keras")
    return save_head(store, cache, name, record, lambda p: joblib.dump(estimator, p), ".joblib")


def load_fitted_head(store: Store, cache: FeatureCache, name: str) -> tuple[Any, dict[str, Any]]:
    """Load head `name` of `cache` after checking its fingerprint and file digest."""
    record, path = load_head_record(store, cache, name)
    if record["kind"] == ENSEMBLE_KIND:
        return joblib.load(path), record
    kind = get_head_kind(str(record["kind"]))
    if kind.file_format == "keras":
        keras = load_keras()

        estimator = kind.create({k: _text(v) for k, v in record["options"].items()})
        try:
            estimator.model_ = keras.saving.load_model(path, safe_mode=True)
        except Exception as error:  # keras raises ValueError/TypeError for unsafe or bad files
            raise HeadstartError(f"Cannot load head {name!r} from {path}: {error}") from None
        state = record["state"]
        estimator.classes_ = np.asarray(state["classes_"])
        estimator.n_features_in_ = int(state["n_features_in_"])
        estimator.history_ = state.get("history_", {})
        return estimator, record
    return joblib.load(path), record


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)
