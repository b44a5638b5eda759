"""Head model files: writing them through the store's sidecars, and reading verified ones.

Keras heads are .keras files loaded with safe_mode=True. scikit-learn heads are skops files:
loading one builds only objects of types headstart trusts (scikit-learn's and headstart's own
classes) and never unpickles, so a crafted file cannot run code. Older .joblib heads (pickle)
still load, but only after their SHA-256 matches the sidecar.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from classifiers.registry import HeadKind, get_head_kind
from extract.runtime import load_keras
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.heads import save_head
from store.store import Store

#: The kind recorded in an ensemble's sidecar (see classifiers.ensembles).
ENSEMBLE_KIND = "ensemble"
#: Types a skops head file may hold beyond skops's own defaults: classes of these packages.
TRUSTED_PACKAGES = ("sklearn.", "classifiers.")


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
    return save_skops_head(store, cache, name, estimator, record)


def save_skops_head(store: Store, cache: FeatureCache, name: str, estimator: Any,
                    record: dict[str, Any]) -> Path:
    """Save a scikit-learn estimator (a head or an ensemble) as a skops file with its sidecar."""
    import skops.io

    return save_head(store, cache, name, record, lambda p: skops.io.dump(estimator, p), ".skops")


def read_estimator(record: dict[str, Any], path: Path) -> Any:
    """The estimator in a head's verified model file (see store.heads.load_head_record)."""
    name = str(record["name"])
    if path.suffix != ".keras":
        return load_sklearn_file(path, name)
    kind = get_head_kind(str(record["kind"]))
    estimator = kind.create({k: _text(v) for k, v in record["options"].items()})
    try:
        estimator.model_ = load_keras().saving.load_model(path, safe_mode=True)
    except Exception as error:  # keras raises ValueError/TypeError for unsafe or bad files
        raise HeadstartError(f"Cannot load head {name!r} from {path}: {error}") from None
    state = record["state"]
    estimator.classes_ = np.asarray(state["classes_"])
    estimator.n_features_in_ = int(state["n_features_in_"])
    estimator.history_ = state.get("history_", {})
    return estimator


def load_sklearn_file(path: Path, name: str) -> Any:
    """A scikit-learn head: a .skops file holding only trusted types, or a verified legacy .joblib."""
    if path.suffix != ".skops":
        return joblib.load(path)  # a legacy pickle; its SHA-256 matched the sidecar
    import skops.io

    try:
        found = skops.io.get_untrusted_types(file=path)
    except Exception as error:  # noqa: BLE001 - skops raises many kinds for a damaged file
        raise HeadstartError(f"Head {name!r}: {path.name} is not a readable skops file "
                             f"({error}).") from None
    refused = [t for t in found if not _trusted_type(t)]
    if refused:
        raise HeadstartError(
            f"Head {name!r} would need types headstart does not trust "
            f"({', '.join(refused[:5])}); refusing to load it.")
    return skops.io.load(path, trusted=found)


def _trusted_type(dotted: str) -> bool:
    """A class (not a function) defined in scikit-learn or in headstart's classifiers."""
    module, _, attribute = dotted.rpartition(".")
    if not module.startswith(TRUSTED_PACKAGES):
        return False
    try:
        value = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return False
    return isinstance(value, type)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)
