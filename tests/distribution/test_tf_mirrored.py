"""Data parallelism on TensorFlow: `fit()` under a `MirroredStrategy`.

The strategy has 2 virtual CPU devices. TensorFlow fixes its logical
devices when it first initialises them, which the test process has already
done, so the training runs in a fresh subprocess that configures the
devices before anything else. `TPUStrategy` goes through the same Keras
code path (`strategy.run` of the train step), see the README's
"Scaling out".
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies are for the TensorFlow backend (JAX: "
    "keras.distribution, see test_expert_parallel.py; torch: one device)",
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json, os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf

# Before TensorFlow initialises its devices: 1 physical CPU -> 2 logical.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
import keras
import numpy as np

sys.path.insert(0, os.path.join("tests", "models"))
from tiny import tiny_moe
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
keras.utils.set_random_seed(0)
with strategy.scope():
    backbone = VisionMoEBackbone(**tiny_moe("softmax_token_choice"))
    model = VisionMoEImageClassifier(backbone=backbone, num_classes=3)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

# A learnable task: the class is the brightest channel.
n = 16
y = np.arange(n) % 3
x = 0.5 * np.random.RandomState(0).rand(n, 16, 16, 3).astype("float32")
x[np.arange(n), :, :, y] += 0.5
# Global batch 8: 4 images (2 routing groups of 2) per replica.
history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)

moe = backbone.get_layer("encoder_block_1").mlp
experts = moe.experts.intermediate_kernel.value
replicas = [np.asarray(v) for v in experts.values]
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "variable_type": type(experts).__name__,
    "replica_devices": [v.device for v in experts.values],
    "replicas_equal": bool(np.array_equal(replicas[0], replicas[1])),
    "losses": history.history["loss"],
    "statistics": moe.routing_statistics(),
}))
"""


def test_fit_under_mirrored_strategy_with_two_virtual_cpus():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert "Mirrored" in report["variable_type"]
    assert len(set(report["replica_devices"])) == 2
    assert report["replicas_equal"]  # the replicas stayed in sync
    losses = np.array(report["losses"])
    assert np.all(np.isfinite(losses)), losses
    assert np.all(np.diff(losses) < 0), losses
    assert all(np.isfinite(v) for v in report["statistics"].values())
