"""
Title: Converting official V-MoE checkpoints
Author: keras_vmoe team
Date created: 2026/12/03
Last modified: 2026/12/03
Description: Convert a google-research/vmoe checkpoint into a Keras preset, classify images, fine-tune it.
Accelerator: None
"""

import os

# Pick the backend ("jax", "tensorflow" or "torch") before Keras is imported.
os.environ["KERAS_BACKEND"] = "jax"

import json
import pathlib

import keras
import numpy as np

import keras_vmoe
from keras_vmoe import cli, convert, data, models, training
from keras_vmoe.convert import released

# Quick mode (used by the tests) fine-tunes on fewer images so the guide runs
# in about a minute on a CPU.
QUICK = os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"

keras.utils.set_random_seed(0)

"""
## Introduction

The V-MoE paper's authors released their models as checkpoints of the
[google-research/vmoe](https://github.com/google-research/vmoe) code base, a
JAX/Flax library: an `.index` file and `.data-NNNNN-of-NNNNN` shards in
`gs://vmoe_checkpoints/`. keras_vmoe reads that format with msgpack and NumPy
alone (no vmoe, Flax or TensorFlow needed) and maps vmoe's model config and
parameters onto a `VisionMoEImageClassifier`, which then computes the same
logits as vmoe, on any Keras backend.

This guide:

- lists the released checkpoints and the command that converts each;
- converts a checkpoint with `keras-vmoe convert` and loads the preset;
- checks the converted model against the logits vmoe itself computed, and
  classifies images;
- fine-tunes the converted model with `fit()` on a small bundled dataset.

The released checkpoints are large (a V-MoE B/16 is about a gigabyte), so the
guide converts a tiny model saved by vmoe's own code, the one keras_vmoe's
tests use; the commands are the same for a released one.
"""

"""
## The released checkpoints

`keras_vmoe.convert.released.RELEASED_CHECKPOINTS` lists every checkpoint of
vmoe's README, with the vmoe model config it was trained with (read from
vmoe's config files), the files to download and the conversion command.
`keras-vmoe presets` lists them too.
"""

for name, record in released.RELEASED_CHECKPOINTS.items():
    status = "convertible" if record.supported else "not supported (E3 ensemble)"
    print(f"{name}: {record.image_size} px, {record.dataset}, {status}")

"""
For a released checkpoint, download its files, then convert it. For the
V-MoE S/32 trained on ILSVRC2012 (300 epochs):
"""

record = released.RELEASED_CHECKPOINTS["vmoe_s32_last2_ilsvrc2012_randaug_light1"]
print(record.download_command)
print(record.convert_command)

"""
The first command needs [gsutil](https://cloud.google.com/storage/docs/gsutil);
the second is this package's command line. `--config` names the released
checkpoint, whose vmoe config keras_vmoe knows; for another vmoe checkpoint,
pass a JSON file holding the `config.model` of its training config.

## A checkpoint to convert

The tiny checkpoint below was written by vmoe's
`vmoe.checkpoints.partitioned.save_checkpoint`, for a V-MoE of 6 blocks (24
wide, 24x24 images in 4x4 patches) with 8 experts in blocks 3 and 5, routed
by Softmax Token Choice with K=2 and batch priority routing. Next to it,
`config.json` is its vmoe model config and `io.npz` holds test images with
the logits vmoe computed for them. The folder is found through the
`KERAS_VMOE_VMOE_FIXTURES` environment variable, or in a source checkout of
keras_vmoe.
"""


def find_fixtures():
    candidates = [os.environ.get("KERAS_VMOE_VMOE_FIXTURES")]
    checkout = pathlib.Path(keras_vmoe.__file__).resolve().parents[1]
    candidates += [
        checkout / "tests" / "fixtures" / "vmoe_reference",
        checkout.parent / "shared" / "fixtures" / "vmoe_reference",
    ]
    for candidate in candidates:
        if candidate and (pathlib.Path(candidate) / "vmoe_tc_k2_bpr").is_dir():
            return pathlib.Path(candidate)
    raise FileNotFoundError(
        "No vmoe reference checkpoints found: set KERAS_VMOE_VMOE_FIXTURES to the "
        "folder holding vmoe_tc_k2_bpr/, or run this guide from a source checkout."
    )


folder = find_fixtures() / "vmoe_tc_k2_bpr"
prefix = str(folder / "ckpt")
print(sorted(p.name for p in folder.glob("ckpt.*")))
with open(folder / "config.json") as f:
    print(json.dumps(json.load(f)["encoder"]["moe"], indent=1))

"""
`read_vmoe_index` reads the index alone: each parameter's shape, dtype and
the shards that hold its chunks. The experts of an MoE block are stacked on
a first axis of size 8.
"""

index = convert.read_vmoe_index(prefix)
print(f"{index.shard_count} shards, {len(index.arrays)} arrays")
for info in index.arrays:
    if "encoderblock_3" in info.path:
        print(f"  {info.path}: {info.shape} in shards {sorted(set(info.shards))}")

"""
## Converting with `keras-vmoe convert`

In a shell:

```shell
keras-vmoe convert --checkpoint PREFIX --config CONFIG.json --output DIR
```

Here we call the same command from Python. It builds the Keras model of the
config, streams the shards into its weights (every parameter must find its
weight, with the same shape, and every weight must be loaded), and writes a
preset folder. The folder is written into a temporary sibling and renamed
into place at the end, so a failed conversion leaves nothing at `DIR`.
"""

output = "converted/vmoe_tc_k2_bpr"
status = cli.main(
    ["convert", "--checkpoint", prefix, "--config", str(folder / "config.json")]
    + ["--output", output]
)
print("exit status:", status)
print(sorted(os.listdir(output)))

"""
The preset's `metadata.json` says where it came from: the checkpoint and its
files, the vmoe config, and the vmoe options that have no effect on the
converted model (initialisers, sharding hints).
"""

with open(os.path.join(output, "metadata.json")) as f:
    metadata = json.load(f)
print(metadata["description"])
print("weights:", metadata["weights"], "| parameters:", metadata["parameter_count"])
print("source files:", metadata["source"]["checkpoint_files"])
print("ignored vmoe options:", metadata["source"]["ignored_vmoe_options"])

"""
## Classifying images

`from_preset` loads the converted model like any preset, with the
preprocessor that `keras-vmoe convert` saved in it: `predict`, `evaluate` and
`fit` resize raw images (0..255) to the model's size and scale them to
[-1, 1], the range vmoe models take. Calling the model directly skips the
preprocessor; the test images in `io.npz` are in [-1, 1] already. The
model must reproduce vmoe's logits to float32 rounding: the routing (which
tokens each expert takes, which ones are dropped when an expert is full) is
the same, and so are the numerics that matter (flax's tanh-approximated
GELU, LayerNorm epsilon 1e-6).
"""

model = models.from_preset(output)
reference = np.load(folder / "io.npz")
images = reference["images"]
logits = keras.ops.convert_to_numpy(model(images, training=False))
print("images:", images.shape)
difference = np.abs(logits - reference["logits"]).max()
print(f"largest difference from vmoe's logits: {difference:.2e}")
print("matches vmoe to 1e-4:", bool(difference < 1e-4))

"""
This model's 7 classes mean nothing (its weights are random), but classifying
works as for a released ImageNet model: softmax over the logits, then the
top classes. The MoE layers route the tokens of `group_size` images together,
so a batch must hold a whole number of groups (here 2 images per group).
"""

probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
for i, row in enumerate(probabilities):
    top = np.argsort(row)[::-1][:3]
    print(f"image {i}: " + ", ".join(f"class {c} ({row[c]:.2f})" for c in top))
print("group size (images):", model.backbone.get_config()["group_size"])

"""
`keras_vmoe.convert.from_vmoe_checkpoint(prefix, config)` does the same in
Python without writing a preset, and `read_vmoe_checkpoint(prefix)` returns
the raw parameter tree as NumPy arrays.
"""

same = convert.from_vmoe_checkpoint(prefix, str(folder / "config.json"))
again = keras.ops.convert_to_numpy(same(images, training=False))
print("same logits as the preset:", bool(np.allclose(again, logits, atol=1e-6)))

"""
## Fine-tuning with `fit()`

A converted preset is a starting point for fine-tuning, as vmoe's own
fine-tuning configs use the released checkpoints. `from_preset` with a new
`num_classes` keeps the converted backbone and gives the classifier a fresh
head, and the preset's preprocessor. The task here is Animal-MNIST (bundled,
10 classes of 28x28 grayscale images): the raw uint8 images, repeated to 3
channels, go to `fit()` as they are; the preprocessor resizes them to the
model's 24x24 input and scales them to [-1, 1] as vmoe expects.

The recipe follows vmoe's fine-tuning configs (e.g.
`vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py`): SGD with
momentum 0.9, a linear warmup then cosine decay, gradient clipping at global
norm 10, softmax cross-entropy. Batches hold a whole number of routing
groups. `bundled_arrays` returns the images in a fixed random permutation,
and `fit()` keeps that order (`shuffle=False`).
"""

num_train, num_test, epochs = (512, 256, 2) if QUICK else (4000, 1000, 4)
x_train, y_train = data.bundled_arrays("animal_mnist", "train")
x_test, y_test = data.bundled_arrays("animal_mnist", "test")
x_train, y_train = np.repeat(x_train[:num_train], 3, axis=-1), y_train[:num_train]
x_test, y_test = np.repeat(x_test[:num_test], 3, axis=-1), y_test[:num_test]
print("raw images:", x_train.shape, x_train.dtype)

finetune = models.from_preset(output, num_classes=10, loss_type="softmax")
print("preprocessor resizes to:", finetune.preprocessor.image_size)
batch_size = 32
steps = epochs * (num_train // batch_size)
schedule = training.warmup_cosine(0.01, steps, warmup_steps=steps // 10)
finetune.compile(
    optimizer=keras.optimizers.SGD(schedule, momentum=0.9, global_clipnorm=10.0)
)
before = finetune.evaluate(
    x_test, y_test, batch_size=batch_size, verbose=0, return_dict=True
)
history = finetune.fit(
    x_train,
    y_train,
    batch_size=batch_size,
    epochs=epochs,
    validation_data=(x_test, y_test),
    shuffle=False,
    verbose=2,
)
after = finetune.evaluate(
    x_test, y_test, batch_size=batch_size, verbose=0, return_dict=True
)
print(f"test accuracy before fine-tuning: {before['accuracy']:.3f}")
print(f"fine-tuned test accuracy: {after['accuracy']:.3f}")

"""
The fine-tuned model saves as a preset like any other, and the converted
weights travel with it. Compiling with the defaults first leaves the SGD
state out of the preset.
"""

finetune.compile()
finetune.save_to_preset("finetuned_animal_mnist")
reloaded = models.from_preset("finetuned_animal_mnist")
check = reloaded.predict(x_test[:4], verbose=0)  # raw images, preprocessed
print("reloaded:", check.shape)

"""
## Next steps

- Convert a released checkpoint (table above, or `keras-vmoe presets`), and
  evaluate it with `keras-vmoe eval --preset converted/NAME --fewshot digits`.
- The conversion reads one shard at a time and copies each parameter into
  its weight once complete; BENCHMARKS.md ("Checkpoint conversion")
  measures its time and memory at B/16 size.
- E3 (Efficient Ensemble of Experts) checkpoints are listed but do not
  convert: keras_vmoe has no ensemble routing.
"""
