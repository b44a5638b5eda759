"""Augmented views of training images, made with Keras preprocessing layers, reproducibly.

Defaults are the paper's ImageDataGenerator settings: rotation 15°, shifts 0.1, horizontal
flip, zoom 0.2. Each chunk of AUGMENT_CHUNK images gets its own seed derived from the
augmentation seed, the view number and the chunk's position, so a view is the same whatever the
batch size and however often extraction was interrupted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.runtime import load_keras
from store.errors import HeadstartError
from store.fingerprint import canonical_json, digest_text

#: Images augmented together under one seed (fixed: changing it changes every view).
AUGMENT_CHUNK = 256


@dataclass(frozen=True)
class Augmentation:
    """Random flip, rotation, translation, zoom and (optionally) contrast."""

    rotation: float = 15.0  # degrees, either way
    shift: float = 0.1  # fraction of height/width, either way
    zoom: float = 0.2  # fraction, in or out
    flip: bool = True  # horizontal
    contrast: float = 0.0  # 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"rotation": (0.0, 180.0), "shift": (0.0, 0.9), "zoom": (0.0, 0.9),
                  "contrast": (0.0, 1.0)}
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise HeadstartError(f"Augmentation {name} must be between {low} and {high}; got {value}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stored in the fingerprint of every view."""
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        """Short digest of the settings: views with the same key belong together."""
        return digest_text(canonical_json(self.to_dict()))[:12]

    def _layers(self, seed: int) -> Any:
        keras = load_keras()
        layers: list[Any] = []
        if self.flip:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
        if self.rotation:
            layers.append(keras.layers.RandomRotation(self.rotation / 360.0, seed=seed + 1))
        if self.shift:
            layers.append(keras.layers.RandomTranslation(self.shift, self.shift, seed=seed + 2))
        if self.zoom:
            layers.append(keras.layers.RandomZoom(self.zoom, self.zoom, seed=seed + 3))
        if self.contrast:
            layers.append(keras.layers.RandomContrast(self.contrast, seed=seed + 4))
        return keras.Sequential(layers)

    def chunk_seed(self, view: int, split: str, first_row: int) -> int:
        """The seed of the chunk of images starting at `first_row` of a split, for one view."""
        text = f"{self.seed}:{view}:{split}:{first_row}"
        return int(digest_text(text)[:8], 16) % (2**31 - 16)

    def apply(self, images: np.ndarray, view: int, split: str, first_row: int) -> np.ndarray:
        """Augment uint8 images (N×S×S×3) whose first is row `first_row` of the split.

        Returns uint8 images, so a view is decoded pixels like any other image.
        """
        out = np.empty_like(images)
        for start in range(0, len(images), AUGMENT_CHUNK):
            chunk = images[start:start + AUGMENT_CHUNK].astype(np.float32)
            seed = self.chunk_seed(view, split, first_row + start)
            augmented = np.asarray(self._layers(seed)(chunk, training=True))
            out[start:start + AUGMENT_CHUNK] = np.clip(np.rint(augmented), 0, 255).astype(np.uint8)
        return out
