"""Classifying new images: the cache's own backbone and preprocessing, then a fitted head.

A `Predictor` rebuilds exactly what made a cache's features (`Preprocessing.from_dict` of the
cache's stored preprocessing; backbone, alpha, weights, image size and pooling from its
fingerprint inputs) and puts a saved head (any kind `load_fitted_head` can load) on top, so a
cached image gets the same answer from `predict` as from the head on its cached features.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from classifiers.persistence import ENSEMBLE_KIND, load_fitted_head
from classifiers.training import head_proba
from extract.rebuild import cache_feature_model, cache_weights
from extract.images import BadImage, is_image_file
from extract.forwards import cache_runtime, checked_runtime, runtime_forward
from extract.preprocessing import Preprocessing
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.heads import load_head_record
from store.store import Store, expand_path

#: Most files one `predict` call accepts (globs and folders can expand to a lot).
MAX_INPUTS = 1_000_000


class Predictor:
    """Backbone + head with a cache's preprocessing, loaded once and kept warm."""

    def __init__(self, store: Store, cache: FeatureCache, head: str,
                 weights: str | None = None, runtime: str | None = None) -> None:
        self._load_head(store, cache, head)
        self.runtime = checked_runtime(cache.name, cache.inputs, runtime)  # the cache's own
        self.weights = cache_weights(cache, weights)
        self.backbone = cache_feature_model(cache, self.weights)
        self._forward = runtime_forward(self.runtime, self.backbone, self.preprocessing,
                                        store_root=store.root, inputs=cache.inputs)

    def _load_head(self, store: Store, cache: FeatureCache, head: str) -> None:
        """The saved head (or ensemble), and the cache's preprocessing and classes."""
        self.cache = cache
        self.head_name = head
        self.estimator, self.record = load_fitted_head(store, cache, head)
        self.preprocessing = Preprocessing.from_dict(cache.preprocessing)
        self.class_names = list(cache.class_names)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 batch (N×S×S×3, already resized) → float32 feature rows, by the extraction
        pass's own compiled function."""
        return self._forward(pixels).reshape(len(pixels), -1).astype(np.float32)

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 batch → class probabilities over all of the cache's classes (N×C)."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.class_names)))
        return head_proba(self.estimator, self.features(pixels), len(self.class_names))

    def describe(self) -> dict[str, Any]:
        """What answers: head, kind, cache, backbone and input size (plain JSON)."""
        inputs = self.cache.inputs
        return {
            "head": self.head_name,
            "kind": self.record.get("kind"),
            "cache": self.cache.name,
            "fingerprint": self.cache.fingerprint,
            "backbone": inputs["backbone"],
            "alpha": inputs.get("alpha"),
            "image_size": int(inputs["image_size"]),
            "pooling": inputs["pooling"],
            "runtime": self.runtime or cache_runtime(inputs),
            "classes": self.class_names,
            "test_accuracy": self.record.get("metrics", {}).get("test", {}).get("accuracy"),
        }


class EnsemblePredictor(Predictor):
    """A saved ensemble: every member's backbone and head, combined as the ensemble was fitted.

    Members may come from several caches of the dataset (two backbones, two poolings) as long
    as those caches decode images alike (same image size, interpolation and resizer); each cache's
    backbone runs once per batch, whatever the number of its members.
    """

    def __init__(self, store: Store, cache: FeatureCache, head: str,
                 weights: str | None = None, runtime: str | None = None) -> None:
        self._load_head(store, cache, head)
        self.runtime = runtime
        self.members: list[tuple[str, Any]] = []
        self.parts: dict[str, Predictor] = {}
        for member in self.record["members"]:
            owner = store.finished(str(member["cache"]))
            if owner is None:
                raise HeadstartError(
                    f"Member {member['name']} of ensemble {head!r} lost its cache; fit the "
                    "ensemble again.")
            if owner.fingerprint not in self.parts:
                self.parts[owner.fingerprint] = self._part(store, owner, member["name"], weights)
            part = self.parts[owner.fingerprint]
            estimator, current = ((part.estimator, part.record) if part.head_name == member["name"]
                                  else load_fitted_head(store, owner, member["name"]))
            if current.get("sha256") != member.get("sha256"):
                raise HeadstartError(
                    f"Member {member['name']} of ensemble {head!r} was refitted since the "
                    "ensemble was made; run 'python cli.py ensemble' again.")
            self.members.append((owner.fingerprint, estimator))
        self.backbone = self.parts[cache.fingerprint].backbone if cache.fingerprint in self.parts \
            else next(iter(self.parts.values())).backbone

    def _part(self, store: Store, owner: FeatureCache, member: str,
              weights: str | None) -> Predictor:
        other = Preprocessing.from_dict(owner.preprocessing)
        mine = self.preprocessing
        if (other.image_size, other.interpolation, other.resizer) != (
                mine.image_size, mine.interpolation, mine.resizer):
            raise HeadstartError(
                f"Ensemble {self.head_name!r} mixes caches that prepare images differently "
                "(image size, interpolation or resizer); predict and serve need its members' "
                "caches to decode images alike.")
        return Predictor(store, owner, member, weights if owner.fingerprint == self.cache.fingerprint
                         else None, self.runtime)

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 batch → the ensemble's class probabilities (N×C)."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.class_names)))
        features = {fp: part.features(pixels) for fp, part in self.parts.items()}
        n_classes = len(self.class_names)
        blocks = [head_proba(estimator, features[fp], n_classes) for fp, estimator in self.members]
        return np.asarray(self.estimator.predict_proba(np.hstack(blocks)))


def open_predictor(store: Store, cache: FeatureCache, head: str,
                   weights: str | None = None, runtime: str | None = None) -> Predictor:
    """The predictor of a saved head or ensemble (`runtime`: None for the cache's own)."""
    record, _ = load_head_record(store, cache, head)
    kind = EnsemblePredictor if record.get("kind") == ENSEMBLE_KIND else Predictor
    return kind(store, cache, head, weights, runtime)


def top_k(proba: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one probability row, most probable first."""
    order = np.argsort(-proba, kind="stable")[:max(1, k)]
    return [{"label": class_names[i], "probability": float(proba[i])} for i in order]


@dataclass
class Prediction:
    """The answer for one input file: its top-k classes, or why it could not be classified."""

    source: str
    top: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def collect_inputs(specs: Iterable[str]) -> list[Path]:
    """Files, folders (image files below them, sorted) and globs → a list of paths, in order.

    A path or glob that names nothing is an error before any work starts; files that turn out
    not to be images are reported per file later.
    """
    found: list[Path] = []
    for spec in specs:
        path = expand_path(spec)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)))
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found.extend(p for p in matches if p.is_file())
            if not matches:
                raise HeadstartError(f"The pattern {spec!r} matches no files.")
        else:
            raise HeadstartError(f"{spec!r} is not a file, a folder or a glob that matches files.")
        if len(found) > MAX_INPUTS:
            raise HeadstartError(f"More than {MAX_INPUTS:,} input files; predict them in parts.")
    if not found:
        raise HeadstartError("No image files found in the given paths.")
    return found


def predict_files(predictor: Predictor, paths: list[Path], top: int = 3,
                  batch_size: int = 64) -> Iterator[Prediction]:
    """Classify files in batches, yielding one Prediction per file in input order.

    A file that cannot be decoded yields a Prediction with its reason and the rest go on.
    """
    if batch_size < 1:
        raise HeadstartError(f"--batch-size must be at least 1; got {batch_size}.")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        loaded: list[np.ndarray] = []
        answers: list[Prediction] = []
        for path in chunk:
            try:
                loaded.append(predictor.preprocessing.load_file(path))
                answers.append(Prediction(str(path)))
            except BadImage as error:
                answers.append(Prediction(str(path), error=str(error)))
        proba = predictor.proba(np.stack(loaded)) if loaded else np.zeros((0, 0))
        rows = iter(proba)
        for answer in answers:
            if answer.error is None:
                answer.top = top_k(next(rows), predictor.class_names, top)
            yield answer
