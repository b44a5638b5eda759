"""Rebuilding, from a finished cache, the dataset and backbone that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from extract.backbones import Backbone, Weights, build_feature_model, get_backbone
from extract.datasets import Dataset, open_dataset
from extract.forward import ViewsForward, views_forward
from extract.multiblock import multiblock_model
from extract.plan import ExtractionPlan
from extract.preprocessing import Preprocessing
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.fingerprint import digest_file


def cache_weights(cache: FeatureCache, override: str | None = None) -> Weights:
    """The backbone weights a cache was extracted with, checked against its fingerprint.

    `override` is a weights file the user names (needed for caches older than format 1.1, or
    when the file has moved); otherwise the path the cache recorded is used.
    """
    identity = str(cache.inputs["weights"])
    if identity.startswith("kerashub-preset-sha256:"):  # the preset folder, checked by digest
        from extract.kerashub import cache_preset_weights

        return cache_preset_weights(cache, override)
    if identity.startswith("random:"):
        return Weights("none")
    if identity.startswith("keras-imagenet:"):
        return Weights("imagenet")
    path_text = override or cache.weights_path
    if not path_text:
        raise HeadstartError(
            f"Cache {cache.name} was extracted from a weights file whose path it does not record; "
            "pass the same file with --weights PATH."
        )
    if not Path(path_text).is_file():
        raise HeadstartError(
            f"Cache {cache.name} was made with the weights file {path_text}, which is gone; pass "
            "the same file with --weights PATH.")
    weights = Weights.parse(path_text)
    if weights.source != "file" or identity != f"file-sha256:{digest_file(weights.path)}":
        raise HeadstartError(
            f"The weights file {path_text} is not the one cache {cache.name} was extracted with "
            f"(its digest differs from {identity[:24]}...); pass the original file with --weights."
        )
    return weights


def cache_backbone(cache: FeatureCache, weights: Weights) -> Backbone:
    """The backbone of a cache; a KerasHub preset is read from its folder (`cache_weights`)."""
    if weights.source == "preset":
        from extract.kerashub import preset_at

        return preset_at(weights.path, cache.inputs["backbone"])
    return get_backbone(cache.inputs["backbone"])


def cache_feature_model(cache: FeatureCache, weights: Weights) -> Any:
    """The frozen Keras feature model of a cache (same backbone, alpha, size and pooling, and
    the same blocks: one output row is one cached row)."""
    inputs = cache.inputs
    model = build_feature_model(cache_backbone(cache, weights), inputs.get("alpha"), weights,
                                cache.image_size, inputs["pooling"])
    if len(cache.blocks) == 1:
        return model
    model, columns = multiblock_model(model, len(cache.blocks), inputs["pooling"])
    if [(c.name, c.start, c.stop) for c in columns] != cache.blocks:
        raise HeadstartError(
            f"The backbone rebuilt for cache {cache.name} has other blocks than the cache records "
            f"({', '.join(c.name for c in columns)}); extract it again with this headstart.")
    return model


def cache_forward(cache: FeatureCache, weights: Weights, tta: bool = True) -> ViewsForward:
    """The cache's forward pass, as extraction ran it: a decoded uint8 batch in, (features,
    features of the mirrored view or None) out, float32. The mirrored view is computed when the
    cache holds one (and `tta`)."""
    return views_forward(cache_feature_model(cache, weights), cache_preprocessing(cache),
                         tta=cache.tta if tta else None)


def cache_preprocessing(cache: FeatureCache) -> Preprocessing:
    """The cache's own preprocessing definition."""
    return Preprocessing.from_dict(cache.preprocessing)


def cache_dataset(cache: FeatureCache, override: str | None = None,
                  check_contents: bool = True) -> Dataset:
    """Reopen the dataset a cache was made from, checked to be unchanged.

    With `check_contents`, every file is hashed and compared with the cache's dataset digest
    (needed before training on it); without, classes and split sizes are compared (enough for
    showing sample images).
    """
    source = cache.source
    spec = override or (source.get("name") if source.get("kind") == "keras" else source.get("path"))
    if not spec:
        raise HeadstartError(f"Cache {cache.name} does not record where its images came from.")
    dataset = open_dataset(str(spec), float(source.get("test_fraction", 0.2)))
    skipped = {s: sum(1 for item in cache.skipped if item["split"] == s) for s in cache.split_sizes}
    changed = dataset.class_names != cache.class_names or any(
        len(dataset.splits[s]) != n + skipped[s] for s, n in cache.split_sizes.items())
    if not changed and check_contents:
        changed = dataset.content_digest() != cache.inputs["dataset"]["digest"]
    if changed:
        raise HeadstartError(
            f"The images of cache {cache.name} ({spec}) have changed since extraction; extract again.")
    return dataset


def cache_plan(cache: FeatureCache, dataset: Dataset, weights: Weights, **changes: Any
               ) -> ExtractionPlan:
    """An extraction plan with the cache's settings (some of them changed)."""
    inputs = cache.inputs
    settings: dict[str, Any] = {
        "dataset": dataset, "backbone": cache_backbone(cache, weights), "weights": weights,
        "image_size": cache.image_size, "pooling": inputs["pooling"],
        "alpha": inputs.get("alpha"), "dtype": inputs["dtype"],
        "interpolation": cache.preprocessing.get("interpolation", "bilinear"),
        "resizer": cache.preprocessing.get("resizer", "pillow"),
        "blocks": int(inputs.get("blocks", 1)), "tta": inputs.get("tta"),
    }
    settings.update(changes)
    return ExtractionPlan(**settings)
