"""The one registry of frozen feature extractors: CNNs from `keras.applications`, and vision
transformers from KerasHub presets (extract/kerashub.py; `--backbone preset:NAME_OR_DIR` for any
other KerasHub image backbone preset).

Each entry carries its own preprocessing, native input size, feature width, pooling choices and
where its weights come from. Nothing here imports Keras (or KerasHub) until a model is actually
built, so listing and cache look-ups stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from extract.backbone_types import (CNN_POOLINGS, MAX_FLATTEN_WIDTH, POOLINGS,  # noqa: F401
                                     RANDOM_WEIGHTS_SEED, Backbone, Weights)
from extract.runtime import load_keras
from store.errors import HeadstartError

_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add a backbone to the registry (names are unique)."""
    if backbone.name in _REGISTRY:
        raise ValueError(f"Backbone {backbone.name!r} is registered twice.")
    _REGISTRY[backbone.name] = backbone
    return backbone


for _entry in (
    Backbone("vgg16", "vgg16", "VGG16", 224, 32, 512),
    Backbone("vgg19", "vgg19", "VGG19", 224, 32, 512),
    Backbone("resnet50", "resnet50", "ResNet50", 224, 32, 2048),
    Backbone("resnet101", "resnet", "ResNet101", 224, 32, 2048),
    Backbone("resnet50_v2", "resnet_v2", "ResNet50V2", 224, 32, 2048),
    Backbone("inception_v3", "inception_v3", "InceptionV3", 299, 75, 2048),
    Backbone("xception", "xception", "Xception", 299, 71, 2048),
    Backbone("mobilenet", "mobilenet", "MobileNet", 224, 32, 1024, (0.25, 0.5, 0.75, 1.0)),
    Backbone("mobilenet_v2", "mobilenet_v2", "MobileNetV2", 224, 32, 1280,
             (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
    Backbone("densenet121", "densenet", "DenseNet121", 224, 32, 1024),
    Backbone("efficientnet_b0", "efficientnet", "EfficientNetB0", 224, 32, 1280),
    Backbone("convnext_tiny", "convnext", "ConvNeXtTiny", 224, 32, 768),
    Backbone("efficientnet_v2_b0", "efficientnet_v2", "EfficientNetV2B0", 224, 32, 1280),
    Backbone("efficientnet_v2_s", "efficientnet_v2", "EfficientNetV2S", 384, 32, 1280),
):
    register(_entry)


def _register_kerashub() -> None:
    """Add the named KerasHub presets after the CNNs (once; lazily, since extract.kerashub
    builds on this module)."""
    if "dinov2_small" not in _REGISTRY:
        from extract.kerashub import NAMED_PRESETS

        for entry in NAMED_PRESETS:
            register(entry)


def backbone_names() -> list[str]:
    """Registered backbone names, in registry order."""
    _register_kerashub()
    return list(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name (or `preset:NAME_OR_DIR`, a KerasHub preset); unknown names
    fail with the list of known ones."""
    if name.startswith("preset:"):
        from extract.kerashub import PRESET_PREFIX, preset_backbone

        return preset_backbone(name[len(PRESET_PREFIX):])
    _register_kerashub()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HeadstartError(
            f"Unknown backbone {name!r}; known backbones: {', '.join(_REGISTRY)}, or "
            "preset:NAME_OR_DIR for a KerasHub preset."
        ) from None


def check_options(backbone: Backbone, alpha: float | None, image_size: int, pooling: str) -> None:
    """Refuse option combinations the backbone cannot honour, before any work starts."""
    from extract.kerashub import HubBackbone

    if isinstance(backbone, HubBackbone):
        return backbone.check(alpha, image_size, pooling)
    if pooling not in POOLINGS:
        raise HeadstartError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
    backbone.check_pooling(pooling)
    if alpha is not None and not backbone.alphas:
        raise HeadstartError(f"Backbone {backbone.name} takes no --alpha.")
    if alpha is not None and alpha not in backbone.alphas:
        choices = ", ".join(str(a) for a in backbone.alphas)
        raise HeadstartError(f"Backbone {backbone.name} takes --alpha {choices}; got {alpha}.")
    if image_size < backbone.min_size:
        raise HeadstartError(
            f"Backbone {backbone.name} needs --image-size of at least {backbone.min_size}; "
            f"got {image_size}."
        )
    if image_size > 1024:
        raise HeadstartError(f"--image-size must be at most 1024; got {image_size}.")


def build_feature_model(
    backbone: Backbone, alpha: float | None, weights: Weights, image_size: int, pooling: str
) -> Any:
    """Build the frozen Keras model: preprocessed S×S×3 images in, one feature vector out."""
    from extract.kerashub import HubBackbone, build_hub_feature_model

    if isinstance(backbone, HubBackbone):
        return build_hub_feature_model(backbone, weights, image_size, pooling)
    keras = load_keras()

    check_options(backbone, alpha, image_size, pooling)
    module = importlib.import_module(f"keras.applications.{backbone.module}")
    constructor = getattr(module, backbone.constructor)
    kwargs: dict[str, Any] = {
        "include_top": False,
        "weights": weights.keras_argument(),
        "input_shape": (image_size, image_size, 3),
        "pooling": None if pooling == "flatten" else pooling,
    }
    if alpha is not None:
        kwargs["alpha"] = alpha
    if weights.source == "none":
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
    try:
        base = constructor(**kwargs)
    except (ValueError, OSError, KeyError, TypeError) as error:
        if weights.source == "file":
            raise HeadstartError(
                f"The weights file {weights.path} does not fit backbone {backbone.name}"
                f"{f' (alpha {alpha})' if alpha else ''} ({_first_line(error)}); pass the "
                "weights file made for this backbone and alpha."
            ) from None
        raise HeadstartError(f"Cannot build backbone {backbone.name} ({_first_line(error)}).") from None
    except Exception as error:  # keras wraps download failures in plain Exception
        if weights.source == "imagenet":
            raise HeadstartError(
                f"Could not download the ImageNet weights for {backbone.name} "
                f"({_first_line(error)}); offline, pass a local file with --weights PATH.h5."
            ) from None
        raise
    base.trainable = False
    if pooling != "flatten":
        return base
    flat_width = 1
    for dim in base.output_shape[1:]:
        flat_width *= int(dim)
    if flat_width > MAX_FLATTEN_WIDTH:
        raise HeadstartError(
            f"Flatten pooling of {backbone.name} at {image_size}px gives {flat_width:,} features "
            f"per image (limit {MAX_FLATTEN_WIDTH:,}); use --pooling avg or a smaller --image-size."
        )
    return keras.Sequential([base, keras.layers.Flatten()], name=f"{backbone.name}_flatten")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__
