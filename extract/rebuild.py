"""Rebuilding, from a finished cache, the dataset and backbone that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from extract.backbones import Weights, build_feature_model, get_backbone
from extract.datasets import Dataset, open_dataset
from extract.pipeline import ExtractionPlan
from extract.preprocessing import Preprocessing
from store.cache import FeatureCache
from store.errors import HeadstartError


def cache_weights(cache: FeatureCache, override: str | None = None) -> Weights:
    """The backbone weights a cache was made with, checked against its recorded identity."""
    recorded = str(cache.inputs["weights"])
    backbone = get_backbone(cache.inputs["backbone"])
    alpha = cache.inputs.get("alpha")
    if override is not None:
        weights = Weights.parse(override)
    elif recorded.startswith("keras-imagenet"):
        weights = Weights("imagenet")
    elif recorded.startswith("random"):
        weights = Weights("none")
    elif cache.weights_file and Path(cache.weights_file).is_file():
        weights = Weights("file", Path(cache.weights_file))
    else:
        raise HeadstartError(
            f"Cache {cache.name} was made with a weights file that is no longer at its recorded "
            f"path ({cache.weights_file or 'not recorded'}); pass it again with --weights PATH.")
    if weights.identity(backbone, alpha) != recorded:
        raise HeadstartError(
            f"Those weights are not the ones cache {cache.name} was made with; pass the same "
            "weights file with --weights PATH.")
    return weights


def cache_feature_model(cache: FeatureCache, weights: Weights) -> Any:
    """The frozen Keras feature model of a cache (same backbone, alpha, size and pooling)."""
    inputs = cache.inputs
    return build_feature_model(get_backbone(inputs["backbone"]), inputs.get("alpha"), weights,
                               int(inputs["image_size"]), inputs["pooling"])


def cache_preprocessing(cache: FeatureCache) -> Preprocessing:
    """The cache's own preprocessing definition."""
    return Preprocessing.from_dict(cache.preprocessing)


def cache_dataset(cache: FeatureCache, override: str | None = None) -> Dataset:
    """The dataset a cache was made from, checked to still have the same contents."""
    source = cache.source
    spec = override or (source.get("path") if source.get("kind") == "folder" else source.get("name"))
    if not spec:
        raise HeadstartError(f"Cache {cache.name} does not record its dataset; pass --dataset.")
    dataset = open_dataset(str(spec), float(source.get("test_fraction", 0.2)))
    if dataset.content_digest() != cache.inputs["dataset"]["digest"]:
        raise HeadstartError(
            f"Dataset {spec} has changed since cache {cache.name} was made; extract it again.")
    return dataset


def cache_plan(cache: FeatureCache, dataset: Dataset, weights: Weights, **changes: Any
               ) -> ExtractionPlan:
    """An extraction plan with the cache's settings (some of them changed)."""
    inputs = cache.inputs
    settings: dict[str, Any] = {
        "dataset": dataset, "backbone": get_backbone(inputs["backbone"]), "weights": weights,
        "image_size": int(inputs["image_size"]), "pooling": inputs["pooling"],
        "alpha": inputs.get("alpha"), "dtype": inputs["dtype"],
        "interpolation": cache.preprocessing.get("interpolation", "bilinear"),
    }
    settings.update(changes)
    return ExtractionPlan(**settings)
