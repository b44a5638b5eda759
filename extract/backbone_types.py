"""The records of the backbone registry: a backbone's fixed facts (its preprocessing, native
and smallest input size, feature width, poolings) and where its weights come from. The registry
itself is extract/backbones.py; KerasHub's entries (extract/kerashub.py) subclass `Backbone`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extract.hub_support import preset_identity
from extract.preprocessing import Preprocessing
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
                f"{pooling}" + ("." if pooling not in POOLINGS else
                                " (a keras.applications CNN's pooling)." if pooling in CNN_POOLINGS
                                else " (a KerasHub vision transformers' pooling)."))

    def feature_width(self, alpha: float | None) -> int:
        """Pooled feature width; the MobileNet family scales it with alpha."""
        if self.name == "mobilenet" and alpha:
            return int(self.width * alpha)
        if self.name == "mobilenet_v2" and alpha and alpha > 1.0:
            return int(self.width * alpha)
        return self.width


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
