"""The one registry of frozen feature extractors: CNNs from `keras.applications`, and vision
transformers from KerasHub presets (extract/kerashub.py; `--backbone preset:NAME_OR_DIR` for any
other KerasHub image backbone preset).

Each entry carries its own preprocessing, native input size, feature width, pooling choices and
where its weights come from. Nothing here imports Keras (or KerasHub) until a model is actually
built, so listing and cache look-ups stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store.errors import HeadstartError
from store.fingerprint import digest_file
from store.store import expand_path

#: Every pooling: the CNNs' (avg, max, flatten), then the vision transformers' (cls, mean,
#: cls+mean; see extract/kerashub.py). Each backbone accepts its own `poolings`.
CNN_POOLINGS = ("avg", "max", "flatten")
POOLINGS = (*CNN_POOLINGS, "cls", "mean", "cls+mean")

#: Flatten is refused above this many features per image (ResNet50 at 224 would give 100,352).
MAX_FLATTEN_WIDTH = 32_768

#: Seed for `--weights none`, so random-weight caches are reproducible too.
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class Backbone:
    """One model family of keras.applications, used without its top."""

    name: str
    module: str  # submodule of keras.applications with the constructor and preprocess_input
    constructor: str
    native_size: int
    min_size: int
    width: int  # feature width with avg/max pooling at alpha = 1
    alphas: tuple[float, ...] = ()  # width multipliers the family accepts (empty: none)

    def preprocessing(self, image_size: int, interpolation: str = "bilinear",
                      resizer: str = "tensorflow") -> Preprocessing:
        """The preprocessing for this backbone at a given input size."""
        return Preprocessing(
            image_size=image_size,
            preprocess_input=f"keras.applications.{self.module}.preprocess_input",
            interpolation=interpolation,
            resizer=resizer,
        )

    @property
    def poolings(self) -> tuple[str, ...]:
        """The --pooling choices this backbone accepts."""
        return CNN_POOLINGS

    @property
    def default_pooling(self) -> str:
        return "avg"

    @property
    def source(self) -> str:
        """Where the weights come from (as `backbones` lists them)."""
        return "keras.applications ImageNet (downloaded by Keras), or --weights FILE"

    def resolved(self) -> "Backbone":
        """The backbone ready to plan with (a KerasHub preset is downloaded here)."""
        return self

    def weights(self, weights: "Weights") -> "Weights":
        """The weights to plan with (a KerasHub preset's are its own)."""
        return weights

    def check_pooling(self, pooling: str | None) -> None:
        """Refuse a pooling this backbone does not offer (None: its default)."""
        if pooling is not None and pooling not in self.poolings:
            raise HeadstartError(
                f"Backbone {self.name} pools with {', '.join(self.poolings)}; got --pooling "
                f"{pooling}" + (" (a KerasHub vision transformers' pooling)."
                                if pooling in POOLINGS else "."))

    def feature_width(self, alpha: float | None) -> int:
        """Pooled feature width; the MobileNet family scales it with alpha."""
        if self.name == "mobilenet" and alpha:
            return int(self.width * alpha)
        if self.name == "mobilenet_v2" and alpha and alpha > 1.0:
            return int(self.width * alpha)
        return self.width


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


@dataclass(frozen=True)
class Weights:
    """Where a backbone's weights come from: 'imagenet', a local .h5/.keras file, or 'none';
    for a KerasHub preset, 'preset' (its local folder, whose files' digest is the identity)."""

    source: str  # "imagenet" | "file" | "none" | "preset"
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "Weights":
        """Parse the --weights option."""
        lowered = text.strip().lower()
        if lowered == "imagenet":
            return cls("imagenet")
        if lowered in ("none", "random"):
            return cls("none")
        path = expand_path(text)
        if not path.is_file():
            raise HeadstartError(
                f"Weights file {text!r} does not exist; use 'imagenet', 'none' or the path of a "
                "Keras weights file."
            )
        return cls("file", path.resolve())

    def identity(self, backbone: Backbone, alpha: float | None) -> str:
        """What the fingerprint records: the file's digest, or the Keras weights id."""
        if self.source == "preset":
            from extract.kerashub import preset_identity

            assert self.path is not None
            return preset_identity(self.path)
        if self.source == "file":
            assert self.path is not None
            return f"file-sha256:{digest_file(self.path)}"
        if self.source == "none":
            return f"random:seed={RANDOM_WEIGHTS_SEED}"
        return f"keras-imagenet:{backbone.name}:alpha={alpha}"

    def keras_argument(self) -> str | None:
        """The value passed as `weights=` to the keras.applications constructor."""
        if self.source == "file":
            return str(self.path)
        return None if self.source == "none" else "imagenet"


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
