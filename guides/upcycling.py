"""
Title: Sparse upcycling: from a dense ViT to a V-MoE
Author: keras_vmoe team
Date created: 2026/12/03
Last modified: 2026/12/03
Description: Turn a trained dense ViT (ours or keras-hub's) into a V-MoE and keep training it.
Accelerator: GPU
"""

import os

# Pick the backend ("jax", "tensorflow" or "torch") before Keras is imported.
os.environ["KERAS_BACKEND"] = "jax"

import keras
import keras_hub
import numpy as np

from keras_vmoe import cli, data, models, training

# Quick mode (used by the tests) shrinks the model and the training so the
# guide runs in about a minute on a CPU.
QUICK = os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"

keras.utils.set_random_seed(0)

IMAGE_SIZE = 16 if QUICK else 28
STEPS = 20 if QUICK else 300
BATCH_SIZE = 32 if QUICK else 128

"""
## Introduction

Most people who want a Mixture of Experts already have a trained dense
model. *Sparse upcycling* (Komatsuzaki et al., ICLR 2023,
[arXiv 2212.05055](https://arxiv.org/abs/2212.05055)) reuses it: every weight
of the dense ViT is copied into a V-MoE, each expert of an MoE block starts
as that block's dense MLP, and only the routers are new. Training then
continues from there instead of from scratch.

`keras_vmoe.models.upcycle` does this for a dense `VisionMoEBackbone` or
`VisionMoEImageClassifier` of ours, for keras-hub's `ViTBackbone` and
`ViTImageClassifier`, and for presets of either; `keras-vmoe upcycle` does it
from the command line, and `keras-vmoe train` continues training the result.

This guide:

- trains a small dense ViT on the bundled Animal-MNIST data;
- upcycles it and checks what was copied;
- continues training the V-MoE, in Python and with the command line;
- upcycles a keras-hub ViT the same way.
"""

"""
## A dense ViT, trained

The dense model is a `VisionMoEImageClassifier` whose backbone has no router.
We train it briefly with the V-MoE recipe (`compile_with_recipe`).
"""

x_train, y_train = data.load_arrays("animal_mnist", "train", image_size=IMAGE_SIZE)
x_test, y_test = data.load_arrays("animal_mnist", "test", image_size=IMAGE_SIZE)
if QUICK:
    x_train, y_train, x_test, y_test = (
        x_train[:640],
        y_train[:640],
        x_test[:256],
        y_test[:256],
    )

dense = models.VisionMoEImageClassifier(
    models.VisionMoEBackbone(
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
        patch_size=4 if QUICK else 7,
        num_layers=2 if QUICK else 4,
        num_heads=2 if QUICK else 4,
        hidden_dim=32 if QUICK else 64,
        mlp_dim=64 if QUICK else 128,
        group_size=4,
    ),
    num_classes=10,
    loss_type="softmax",
)
training.compile_with_recipe(
    dense, total_steps=STEPS, peak_learning_rate=3e-3, loss="softmax"
)
dense.fit(
    x_train, y_train, batch_size=BATCH_SIZE, epochs=1, steps_per_epoch=STEPS, verbose=0
)
dense_accuracy = dense.evaluate(x_test, y_test, batch_size=64, verbose=0)[1]
print(f"dense test accuracy: {dense_accuracy:.3f}")

"""
## Upcycling

`upcycle` builds the V-MoE: here Expert Choice routing with 4 experts in the
odd blocks (`"every:2"`). Every expert is a copy of its block's MLP, so all
four experts of block 1 hold the same weights; the router is drawn from a
small normal distribution (standard deviation 0.02, `router_init_stddev`),
as the upcycling paper initialises its routers randomly. `expert_noise`
would perturb the expert copies to break their symmetry from the start.
"""

moe = models.upcycle(
    dense,
    router="softmax_expert_choice",
    num_experts=4,
    moe_layers="every:2",
    router_config={"capacity_factor": 1.0},
    seed=0,
)
experts = moe.backbone.get_layer("encoder_block_1").mlp.experts
dense_mlp = dense.backbone.get_layer("encoder_block_1").mlp
kernels = keras.ops.convert_to_numpy(experts.intermediate_kernel)  # (E, d, h)
print("experts:", kernels.shape[0], "kernel of each:", kernels.shape[1:])
print(
    "every expert equals the dense MLP:",
    all(
        np.array_equal(k, keras.ops.convert_to_numpy(dense_mlp.dense_1.kernel))
        for k in kernels
    ),
)
print(
    "head copied:",
    np.array_equal(
        keras.ops.convert_to_numpy(moe.get_layer("head").kernel),
        keras.ops.convert_to_numpy(dense.get_layer("head").kernel),
    ),
)

"""
With one expert and a capacity that keeps every token, the MoE block
computes exactly the dense MLP: the router's softmax over one expert is 1.
That is the check that everything was copied to the right place.
"""

one_expert = models.upcycle(
    dense,
    router="softmax_expert_choice",
    num_experts=1,
    moe_layers="all",
    router_config={"capacity_factor": 1.0},
)
difference = np.max(
    np.abs(
        one_expert.predict(x_test[:64], batch_size=64, verbose=0)
        - dense.predict(x_test[:64], batch_size=64, verbose=0)
    )
)
print(f"one expert, largest logit difference: {difference:.1e}")
print("same outputs as the dense model:", difference < 1e-5)

"""
With several experts the MLP output is weighted by the router's combine
weights (about `1 / E` with a fresh router), so the upcycled model starts
close to the dense one, not at it; a little training recovers the gap.
"""

before = moe.evaluate(x_test, y_test, batch_size=64, verbose=0)[1]
print(f"upcycled, before training: {before:.3f}")

"""
## Continuing training

The upcycled model trains like any V-MoE. Two choices matter when starting
from a checkpoint (`keras_vmoe.training.upcycling`):

- the learning-rate schedule: restart it (warm up again, the default of a
  new `compile_with_recipe`) or continue without a warmup
  (`apply_upcycling_options(model, "continue")` returns `warmup_steps=0`);
- whether to freeze the weights outside the MoE layers
  (`freeze_non_expert_weights`), training only routers, experts and head.
"""

warmup = training.apply_upcycling_options(moe, "continue", freeze_non_experts=True)
print("trainable weights:", len(moe.trainable_weights), "of", len(moe.weights))
training.compile_with_recipe(
    moe, total_steps=STEPS, peak_learning_rate=1e-3, warmup_steps=warmup, loss="softmax"
)
moe.fit(
    x_train, y_train, batch_size=BATCH_SIZE, epochs=1, steps_per_epoch=STEPS, verbose=0
)
after = moe.evaluate(x_test, y_test, batch_size=64, verbose=0)[1]
print(f"upcycled, after {STEPS} steps: {after:.3f}")

"""
## From the command line

`keras-vmoe upcycle` reads a dense preset (a folder written by
`save_to_preset` or `keras-vmoe train`, or a keras-hub ViT preset name) and
writes the upcycled preset; `keras-vmoe train --preset` continues training
it. `keras_vmoe.cli.main` takes the same arguments as the shell command.

```shell
keras-vmoe upcycle --from dense_preset --router softmax_expert_choice \\
    --num-experts 4 --moe-layers every:2 --output upcycled_preset
keras-vmoe train --preset upcycled_preset --dataset animal_mnist \\
    --lr-schedule continue --freeze-non-experts --steps 1000
```
"""

dense.save_to_preset("dense_preset")
status = cli.main(
    ["upcycle", "--from", "dense_preset", "--router", "softmax_expert_choice"]
    + ["--num-experts", "4", "--moe-layers", "every:2", "--output", "upcycled_preset"]
)
print("exit status:", status)
reloaded = models.from_preset("upcycled_preset")
print("router of the preset:", reloaded.backbone.router)
status = cli.main(
    ["train", "--preset", "upcycled_preset", "--dataset", "animal_mnist"]
    + ["--image-size", str(IMAGE_SIZE), "--steps", "4" if QUICK else "200"]
    + ["--batch-size", "16" if QUICK else "128", "--eval-split", "none"]
    + ["--lr-schedule", "continue", "--freeze-non-experts"]
    + ["--output", "upcycled_run", "--verbose", "0"]
)
print("exit status:", status)

"""
## A keras-hub ViT

keras-hub ships ViT presets converted from Google's ViT checkpoints, the
family V-MoE is built on. If you have one downloaded (or network access),
upcycle it by name; the head comes along with a classifier preset:

```python
moe = models.upcycle(
    "vit_base_patch16_224_imagenet",
    router="softmax_expert_choice",
    num_experts=32,
    moe_layers="every:2",
    router_config={"capacity_factor": 2.0},
)
```

Here we build a small keras-hub `ViTBackbone` with random weights instead,
with non-default options: no class token and no biases in attention and
MLP. `upcycle` maps them (no class token: average pooling; missing biases:
zeros, which compute the same function); an option our backbone cannot
express, such as `data_format="channels_first"`, raises an error naming it.
"""

hub = keras_hub.models.ViTBackbone(
    image_shape=(16, 16, 3),
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=32,
    mlp_dim=64,
    use_class_token=False,
    use_mha_bias=False,
    use_mlp_bias=False,
)
hub_moe = models.upcycle(
    hub,
    router="softmax_token_choice",
    num_experts=1,
    moe_layers="all",
    router_config={"num_selected_experts": 1, "capacity_factor": 1.0},
    group_size=2,
)
images = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")
hub_difference = np.max(
    np.abs(
        hub_moe.predict(images, batch_size=4, verbose=0)["sequence_output"]
        - hub.predict(images, batch_size=4, verbose=0)
    )
)
print("keras-hub ViT, pooling of the V-MoE:", hub_moe.pooling)
print(f"keras-hub ViT, one expert, largest difference: {hub_difference:.1e}")
try:
    models.upcycle(
        keras_hub.models.ViTBackbone(
            image_shape=(3, 16, 16),
            patch_size=4,
            num_layers=1,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            data_format="channels_first",
        ),
        router="soft",
        num_experts=4,
    )
except ValueError as error:
    print("channels_first:", str(error)[:60], "...")

"""
## What next

- `benchmarks/upcycling.py` compares, on Animal-MNIST and at equal extra
  compute, continuing the dense ViT with continuing its upcycled V-MoE (the
  README's "Sparse upcycling" section has the numbers).
- Any router works: `router="soft"` gives an upcycled Soft MoE.
"""
