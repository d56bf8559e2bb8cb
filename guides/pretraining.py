"""
Title: Pre-training a V-MoE with fit()
Author: keras_vmoe team
Date created: 2026/11/29
Last modified: 2026/12/03
Description: Train a Vision MoE from a preset with the V-MoE recipe, routing logs and resumable backups.
Accelerator: GPU
"""

import os

# Pick the backend ("jax", "tensorflow" or "torch") before Keras is imported.
os.environ["KERAS_BACKEND"] = "jax"

import csv
import shutil

import keras
import matplotlib.pyplot as plt
import numpy as np

from keras_vmoe import callbacks, data, models, training

# Quick mode (used by the tests) shrinks the data, the model and the number of
# epochs so the guide runs in under a minute on a CPU.
QUICK = os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"

keras.utils.set_random_seed(0)

IMAGE_SIZE = 16 if QUICK else 32
BATCH_SIZE = 32 if QUICK else 128
EPOCHS = 3 if QUICK else 30
TRAIN_EXAMPLES = 256 if QUICK else 8000
TEST_EXAMPLES = 128 if QUICK else 2000
NUM_CLASSES = len(data.ANIMAL_MNIST_CLASSES)

"""
## Introduction

A V-MoE (Riquelme et al. 2021, [arXiv 2106.05974](https://arxiv.org/abs/2106.05974))
is a Vision Transformer whose MLP blocks are partly replaced by Mixture-of-Experts
layers. This guide pre-trains one with plain Keras `fit()`:

- build the model from a preset with `keras_vmoe.models.from_preset`;
- feed it the bundled `animal_mnist` dataset through `keras_vmoe.data`;
- compile it with the V-MoE recipe of `keras_vmoe.training` (Adam with
  decoupled weight decay, linear warmup and decay, sigmoid cross-entropy);
- watch the routers with the `RoutingStatistics` callback;
- survive an interruption with `keras.callbacks.BackupAndRestore`, keep the
  best weights with `ModelCheckpoint`, and save the result as a preset.

By default the guide trains a 6-block model on all 8,000 training images for
30 epochs, a job for a GPU. With `KERAS_VMOE_GUIDE_QUICK=1` it shrinks the
data, the model and the training to run in under a minute on a CPU.
"""

"""
## The data

`animal_mnist` ships with keras_vmoe's environment: 10,000 real 28x28
grayscale animal silhouettes in 10 classes (8,000 for training, 2,000 for
testing). `keras_vmoe.data.load` returns it as a `tf.data.Dataset` (prepared
locally the first time, no download), and `train_pipeline` /
`eval_pipeline` resize the images, repeat the gray channel to RGB, scale the
pixels to [-1, 1] and batch them. These pipelines feed `fit()` on every
backend. Splits take the TFDS slicing syntax, so `"train[:256]"` reads the
first 256 training examples.

The pipelines drop the last partial batch and keep the batch size a multiple
of the group size, so that every routing group holds the same number of images
(a model takes any batch, but routes a partial last group on its own, with
the capacity of its own size).
"""

print("classes:", data.ANIMAL_MNIST_CLASSES)
train_ds = data.train_pipeline(
    data.load("animal_mnist", f"train[:{TRAIN_EXAMPLES}]"),
    image_size=IMAGE_SIZE,
    batch_size=BATCH_SIZE,
    num_classes=NUM_CLASSES,  # One-hot labels for the sigmoid loss.
    channels=3,
    random_crop=False,  # Silhouettes lose their shape under aggressive crops.
    seed=0,
)
test_ds = data.eval_pipeline(
    data.load("animal_mnist", f"test[:{TEST_EXAMPLES}]"),
    image_size=IMAGE_SIZE,
    batch_size=BATCH_SIZE,
    num_classes=NUM_CLASSES,
    crop_fraction=None,  # Resize the whole image, no central crop.
    channels=3,
    drop_remainder=True,
)
images, labels = next(iter(train_ds))
print("batch:", tuple(images.shape), tuple(labels.shape))

fig, axes = plt.subplots(1, 8, figsize=(12, 1.8))
for ax, image, label in zip(axes, images.numpy(), labels.numpy()):
    ax.imshow((image + 1) / 2)
    ax.set_title(data.ANIMAL_MNIST_CLASSES[label.argmax()], fontsize=9)
    ax.axis("off")
fig.savefig("pretraining_batch.png", dpi=80)
plt.show()

"""
## The model

keras_vmoe ships architecture presets for every router of the paper at the
V-MoE sizes (`list_presets()` prints them). A preset holds the configuration
only, so `from_preset` builds a randomly initialised model, and any
constructor argument can be overridden. Here we start from the V-MoE S/32 with
Softmax Token Choice routing and shrink it to fit the small images: a patch
size of 4, fewer and narrower blocks, and fewer experts. The MoE layers route
groups of `group_size` images together.

A preset's classifier carries a preprocessor, as keras-hub tasks do:
`fit`, `evaluate` and `predict` resize raw images and scale them to [-1, 1].
The pipelines above have done that already (keras-hub calls this split
preprocessing), so the model is built without it, `preprocessor=None`; it
gets one back before it is saved as a preset.
"""

for name, meta in models.list_presets().items():
    if name.startswith("vmoe_") and "_s32_" in name:
        print(f"{name:40s} {meta['parameter_count'] / 1e6:6.1f}M parameters")

if QUICK:
    overrides = dict(num_layers=2, hidden_dim=32, mlp_dim=64, num_heads=2)
    overrides.update(num_experts=4, group_size=4)
else:
    overrides = dict(num_layers=6, hidden_dim=192, mlp_dim=768, num_heads=3)
    overrides.update(num_experts=8, group_size=8, moe_layers="every:2")

model = models.from_preset(
    "vmoe_softmax_tc_s32_e32_224",
    preprocessor=None,  # The pipelines' batches are preprocessed already.
    num_classes=NUM_CLASSES,
    image_size=IMAGE_SIZE,
    patch_size=4,
    representation_size=overrides["hidden_dim"],
    **overrides,
)
backbone = model.backbone
print("router:", backbone.router, backbone.router_config)
print("MoE blocks:", backbone.moe_layer_indices)
print("tokens per image:", backbone.sequence_length)
print("parameters:", model.count_params())

"""
## The recipe

The V-MoE recipe (docs/routers.md, "Pre-training recipe") has three parts,
each a Keras object in `keras_vmoe.training`:

- `WarmupLinearDecay`: a linear warmup to the peak learning rate, then a
  linear decay to `1e-5`;
- `DecoupledWeightDecayAdam`: Adam(0.9, 0.999) with global-norm clipping at
  1.0 and decoupled weight decay chosen per variable by a regular expression
  on its path (0.1 on every kernel for V-MoE);
- `SigmoidCrossEntropy`: an independent sigmoid per class, summed over
  classes.

The MoE layers add their routers' auxiliary losses (importance and load
balancing for Softmax Token Choice) with `add_loss`, so `fit()` minimises them
together with the classification loss.
"""

steps_per_epoch = TRAIN_EXAMPLES // BATCH_SIZE
total_steps = EPOCHS * steps_per_epoch
schedule = training.WarmupLinearDecay(
    peak_learning_rate=1e-3,
    total_steps=total_steps,
    warmup_steps=max(1, total_steps // 10),
    end_learning_rate=1e-5,
)
optimizer = training.DecoupledWeightDecayAdam(
    schedule, weight_decay_rules=training.VMOE_WEIGHT_DECAY, global_clipnorm=1.0
)
model.compile(
    optimizer=optimizer,
    loss=training.SigmoidCrossEntropy(),
    metrics=[models.Top1Accuracy()],
)
for variable in model.trainable_variables[:4] + model.trainable_variables[-2:]:
    rate = optimizer.weight_decay_rate_for(variable.path)
    print(f"{variable.path:55s} weight decay {rate}")

steps = np.arange(total_steps + 1)
plt.figure(figsize=(5, 3))
plt.plot(steps, keras.ops.convert_to_numpy(schedule(steps)))
plt.xlabel("step")
plt.ylabel("learning rate")
plt.tight_layout()
plt.savefig("pretraining_schedule.png", dpi=80)
plt.show()

"""
`keras_vmoe.training.compile_with_recipe` does all of the above in one call,
for the V-MoE recipe (`"vmoe"`) or the Soft MoE one (`"soft_moe"`: rsqrt
schedule, decay 3.0 on the head). The warmup defaults to the papers' 10,000
steps, capped at a tenth of the run.
"""

training.compile_with_recipe(model, "vmoe", total_steps=total_steps)
print(type(model.optimizer).__name__, type(model.loss).__name__)

"""
## Training with routing statistics and a backup

Four callbacks go into `fit()`:

- `keras_vmoe.callbacks.RoutingStatistics` writes each MoE layer's routing
  statistics of the last training batch into the epoch logs, as
  `routing/{layer}/{statistic}`: the weighted auxiliary loss, the fraction of
  tokens that reached no expert, the mean number of experts per token, and the
  load imbalance (the busiest expert's share of the slots over the mean
  share).
- `keras.callbacks.BackupAndRestore` saves the weights, the optimizer state
  and the epoch counter at the end of every epoch. When `fit()` starts again
  after an interruption, it resumes from the last backup.
- `keras.callbacks.ModelCheckpoint` keeps the weights with the best validation
  accuracy.
- `keras.callbacks.CSVLogger` appends every epoch's logs to a CSV file.

To show the backup at work, a small callback interrupts the first run halfway,
as a preempted job would stop.
"""

WORK_DIR = "pretraining_run"
shutil.rmtree(WORK_DIR, ignore_errors=True)


class Preempted(Exception):
    """Raised to simulate a job that stops in the middle of training."""


class PreemptAfter(keras.callbacks.Callback):
    """Raises `Preempted` at the end of the given epoch (0-based)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Preempted(f"stopped after epoch {epoch + 1}")


# `RoutingStatistics` comes before the loggers, so that they see its values.
run_callbacks = [
    callbacks.RoutingStatistics(),
    keras.callbacks.BackupAndRestore(os.path.join(WORK_DIR, "backup")),
    keras.callbacks.ModelCheckpoint(
        os.path.join(WORK_DIR, "best.weights.h5"),
        monitor="val_accuracy",
        mode="max",
        save_best_only=True,
        save_weights_only=True,
    ),
    keras.callbacks.CSVLogger(os.path.join(WORK_DIR, "log.csv"), append=True),
]

os.makedirs(WORK_DIR)
try:
    model.fit(
        train_ds,
        validation_data=test_ds,
        epochs=EPOCHS,
        callbacks=run_callbacks + [PreemptAfter(EPOCHS // 2)],
        shuffle=False,  # The training pipeline already shuffles.
        verbose=2,
    )
except Preempted as stop:
    print("The first run was interrupted:", stop)
print("backup files:", sorted(os.listdir(os.path.join(WORK_DIR, "backup"))))

"""
Calling `fit()` again with a `BackupAndRestore` on the same folder restores
the weights and the optimizer state and continues with the next epoch. The
same works across processes: a job restarted with the same script resumes
where the last backup left it. (`keras_vmoe.training.BackupAndRestoreWithRNG`
also restores the random-number state of the router noise and dropout, so
that a resumed run ends with exactly the weights of an uninterrupted one.)

We pass the same callback objects again, so `ModelCheckpoint` remembers the
best accuracy of the first run. A restarted process would create new ones;
give `ModelCheckpoint` the best value so far with `initial_value_threshold`.
`BackupAndRestore` deletes its backup when `fit()` completes.
"""

history = model.fit(
    train_ds,
    validation_data=test_ds,
    epochs=EPOCHS,
    callbacks=run_callbacks,
    shuffle=False,
    verbose=2,
)
print("epochs run after resuming:", len(history.history["loss"]))
print("backup left after the run:", os.path.exists(f"{WORK_DIR}/backup"))

"""
## Reading the routing statistics

`history.history` holds the routing statistics next to the loss and the
accuracy, for the epochs of the last `fit()`; the CSV log holds every epoch of
the run, before and after the interruption. They are the first thing to look
at when an MoE trains badly: a load imbalance that grows, or many dropped
tokens, mean that the router sends most tokens to a few experts.
"""

routing_keys = [key for key in history.history if key.startswith("routing/")]
for key in routing_keys:
    values = ", ".join(f"{v:.3f}" for v in history.history[key])
    print(f"{key:45s} {values}")

with open(os.path.join(WORK_DIR, "log.csv")) as f:
    log = list(csv.DictReader(f))
epochs_run = [int(row["epoch"]) + 1 for row in log]


def column(name):
    """One column of the CSV log as floats."""
    return [float(row[name]) for row in log]


fig, axes = plt.subplots(1, 3, figsize=(13, 3))
axes[0].plot(epochs_run, column("loss"), marker="o", label="train")
axes[0].plot(epochs_run, column("val_loss"), marker="o", label="validation")
axes[0].set_title("loss")
axes[0].legend()
for ax, statistic in zip(axes[1:], ("load_imbalance", "experts_per_token")):
    for key in routing_keys:
        if key.endswith("/" + statistic):
            layer = key[len("routing/") : -len(statistic) - 1]
            ax.plot(epochs_run, column(key), marker="o", label=layer)
    ax.set_title(statistic)
    ax.legend()
for ax in axes:
    ax.set_xlabel("epoch")
fig.tight_layout()
fig.savefig("pretraining_curves.png", dpi=80)
plt.show()

"""
The statistics of an MoE layer can also be read directly: the MoE layer of
block `i` is `backbone.get_layer(f"encoder_block_{i}").mlp`. By default only
training calls update them; `tracking_statistics(model)` makes every call
inside the block update them, here `evaluate`. In evaluation the routers use
their evaluation capacity (the recipe of the
papers trains at capacity factor 1.05 and evaluates at a larger one to drop
fewer tokens; set `eval_capacity_factor` in `router_config`).
"""

with callbacks.tracking_statistics(model):
    model.evaluate(test_ds, verbose=0)
for index in backbone.moe_layer_indices:
    moe = backbone.get_layer(f"encoder_block_{index}").mlp  # The MoE layer.
    print(moe.path, moe.routing_statistics())

"""
## The best checkpoint, and a preset of the trained model

`ModelCheckpoint` wrote the weights of the epoch with the best validation
accuracy. `save_to_preset` writes the trained model as a keras-hub preset
folder (configuration, weights and preprocessor), which `from_preset` loads
back like a built-in preset. With its preprocessor back on, the model takes
raw images: here the uint8 28x28 grayscale test images, repeated to RGB,
which it resizes and scales itself.
"""

model.load_weights(os.path.join(WORK_DIR, "best.weights.h5"))
loss, accuracy = model.evaluate(test_ds, verbose=0)[:2]
print(f"best checkpoint: validation accuracy {accuracy:.3f}")

preset_dir = os.path.join(WORK_DIR, "preset")
model.preprocessor = models.VisionMoEImageClassifierPreprocessor.for_backbone(backbone)
model.save_to_preset(preset_dir)
print("preset files:", sorted(os.listdir(preset_dir)))
# `compile=False` skips the default compile: we compile with the recipe's loss.
restored = models.from_preset(preset_dir, compile=False)
restored.compile(loss=training.SigmoidCrossEntropy(), metrics=[models.Top1Accuracy()])
raw_images, raw_labels = data.bundled_arrays("animal_mnist", "test")
raw_images = np.repeat(raw_images[:TEST_EXAMPLES], 3, axis=-1)  # gray to RGB
raw_labels = np.eye(NUM_CLASSES, dtype="float32")[raw_labels[:TEST_EXAMPLES]]
print("raw test images:", raw_images.shape, raw_images.dtype)
restored_accuracy = restored.evaluate(
    raw_images, raw_labels, batch_size=BATCH_SIZE, verbose=0
)[1]
print(f"restored accuracy on raw images: {restored_accuracy:.3f}")

"""
## Next steps

- Swap the router: `from_preset("vmoe_softmax_ec_s32_e32_224", ...)` or
  `router="soft"` as an override; all six routers train with the same code.
- The `keras-vmoe train` command runs this recipe from the command line,
  with few-shot evaluation, a backup and a preset at the end.
- The `fewshot` guide measures how well the pre-trained features transfer,
  the metric of the router study.
"""
