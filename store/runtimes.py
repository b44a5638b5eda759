"""Converted backbones the store keeps: STORE/runtimes/<key>.onnx, one file per key.

The key (see `extract.onnx_runtime.model_key`) digests everything that decides the converted
model: backbone settings, the weights' identity, the preprocessing and the converter versions,
so a file is never reused for a different model and a converter upgrade converts again. Files
are written atomically; one that is missing is simply converted again.
"""

from __future__ import annotations

from pathlib import Path

from store.atomic import atomic_path

RUNTIMES_DIR = "runtimes"


def runtimes_dir(root: Path) -> Path:
    """The folder of converted models in the store at `root`."""
    return Path(root) / RUNTIMES_DIR


def model_path(root: Path, key: str, suffix: str = ".onnx") -> Path:
    """Where the converted model of `key` lives."""
    return runtimes_dir(root) / f"{key}{suffix}"


def write_model(path: Path, data: bytes) -> Path:
    """Write a converted model atomically (complete or absent)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return path
