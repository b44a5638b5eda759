"""What KerasHub backbones need below the registry: importing keras_hub quietly, the digest of
a preset's files (its weights' identity in a fingerprint), and the image converter rebuilt from
a cache's stored preprocessing. It imports neither the registry (extract.backbones) nor the
preprocessing module, which both use it."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from extract.runtime import load_keras, quiet_stderr
from store.errors import HeadstartError
from store.fingerprint import canonical_json, digest_file, digest_text

IDENTITY_PREFIX = "kerashub-preset-sha256:"
CONFIG_FILE = "config.json"
#: The files of a preset that hold its weights (the digest reads them and config.json).
_WEIGHT_SUFFIXES = (".weights.h5", ".weights.json", ".safetensors")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No library chatter: C++ start-up logs, Python warnings, download retries."""
    for name in ("keras_hub", "kagglehub", "huggingface_hub", "absl", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        yield


@functools.lru_cache(maxsize=1)
def load_keras_hub() -> ModuleType:
    """Import keras_hub (after Keras, quietly)."""
    load_keras()
    try:
        with quiet():
            import keras_hub
    except ImportError as error:
        raise HeadstartError(f"KerasHub backbones need the keras-hub package ({error}); "
                             "pip install 'keras-hub>=0.32,<0.33'.") from None
    return keras_hub


# --- identity: the digest of the preset's files ------------------------------------------------

def preset_files(folder: Path) -> list[Path]:
    """The files that decide a preset's numbers: config.json and its weight files."""
    weights = sorted(p for p in Path(folder).iterdir()
                     if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise HeadstartError(f"The preset folder {folder} holds no weights file "
                             "(model.weights.h5); save the preset again with save_to_preset.")
    return [Path(folder) / CONFIG_FILE, *weights]


def preset_digest(folder: Path) -> str:
    """SHA-256 over the names and SHA-256 digests of `preset_files` (remembered per file
    size and modification time, so a large preset is read once per process)."""
    parts = []
    for path in preset_files(folder):
        stat = path.stat()
        parts.append(f"{path.name}:{_file_digest(str(path), stat.st_size, stat.st_mtime_ns)}")
    return digest_text("\n".join(parts))


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return digest_file(Path(path))


def preset_identity(folder: Path) -> str:
    """What the fingerprint records for a preset's weights."""
    return f"{IDENTITY_PREFIX}{preset_digest(folder)}"


# --- the converter, rebuilt from the stored preprocessing --------------------------------------

class ConverterOps:
    """The stored converter, split into its resize and its rescale (KerasHub's own layers)."""

    def __init__(self, converter: dict[str, Any]) -> None:
        keras = load_keras()
        load_keras_hub()  # registers the converter classes
        with quiet():
            self.converter = keras.saving.deserialize_keras_object(copy.deepcopy(converter))
            rescale = copy.deepcopy(converter)
            rescale["config"]["image_size"] = None
            self.rescaler = keras.saving.deserialize_keras_object(rescale)

    def resize(self, images: Any) -> Any:
        """float32 N×H×W×3 holding 0..255 integers → float32 N×S×S×3 holding the converter's
        resize of those images as uint8 (which it rounds to uint8, as headstart does)."""
        import tensorflow as tf

        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)
        resized = tf.cast(self.converter.resizing(pixels), tf.float32)
        # Traced, the layer skips its rounding of integer images; eagerly it rounds (as here).
        return tf.clip_by_value(tf.round(resized), 0.0, 255.0)

    def rescale(self, images: Any) -> Any:
        """Resized float32 images → backbone inputs (the converter's scale and offset)."""
        return self.rescaler(images)


@functools.lru_cache(maxsize=8)
def _converter_ops(key: str) -> ConverterOps:
    return ConverterOps(json.loads(key))


def converter_ops(converter: dict[str, Any]) -> ConverterOps:
    """The converter of a stored preprocessing, built once per process."""
    return _converter_ops(canonical_json(converter))
