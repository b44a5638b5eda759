"""How the backbone runs: precision policy, XLA and the multi-GPU strategy."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator

from extract.runtime import load_keras
from store.errors import HeadstartError

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
#: What runs the backbone: TensorFlow (the default) or ONNX Runtime's CPU provider.
RUNTIMES = ("tf", "onnx")


def check_runtime(name: str) -> str:
    """`name` if it is a runtime headstart has, else one sentence listing them."""
    if name not in RUNTIMES:
        raise HeadstartError(f"Unknown --runtime {name!r}; choose one of {', '.join(RUNTIMES)}.")
    return name


@dataclass(frozen=True)
class ComputeOptions:
    """How the backbone runs (the GPU path). The defaults are what the CPU tests and CI use.

    `precision` mixed_* computes in float16/bfloat16 (features come out as float32, then are
    stored in the cache's dtype); it changes the numbers, so it enters the fingerprint when it
    is not float32. `runtime` onnx runs the converted backbone on ONNX Runtime's CPU provider
    (extract.onnx_runtime); its numbers differ in the last bits, so it enters the fingerprint
    when it is not tf. `xla` compiles the forward pass with XLA; `multi_gpu` splits every batch
    across the visible GPUs with `tf.distribute.MirroredStrategy`. Neither changes which cache
    is meant (like running on another device, they change the last bits only).
    """

    precision: str = "float32"
    xla: bool = False
    multi_gpu: bool = False
    devices: tuple[str, ...] | None = None  # default: every visible GPU
    runtime: str = "tf"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise HeadstartError(
                f"Unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        check_runtime(self.runtime)
        if self.runtime != "tf" and (self.precision != "float32" or self.xla or self.multi_gpu):
            raise HeadstartError(
                "--runtime onnx runs the backbone in float32 on the CPU; drop --precision, --xla "
                "and --distribute, or use --runtime tf.")

    def strategy(self) -> Any:
        """The MirroredStrategy over `devices` (every visible GPU), or None for fewer than two."""
        if not self.multi_gpu:
            return None
        return _mirrored_strategy(self.devices)

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Build the model under this precision policy and strategy scope."""
        keras = load_keras()
        previous = keras.mixed_precision.global_policy().name
        strategy = self.strategy()
        try:
            keras.mixed_precision.set_global_policy(self.precision)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)


@functools.lru_cache(maxsize=4)
def _mirrored_strategy(devices: tuple[str, ...] | None) -> Any:
    load_keras()
    import tensorflow as tf

    names = list(devices) if devices else [d.name for d in tf.config.list_logical_devices("GPU")]
    return tf.distribute.MirroredStrategy(names) if len(names) >= 2 else None
