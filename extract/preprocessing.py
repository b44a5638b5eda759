"""The single definition of how an image becomes a backbone input.

A `Preprocessing` is stored with every cache (as JSON) and rebuilt from it by every later step,
so extraction, fine-tuning and prediction cannot preprocess differently.

Two resizers exist. `tensorflow` (the default since format 1.3) resizes inside the backbone's
graph with `tf.image.resize`: the extraction pass hands the graph whole batches of decoded
images at their own size, and the resize runs vectorized on every core beside the forward pass.
`pillow` (caches of format 1.2 and older) resizes each image with Pillow before batching. Either
way the resized image is rounded to uint8, so a resized image is the same array wherever it
was made: one image at a time (`load_file`, uploads) or a batch in the graph.

A KerasHub preset's preprocessing is its image converter (`converter`: the serialised layer,
resizer `keras_hub`): KerasHub's own layer, rebuilt from the stored definition, resizes (in the
graph, like the tensorflow resizer) and rescales, exactly as `converter(images)` does on
decoded uint8 images: its resize of uint8 images is rounded to uint8 too (extract/kerashub.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from extract.images import RESAMPLING, pixels_of_bytes, read_pixels, to_rgb
from extract.images import resize as pillow_resize
from extract.runtime import load_keras, load_tensorflow

RESIZERS = ("tensorflow", "pillow", "keras_hub")
#: tf.image.resize's name for each interpolation.
TF_METHODS = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
              "lanczos": "lanczos3"}
#: Interpolations whose output never leaves the input's range (no clipping needed).
CONVEX_INTERPOLATIONS = ("nearest", "bilinear")
#: Decoded images with more pixels than this are resized at once (one at a time) rather than
#: batched at their own size, so a batch of large photos never holds them all in memory.
MAX_BATCHED_PIXELS = 512 * 512


@dataclass(frozen=True)
class Preprocessing:
    """Decode → RGB → squash-resize to `image_size` (uint8) → float32 → `preprocess_input`."""

    image_size: int
    preprocess_input: str  # dotted path, e.g. "keras.applications.mobilenet.preprocess_input"
    interpolation: str = "bilinear"
    resize: str = "squash"
    color: str = "RGB"
    decoder: str = "pillow"
    resizer: str = "pillow"  # the default of stored definitions written before the field existed
    converter: dict[str, Any] | None = None  # a KerasHub image converter (resizer keras_hub)

    def __post_init__(self) -> None:
        if (self.converter is None) != (self.resizer != "keras_hub"):
            raise ValueError("The keras_hub resizer goes with a KerasHub converter, and only it.")
        if self.interpolation not in RESAMPLING and self.converter is None:
            raise ValueError(
                f"Unknown interpolation {self.interpolation!r}; known: {', '.join(RESAMPLING)}."
            )
        if self.resizer not in RESIZERS:
            raise ValueError(f"Unknown resizer {self.resizer!r}; known: {', '.join(RESIZERS)}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in a cache (a Pillow definition as it was before 1.3)."""
        values = dataclasses.asdict(self)
        if self.resizer == "pillow":
            del values["resizer"]
        if self.converter is None:  # definitions without one stay as they were
            del values["converter"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        """Rebuild from `to_dict`'s output."""
        return cls(**values)

    # --- one image at a time: uint8 S×S×3 ------------------------------------------------------

    def load_file(self, path: Path) -> np.ndarray:
        """Decode an image file into a uint8 array of the input size (raises BadImage)."""
        return self.resize_pixels(self.decode_file(path))

    def load_bytes(self, data: bytes) -> np.ndarray:
        """Decode an in-memory encoded image (e.g. an upload) into a uint8 input array."""
        return self.resize_pixels(self.decode_bytes(data))

    def decode_bytes(self, data: bytes) -> np.ndarray:
        """An in-memory encoded image as the graph takes it (see `decode_file`)."""
        return self._sized(pixels_of_bytes(data))

    def load_array(self, pixels: np.ndarray) -> np.ndarray:
        """Turn an in-memory uint8 image (H×W, H×W×1 or H×W×3) into a uint8 input array."""
        return self.resize_pixels(self.decode_array(pixels))

    # --- decoded, not yet resized: what the extraction pass batches ---------------------------

    def decode_file(self, path: Path) -> np.ndarray:
        """An image file as the graph takes it: uint8 RGB at its own size (already the input
        size for the Pillow resizer or a very large image)."""
        return self._sized(read_pixels(path))

    def decode_array(self, pixels: np.ndarray) -> np.ndarray:
        """An in-memory uint8 image as the graph takes it (see `decode_file`)."""
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        return self._sized(np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))))

    def _sized(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded RGB pixels as the graph takes them (see `decode_file`)."""
        if self.resizer == "pillow":
            return pillow_resize(Image.fromarray(pixels), self.image_size, self.interpolation)
        if pixels.shape[0] * pixels.shape[1] > MAX_BATCHED_PIXELS:
            return self.resize_pixels(pixels)
        return pixels

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded images as one uint8 batch: at their own size when they all share it, else
        each resized to the input size first (the same numbers either way)."""
        if not images:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        if len({image.shape for image in images}) == 1:
            return np.stack(images)
        return np.stack([self.resize_pixels(image) for image in images])

    # --- resizing -----------------------------------------------------------------------------

    def resize_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """One decoded uint8 image (H×W×3) → uint8 S×S×3.

        An image over MAX_BATCHED_PIXELS is first shrunk by a whole factor with Pillow's box
        `reduce` (to no less than twice the input size), so that the float copy the resize
        works on stays small. Such images never reach the batched graph, so every path agrees.
        """
        if self.resizer == "tensorflow" and pixels.shape[0] * pixels.shape[1] > MAX_BATCHED_PIXELS:
            factor = min(pixels.shape[0], pixels.shape[1]) // (2 * self.image_size)
            if factor > 1:
                pixels = np.asarray(Image.fromarray(pixels).reduce(factor))
        return self.resize_batch(pixels[None])[0]

    def resize_batch(self, batch: np.ndarray) -> np.ndarray:
        """A uint8 batch (N×H×W×3) → uint8 N×S×S×3, exactly as the graph resizes it."""
        size = self.image_size
        if batch.shape[1:3] == (size, size) or len(batch) == 0:
            return batch
        if self.resizer == "pillow":
            return np.stack([pillow_resize(Image.fromarray(image), size, self.interpolation)
                             for image in batch])
        tf = load_tensorflow()
        return np.asarray(self.resize_tensor(tf.cast(batch, tf.float32))).astype(np.uint8)

    def resize_tensor(self, images: Any) -> Any:
        """float32 tensor N×H×W×3 (H, W known) → float32 N×S×S×3 holding rounded 0..255 values.

        Antialiased when shrinking (as Pillow and Keras's Resizing(antialias=True) are); when
        enlarging, antialiasing changes nothing and the plain kernel is several times faster.
        """
        size = self.image_size
        height, width = images.shape[1], images.shape[2]
        if (height, width) == (size, size):
            return images
        if self.converter is not None:
            from extract.hub_support import converter_ops

            return converter_ops(self.converter).resize(images)
        shrinking = height is None or width is None or height > size or width > size
        return self._rounded_resize(images, antialias=shrinking)

    def enlarge_tensor(self, images: Any) -> Any:
        """`resize_tensor` for images no larger than the input size, whose height and width
        may be unknown (a graph traced for any such size, as `extract.onnx_runtime` converts):
        the same numbers, as enlarging needs no antialiasing (an image already at the input
        size comes back with the same values, which are whole numbers)."""
        return self._rounded_resize(images, antialias=False)

    def _rounded_resize(self, images: Any, antialias: bool) -> Any:
        tf = load_tensorflow()
        size = self.image_size
        resized = tf.round(tf.image.resize(images, (size, size),
                                           method=TF_METHODS[self.interpolation],
                                           antialias=antialias))
        if self.interpolation in CONVEX_INTERPOLATIONS:  # weights >= 0 summing to 1: in range
            return resized
        return tf.clip_by_value(resized, 0.0, 255.0)

    # --- to backbone inputs ---------------------------------------------------------------------

    def function(self) -> Callable[[Any], Any]:
        """The backbone's own `preprocess_input` (imports Keras); a KerasHub converter's scale
        and offset."""
        load_keras()  # quietly, before the keras.applications module
        if self.converter is not None:
            from extract.hub_support import converter_ops

            return converter_ops(self.converter).rescale
        module_name, _, attribute = self.preprocess_input.rpartition(".")
        return getattr(importlib.import_module(module_name), attribute)

    def graph_inputs(self, images: Any) -> Any:
        """Inside a traced function: a uint8 or float32 batch (N×H×W×3, H and W known) →
        resized, preprocessed float32 backbone inputs."""
        tf = load_tensorflow()
        resized = self.resize_tensor(tf.cast(images, tf.float32))
        return self.function()(resized)

    def apply(self, batch: np.ndarray) -> np.ndarray:
        """uint8 batch (N×S×S×3) → float32 backbone input."""
        return np.asarray(self.function()(batch.astype(np.float32)), dtype=np.float32)
