"""Run by test_shards: the MirroredStrategy path on two logical CPU devices (no GPU needed).

Prints one JSON line; test_shards judges the numbers (this script only measures)."""

import json
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

from extract.backbones import Weights, build_feature_model, get_backbone  # noqa: E402
from extract.compute import ComputeOptions  # noqa: E402
from extract.forward import forward_function  # noqa: E402


WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def build():  # the real weights: random ones give features near 1e-17, where rows look alike
    return build_feature_model(get_backbone("mobilenet"), 0.25, Weights.parse(str(WEIGHTS)), 32, "avg")


plain = build()
compute = ComputeOptions(multi_gpu=True, devices=("/cpu:0", "/cpu:1"))
with compute.building():  # built under the strategy's scope, as extraction does
    model = build()
preprocessing = get_backbone("mobilenet").preprocessing(32)
batch = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)  # odd: uneven parts
expected = forward_function(plain, preprocessing)(batch)  # the same graph on one device
got = forward_function(model, preprocessing, compute)(batch)
# how far each row of the distributed pass is from the same row, and from the nearest other row,
# of the one-device pass: a row answered from another image (parts out of order) is nearer another
nearest_other = [float(min(np.abs(got[i] - expected[j]).max() for j in range(len(batch)) if j != i))
                 for i in range(min(len(got), len(batch)))]
print(json.dumps({
    "replicas": compute.strategy().num_replicas_in_sync,
    "shape": list(got.shape), "expected_shape": list(expected.shape),
    "max_diff": float(np.abs(got - expected).max()) if got.shape == expected.shape else None,
    "nearest_other_row": min(nearest_other), "feature_spread": float(np.ptp(expected)),
}))
