"""The nearest cached training images of an image: of a new image, whose features the cache's
backbone, preprocessing and runtime make, or of an image already in the cache, from its stored
features (no forward pass); both searched among the training rows' (classifiers.similarity).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from classifiers.similarity import SimilaritySpace, top_k
from store.cache import FeatureCache
from store.errors import HeadstartError


class SimilarFinder:
    """The cache's training features (and its backbone and preprocessing, loaded once, run by
    the cache's runtime, unless `features` is given: e.g. a serving predictor's own forward
    pass): the nearest cached training images of new images, or of cached ones by sample id.

    `store_root` locates the converted model of a cache extracted with --runtime onnx.
    """

    def __init__(self, cache: FeatureCache, weights: str | None = None,
                 features: Callable[[np.ndarray], np.ndarray] | None = None,
                 store_root: Path | None = None) -> None:
        from extract.preprocessing import Preprocessing

        if not cache.inputs.get("backbone") or cache.inputs.get("backbone") == "arrays":
            raise HeadstartError(f"Cache {cache.name} was not made by a backbone; there is no "
                                 "forward pass for new images.")
        self.cache = cache
        self.preprocessing = Preprocessing.from_dict(cache.preprocessing)
        if features is None:
            from extract.rebuild import cache_feature_model, cache_weights
            from extract.runtimes import checked_runtime, runtime_forward

            runtime = checked_runtime(cache.name, cache.inputs, None)
            model = cache_feature_model(cache, cache_weights(cache, weights))
            forward = runtime_forward(runtime, model, self.preprocessing, store_root=store_root,
                                      inputs=cache.inputs)

            def features(pixels: np.ndarray) -> np.ndarray:
                return forward(pixels).reshape(len(pixels), -1).astype(np.float32)

        self.features = features

    @cached_property
    def space(self) -> "SimilaritySpace":
        """The training features' search space, built on the first search (not at a server's
        start-up: every training row is read for it)."""
        return SimilaritySpace.of(self.cache.features("train"))

    @cached_property
    def ids(self) -> np.ndarray:
        return self.cache.ids("train")

    @cached_property
    def labels(self) -> np.ndarray:
        return self.cache.labels("train")

    @cached_property
    def _rows(self) -> dict[str, tuple[str, int]]:
        """{sample id: (split, row)} of every split, training ids winning a clash."""
        rows: dict[str, tuple[str, int]] = {}
        for split in sorted(self.cache.split_sizes, key=lambda s: s == "train"):
            ids = self.ids if split == "train" else self.cache.ids(split)
            rows.update((str(sample_id), (split, n)) for n, sample_id in enumerate(ids))
        return rows

    def similar(self, pixels: np.ndarray, k: int = 8) -> list[list[dict[str, Any]]]:
        """uint8 batch (N x H x W x 3 of one size: resized, or as the cache runtime's forward
        pass takes it, see `endtoend.predict.Predictor.load_file`) -> each image's k nearest
        training images."""
        _check_k(k)
        if not len(pixels):
            return []
        found, sims = top_k(self.space.project(self.features(pixels)), self.space.train, k)
        return [self._entries(row, row_s) for row, row_s in zip(found, sims)]

    def similar_to_id(self, sample_id: str, k: int = 8) -> list[dict[str, Any]]:
        """The k nearest training images of the cached image `sample_id` (a training or test
        sample), from its stored features; a training image is left out of its own answer.
        An id the cache does not hold is a HeadstartError."""
        _check_k(k)
        place = self._rows.get(sample_id)
        if place is None:
            raise HeadstartError(f"Cache {self.cache.name} holds no image with the id "
                                f"{sample_id!r}.")
        split, row = place
        if split == "train":
            query, itself = self.space.train[row:row + 1], row
        else:
            query, itself = self.space.project(self.cache.features(split, slice(row, row + 1))), -1
        found, sims = top_k(query, self.space.train, k + 1)  # one more: itself, left out
        keep = found[0] != itself
        return self._entries(found[0][keep][:k], sims[0][keep][:k])

    def _entries(self, rows: np.ndarray, sims: np.ndarray) -> list[dict[str, Any]]:
        names = self.cache.class_names
        return [{"id": str(self.ids[i]), "label": names[self.labels[i]],
                 "similarity": round(float(s), 6)} for i, s in zip(rows, sims)]


def _check_k(k: int) -> None:
    if k < 1:
        raise HeadstartError(f"--k must be at least 1; got {k}.")


def similar_files(cache: FeatureCache, paths: Sequence[Path], k: int = 8,
                  weights: str | None = None, batch_size: int = 64,
                  store_root: Path | None = None) -> list[dict[str, Any]]:
    """For each image file, its k nearest cached training images (or why it could not be read);
    `store_root`: the store holding the cache (where an onnx cache's converted model is)."""
    from extract.images import BadImage

    finder = SimilarFinder(cache, weights, store_root=store_root)
    answers: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        loaded, chunk = [], []
        for path in paths[start:start + batch_size]:
            try:
                loaded.append(finder.preprocessing.load_file(path))
                chunk.append({"file": str(path), "similar": [], "error": None})
            except BadImage as error:
                chunk.append({"file": str(path), "similar": [], "error": str(error)})
        found = iter(finder.similar(np.stack(loaded), k) if loaded else [])
        for answer in chunk:
            if answer["error"] is None:
                answer["similar"] = next(found)
        answers.extend(chunk)
    return answers
