"""Run by test_shards: the MirroredStrategy path on two logical CPU devices (no GPU needed)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from extract.distribute import build_distributed  # noqa: E402


def build():
    keras.utils.set_random_seed(1)
    return keras.applications.MobileNet(include_top=False, weights=None, alpha=0.25,
                                        input_shape=(32, 32, 3), pooling="avg")


plain = build()
split = build_distributed(True, build, ["/cpu:0", "/cpu:1"])
batch = np.random.default_rng(0).random((7, 32, 32, 3)).astype("float32")  # odd: uneven parts
expected = np.asarray(plain.predict_on_batch(batch))
got = split.predict_on_batch(batch)
assert got.shape == expected.shape, (got.shape, expected.shape)
print(f"replicas {split.replicas} max-diff {float(np.abs(got - expected).max())}")
