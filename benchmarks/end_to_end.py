"""End-to-end training throughput of a small V-MoE per router vs a dense ViT.

Run: `KERAS_BACKEND=jax python -m benchmarks.end_to_end` (any backend).

Model: 32x32x3 images, patch 4 (64 tokens + class token), width 128,
mlp 512, 4 blocks with MoE in blocks 1 and 3 ("every:2"), E=8, groups of
4 images. Equal per-token compute: Token Choice K=1 at factor 1, Expert
Choice at factor 1, Soft MoE with S/E slots per expert (capacities not
rounded); the dense ViT runs the same MLP on every token. Throughput is
measured with `model.fit` over a cached `tf.data` dataset after a
compile/warm-up epoch, the fastest of 7 epochs ("images/s", "ratio to
dense": Keras' fit sometimes stalls about 1.2 s at an epoch boundary here,
whatever the model, which a median over few epochs would pick up), and for
the train step alone with `train_on_batch`, the median of 30 ("step
images/s", "step ratio").
"""

import keras
import numpy as np

from benchmarks.common import interleaved_median_times, markdown_table
from keras_vmoe import routers
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

BATCH, STEPS = 32, 12
TOKENS = 65  # 64 patches + class token
GROUP_IMAGES, E = 4, 8
# One slot per token for every router: C = ceil(S / E) = ceil(260 / 8) = 33
# slots per expert, each router's settings for that budget (None: dense ViT).
BUDGET = routers.ComputeBudget.from_capacity_factor(GROUP_IMAGES * TOKENS, E, 1, 1.0)
ROUTERS = {
    None: {},
    **{
        name: routers.get_class(name).equal_compute_config(BUDGET)
        for name in routers.router_names()
    },
}


def make_model(router):
    config = dict(ROUTERS[router])
    backbone = VisionMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        mlp_dim=512,
        moe_layers="every:2" if router else None,
        router=router,
        router_config=config if router else None,
        num_experts=E if router else None,
        group_size=GROUP_IMAGES,
    )
    model = VisionMoEImageClassifier(backbone, num_classes=10)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def run(repeats=7, step_repeats=30):
    """Images/s per model; all models built first, then timed in turns.

    Two figures per model: `model.fit` over one epoch of a dataset made
    once (what a user sees, input pipeline included), and the train step
    alone (`train_on_batch` on one fixed batch, many turns: less exposed to
    the input pipeline and to bursts of load from elsewhere).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(BATCH * STEPS, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=BATCH * STEPS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
    dataset = dataset.prefetch(2)
    models = {router: make_model(router) for router in ROUTERS}
    epochs, steps = {}, {}
    for router, model in models.items():
        model.fit(dataset, epochs=1, verbose=0)  # compile + warm-up
        epochs[router] = lambda m=model: m.fit(dataset, epochs=1, verbose=0)
        steps[router] = lambda m=model: m.train_on_batch(x[:BATCH], y[:BATCH])
    # Keras' fit sometimes stalls about 1.2 s at an epoch boundary on this
    # machine, whatever the model; the fastest epoch leaves that out.
    fit_times = interleaved_median_times(epochs, repeats, warmup=0, statistic=min)
    step_times = interleaved_median_times(steps, step_repeats, warmup=2)
    return [
        {
            "backend": keras.backend.backend(),
            "model": router or "dense ViT",
            "images/s": len(x) / fit_times[router],
            "ratio to dense": fit_times[None] / fit_times[router],
            "step images/s": BATCH / step_times[router],
            "step ratio": step_times[None] / step_times[router],
        }
        for router in models
    ]


COLUMNS = [
    "backend",
    "model",
    "images/s",
    "ratio to dense",
    "step images/s",
    "step ratio",
]

if __name__ == "__main__":
    print(markdown_table(run(), COLUMNS))
