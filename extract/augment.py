"""Augmented views of training images, made with Keras preprocessing layers, reproducibly.

Defaults are the paper's ImageDataGenerator settings: rotation 15°, shifts 0.1, horizontal
flip, zoom 0.2. The rows of a split are cut into fixed chunks of AUGMENT_CHUNK rows; the images of
one chunk are augmented together under a seed derived from the augmentation seed, the view
number and the chunk's index, so a view is the same whatever the batch or segment size and
however often extraction was interrupted (segments of views are whole chunks).
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

    def chunk_seed(self, view: int, split: str, chunk: int) -> int:
        """The seed of chunk `chunk` (rows chunk*AUGMENT_CHUNK onwards) of a split, for one view."""
        text = f"{self.seed}:{view}:{split}:{chunk}"
        return int(digest_text(text)[:8], 16) % (2**31 - 16)

    def apply(self, images: np.ndarray, rows: np.ndarray, view: int, split: str) -> np.ndarray:
        """Augment uint8 images (N×S×S×3) that are rows `rows` (ascending) of a split.

        Returns uint8 images, so a view is decoded pixels like any other image.
        """
        out = np.empty_like(images)
        chunks = np.asarray(rows) // AUGMENT_CHUNK
        for chunk in np.unique(chunks):
            members = np.flatnonzero(chunks == chunk)
            layers = self._layers(self.chunk_seed(view, split, int(chunk)))
            augmented = np.asarray(layers(images[members].astype(np.float32), training=True))
            out[members] = np.clip(np.rint(augmented), 0, 255).astype(np.uint8)
        return out
