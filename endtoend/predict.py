"""Classifying new images: each cache's own backbone and preprocessing, then a saved head.

A `Predictor` rebuilds exactly what made the features a saved head reads (`Preprocessing.from_dict`
of the cache's stored preprocessing; backbone, alpha, weights, image size and pooling from its
fingerprint inputs), for every cache it reads (an ensemble's members may come from two
backbones), and hands those features to the head (`SavedHead.feature_proba`), so a cached image
gets the same answer from `predict` as from the head on its cached features.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from classifiers.saved import SavedHead, load_saved_head
from extract.images import BadImage, is_image_file
from extract.onnx_runtime import takes_as_is
from extract.runtimes import checked_runtime, runtime_forward, takes_decoded_images
from extract.preprocessing import Preprocessing
from extract.rebuild import cache_feature_model, cache_weights
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store, expand_path

#: Most files one `predict` call accepts (globs and folders can expand to a lot).
MAX_INPUTS = 1_000_000


class Predictor:
    """Backbones + a saved head with its caches' preprocessing, loaded once and kept warm.

    Every cache the head reads must decode images alike (same image size, interpolation and
    resizer); each cache's backbone runs once per batch, whatever the number of its members.
    """

    def __init__(self, head: SavedHead, weights: str | None = None, runtime: str | None = None,
                 store_root: Path | None = None, views: bool = True) -> None:
        self.head = head
        #: Whether answers average each image with its mirror (a head fitted with test-time
        #: views, unless turned off): one more batched forward pass of the mirrored images.
        self.views = bool(views and head.uses_views)
        self._mirrored: dict[str, Any] = {}
        self.cache = head.home
        self.head_name = head.name
        self.record = head.record
        self.estimator = head.estimator
        self.preprocessing = Preprocessing.from_dict(self.cache.preprocessing)
        self.class_names = list(self.cache.class_names)
        self.backbones: dict[str, Any] = {}
        self._forward: dict[str, Any] = {}
        runtimes = {}
        for cache in head.caches:  # all of them before the first backbone is built
            self._check_decoding(cache)
            runtimes[cache.fingerprint] = checked_runtime(cache.name, cache.inputs, runtime)
        self.runtime = runtimes[self.cache.fingerprint]
        #: Whether images reach the backbones as decoded (small ones not resized first: every
        #: cache's runtime resizes them in its own graph), else resized to the input size.
        self.decoded = all(takes_decoded_images(r, self.preprocessing) for r in runtimes.values())
        for cache in head.caches:
            own = cache_weights(cache, weights if cache.fingerprint == self.cache.fingerprint
                                else None)  # a file the user names is the home cache's
            self.backbones[cache.fingerprint] = cache_feature_model(cache, own)
            for mirror, functions in ((False, self._forward), (True, self._mirrored)):
                if mirror and not self.views:
                    continue
                functions[cache.fingerprint] = runtime_forward(
                    runtimes[cache.fingerprint], self.backbones[cache.fingerprint],
                    Preprocessing.from_dict(cache.preprocessing), store_root=store_root,
                    inputs=cache.inputs, mirror=mirror)
        self.backbone = self.backbones[self.cache.fingerprint]

    def _check_decoding(self, cache: FeatureCache) -> None:
        other, mine = Preprocessing.from_dict(cache.preprocessing), self.preprocessing
        if (other.image_size, other.interpolation, other.resizer) != (
                mine.image_size, mine.interpolation, mine.resizer):
            raise HeadstartError(
                f"Head {self.head_name!r} reads caches that prepare images differently (image "
                "size, interpolation or resizer); predict and serve need its caches to decode "
                "images alike.")

    def load_file(self, path: Path) -> np.ndarray:
        """An image file as `proba` takes it (raises BadImage): as decoded where the backbones
        enlarge it in their own graph, else resized to the input size here."""
        return self._prepared(self.preprocessing.decode_file(path))

    def load_bytes(self, data: bytes) -> np.ndarray:
        """An encoded image (an upload) as `proba` takes it (see `load_file`)."""
        return self._prepared(self.preprocessing.decode_bytes(data))

    def _prepared(self, pixels: np.ndarray) -> np.ndarray:
        """A decoded image left as it is only where the graph takes it so (`takes_as_is`);
        any other is resized in the caller's thread (a request's, not the model's), to the same
        array the graph's path would give."""
        if self.decoded and takes_as_is(self.preprocessing, *pixels.shape[:2]):
            return pixels
        return self.preprocessing.resize_pixels(pixels)

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """`load_file`/`load_bytes` images as one batch (`Preprocessing.stack`: at their own
        size when they share it, as the extraction pass batches them)."""
        return self.preprocessing.stack(images)

    def features(self, pixels: np.ndarray, mirrored: bool = False) -> dict[str, np.ndarray]:
        """uint8 batch (N×H×W×3 of one size, see `load_file`) → float32 feature rows per cache
        fingerprint (of the mirrored images with `mirrored`), by the extraction pass's own
        compiled function."""
        functions = self._mirrored if mirrored else self._forward
        return {fingerprint: forward(pixels).reshape(len(pixels), -1).astype(np.float32)
                for fingerprint, forward in functions.items()}

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 batch → class probabilities over all of the cache's classes (N×C)."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.class_names)))
        mirrored = self.features(pixels, mirrored=True) if self.views else None
        return np.asarray(self.head.feature_proba(self.features(pixels), mirrored))

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
            "runtime": self.runtime,
            "test_time_views": self.views,
            "classes": self.class_names,
            "test_accuracy": self.record.get("metrics", {}).get("test", {}).get("accuracy"),
        }


def open_predictor(store: Store, cache: FeatureCache, head: str,
                   weights: str | None = None, runtime: str | None = None,
                   views: bool = True) -> Predictor:
    """The predictor of saved head (or ensemble) `head` of `cache` (`runtime`: None for the
    caches' own; another one is refused; `views` false: no test-time averaging)."""
    return Predictor(load_saved_head(store, cache, head), weights, runtime, store.root, views)


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
    not to be images are reported per file later. A file named twice (directly, through its
    folder or by a glob) is classified once, where it first appears.
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
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


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
                loaded.append(predictor.load_file(path))
                answers.append(Prediction(str(path)))
            except BadImage as error:
                answers.append(Prediction(str(path), error=str(error)))
        proba = predictor.proba(predictor.stack(loaded)) if loaded else np.zeros((0, 0))
        rows = iter(proba)
        for answer in answers:
            if answer.error is None:
                answer.top = top_k(next(rows), predictor.class_names, top)
            yield answer
