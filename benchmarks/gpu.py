"""GPU figures: a B/16 V-MoE training step in bfloat16, per router.

Run on a machine with a CUDA build of JAX: `bash benchmarks/gpu.sh`.
Sized to finish within 5 minutes on one H100/H200: each model compiles
once and runs a few steps. Reports images/s and model FLOP utilisation
(MFU = 3 x forward FLOPs per image x images/s / peak bf16 FLOP/s; the
factor 3 counts the backward pass as twice the forward).
"""

import os
import sys

import keras
import numpy as np

from benchmarks.common import (
    interleaved_median_times,
    machine_description,
    markdown_table,
)
from keras_vmoe import models

PEAK_BF16_FLOPS = float(os.environ.get("PEAK_BF16_FLOPS", 989e12))  # H100/H200 dense
PRESETS = [
    "vit_dense_b16_224",
    "vmoe_softmax_tc_b16_e32_224",
    "vmoe_softmax_ec_b16_e32_224",
    "vmoe_sinkhorn_ec_b16_e32_224",
    "soft_moe_b16_e128_224",
]
BATCH = int(os.environ.get("GPU_BENCH_BATCH", 256))


def run(presets=PRESETS, batch=BATCH, steps=5):
    keras.config.set_dtype_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch * steps, 224, 224, 3)).astype("float32")
    y = rng.integers(0, 1000, size=batch * steps)
    epochs, flops = {}, {}
    for name in presets:
        # x is model input already: time the model, not the preprocessing.
        model = models.from_preset(name, num_classes=1000, preprocessor=None)
        model.compile(
            keras.optimizers.Adam(1e-4),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # compile
        epochs[name] = lambda m=model: m.fit(
            x, y, batch_size=batch, epochs=1, verbose=0
        )
        flops[name] = models.backbone_flops(model.backbone.get_config())
    times = interleaved_median_times(epochs, repeats=3, warmup=0)
    rows = []
    for name, t in times.items():
        rate = len(x) / t
        rows.append(
            {
                "preset": name,
                "images/s": rate,
                "GFLOPs/img (fwd)": flops[name] / 1e9,
                "MFU": 3 * flops[name] * rate / PEAK_BF16_FLOPS,
            }
        )
    return rows


COLUMNS = ["preset", "images/s", "GFLOPs/img (fwd)", "MFU"]

if __name__ == "__main__":
    print(machine_description(), file=sys.stderr)
    print(markdown_table(run(), COLUMNS))
