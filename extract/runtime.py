"""Importing Keras (TensorFlow) once, without its start-up chatter on stderr."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from types import ModuleType
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null: C++ logs (TensorFlow's start-up, the TFLite
    converter's, XNNPACK's) go there; Python exceptions still reach the caller."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@functools.lru_cache(maxsize=1)
def load_keras() -> ModuleType:
    """Import Keras and initialise TensorFlow's devices quietly; returns the keras module."""
    with quiet_stderr():
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.get_logger().setLevel("ERROR")  # retracing notices on varying predict sizes
        tf.constant(0.0) + 1.0  # the first op initialises the devices (cuInit's complaint)
    return keras


def load_tensorflow() -> ModuleType:
    """The tensorflow module, imported quietly (through `load_keras`)."""
    load_keras()
    import tensorflow as tf

    return tf
