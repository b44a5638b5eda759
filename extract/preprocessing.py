"""The single definition of how an image becomes a backbone input.

A `Preprocessing` is stored with every cache (as JSON) and rebuilt from it by every later step,
so extraction, fine-tuning and prediction cannot preprocess differently.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from extract.images import RESAMPLING, decode_image_bytes, open_image, resize, to_rgb


@dataclass(frozen=True)
class Preprocessing:
    """Decode → RGB → squash-resize to `image_size` → float32 → `preprocess_input`."""

    image_size: int
    preprocess_input: str  # dotted path, e.g. "keras.applications.mobilenet.preprocess_input"
    interpolation: str = "bilinear"
    resize: str = "squash"
    color: str = "RGB"
    decoder: str = "pillow"

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLING:
            raise ValueError(
                f"Unknown interpolation {self.interpolation!r}; known: {', '.join(RESAMPLING)}."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in a cache."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        """Rebuild from `to_dict`'s output."""
        return cls(**values)

    def load_file(self, path: Path) -> np.ndarray:
        """Decode an image file into a uint8 array of the input size (raises BadImage)."""
        return resize(open_image(path), self.image_size, self.interpolation)

    def load_bytes(self, data: bytes) -> np.ndarray:
        """Decode an in-memory encoded image (e.g. an upload) into a uint8 input array."""
        return resize(decode_image_bytes(data), self.image_size, self.interpolation)

    def load_array(self, pixels: np.ndarray) -> np.ndarray:
        """Turn an in-memory uint8 image (H×W, H×W×1 or H×W×3) into a uint8 input array."""
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        return resize(to_rgb(Image.fromarray(np.ascontiguousarray(pixels))), self.image_size,
                      self.interpolation)

    def function(self) -> Callable[[np.ndarray], np.ndarray]:
        """The backbone's own `preprocess_input` (imports Keras)."""
        module_name, _, attribute = self.preprocess_input.rpartition(".")
        return getattr(importlib.import_module(module_name), attribute)

    def apply(self, batch: np.ndarray) -> np.ndarray:
        """uint8 batch (N×S×S×3) → float32 backbone input."""
        return np.asarray(self.function()(batch.astype(np.float32)), dtype=np.float32)
