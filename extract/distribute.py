"""Several GPUs in one machine: `tf.distribute.MirroredStrategy`, a no-op with one device.

The backbone is built under the strategy's scope (its weights mirrored on every GPU) and each
batch is cut into one contiguous part per replica, run on all of them at once, and put back
together in order, so the features are the same rows in the same order as on one device.

Not tested on several GPUs (none were available while writing it); the suite checks the
splitting on two logical CPU devices, and that the flag changes nothing with one device.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from extract.runtime import load_keras


def mirrored_strategy(enabled: bool, devices: list[str] | None = None) -> Any:
    """A MirroredStrategy over `devices` (default: every visible GPU) when there are two or more;
    otherwise None (one device needs no strategy)."""
    if not enabled:
        return None
    load_keras()
    import tensorflow as tf

    if devices is None:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(devices) < 2:
        return None
    return tf.distribute.MirroredStrategy(devices)


class ReplicaSplitModel:
    """A feature model whose `predict_on_batch` spreads each batch over the strategy's replicas."""

    def __init__(self, model: Any, strategy: Any) -> None:
        import tensorflow as tf

        self.model = model
        self.strategy = strategy
        self.output_shape = model.output_shape
        self._step = tf.function(lambda batch: model(batch, training=False))

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        parts = np.array_split(np.asarray(batch), self.replicas)
        values = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(parts[context.replica_id_in_sync_group]))
        outputs = self.strategy.experimental_local_results(self.strategy.run(self._step,
                                                                             args=(values,)))
        return np.concatenate([np.asarray(o) for o in outputs])


def build_distributed(enabled: bool, build: Callable[[], Any], devices: list[str] | None = None
                      ) -> Any:
    """`build()` under a MirroredStrategy when enabled and there are several GPUs, else plainly."""
    strategy = mirrored_strategy(enabled, devices)
    if strategy is None:
        return build()
    with strategy.scope():
        model = build()
    return ReplicaSplitModel(model, strategy)
