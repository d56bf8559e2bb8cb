"""
Title: Scaling out with expert parallelism
Author: keras_vmoe team
Date created: 2026/11/29
Last modified: 2026/12/03
Description: Shard the experts of a V-MoE across a device mesh with keras.distribution.
Accelerator: GPU
"""

import os

# `keras.distribution` shards on "jax" only. With "tensorflow" use a
# `tf.distribute` strategy, and "torch" runs on one device (see the end).
os.environ["KERAS_BACKEND"] = "jax"
# Simulate 8 devices on a CPU. This must happen before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import math

import keras
import numpy as np

from keras_vmoe import data, distribution, models, training
from keras_vmoe.models import VisionMoEBackbone

# Quick mode (used by the tests) shrinks the model and the data so the guide
# runs in under a minute on a CPU.
QUICK = os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"

keras.utils.set_random_seed(0)

"""
## Introduction

An MoE layer with `E` experts has `E` times the MLP parameters of a dense
block, but each token only visits a few experts. *Expert parallelism* puts
different experts on different devices: each device keeps `E / n` experts
(and their optimizer state), the tokens travel to the devices of their
experts, and the outputs travel back. This is how V-MoE scaled to 15 billion
parameters.

With the JAX backend, `keras.distribution` expresses this in a few lines:

- a `DeviceMesh` arranges the devices along named axes, here a `"batch"`
  axis (data parallelism) and an `"expert"` axis;
- a `LayoutMap` says how each weight is split across the mesh;
  `VisionMoEBackbone.get_layout_map` gives the one of a V-MoE;
- `ModelParallel` applies the layout map to the weights and splits each
  batch along the batch axis. The MoE layers also constrain the tokens they
  dispatch `(E, G, C, d)` to the expert axis, so XLA moves tokens to the
  experts rather than gathering every expert on every device. Routing works
  within each group, so it stays on the group's devices. On a 1-D mesh where
  the batch and the experts share one axis (V-MoE's layout), dispatch and
  combine are each one all-to-all; on the `(batch, expert)` mesh below each
  device already holds the tokens of its batch row, and combine sums the
  experts' outputs along the expert axis.

No accelerator at hand? On a CPU, XLA can pretend to have several devices:
the setup cell asks for 8 before JAX starts. On GPUs or TPUs the flag changes
nothing and the mesh uses the real devices.
"""

"""
## The device mesh

`keras.distribution.list_devices()` lists the accelerators (or the simulated
CPU devices). We lay them out as a 2-D mesh: the expert axis takes up to 4
devices, and the batch axis the rest. The size of the expert axis must
divide the number of experts.
"""

devices = keras.distribution.list_devices()
print(f"{len(devices)} devices:", devices)

NUM_EXPERTS = 8 if QUICK else 16
expert_parallelism = math.gcd(len(devices), 4)
data_parallelism = len(devices) // expert_parallelism
mesh = keras.distribution.DeviceMesh(
    shape=(data_parallelism, expert_parallelism),
    axis_names=("batch", "expert"),
    devices=devices,
)
print("mesh:", dict(zip(mesh.axis_names, mesh.shape)))

"""
## The layout map

`VisionMoEBackbone.get_layout_map(mesh)` (the same as
`keras_vmoe.distribution.get_layout_map`) maps weight paths to layouts.
The stacked expert weights, `intermediate_kernel (E, d, h)` and its friends,
are split on the expert axis along their first dimension; every other
weight of the model is replicated. A layout is a tuple with one mesh axis (or
`None`) per dimension of the weight, and `()` means replicated.
"""

layout_map = VisionMoEBackbone.get_layout_map(
    mesh, data_axis="batch", expert_axis="expert"
)
for path in (
    "encoder_block_1/moe/experts/intermediate_kernel",
    "encoder_block_1/moe/experts/output_bias",
    "encoder_block_1/moe/router/gating_kernel",
    "encoder_block_0/mlp/dense_1/kernel",
    "head/kernel",
):
    print(f"{path:50s} {layout_map[path].axes}")

"""
Keras replicates any weight that no key of a layout map matches, without a
word. That is the classic way to lose expert parallelism: rename a layer and
its experts silently end up on every device. The layout map of keras_vmoe has
an explicit key for every weight of its models, so
`keras_vmoe.distribution.validate_layouts` can raise when a weight matches
no key or is not laid out as intended.

## Building the model under the distribution

`ModelParallel` combines the layout map with data parallelism on the batch
axis. Once it is set, every variable is created with its layout.
"""

dist = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
keras.distribution.set_distribution(dist)

IMAGE_SIZE = 16 if QUICK else 32
if QUICK:
    overrides = dict(num_layers=2, hidden_dim=32, mlp_dim=64, num_heads=2)
    overrides.update(group_size=2)
else:
    overrides = dict(num_layers=6, hidden_dim=256, mlp_dim=1024, num_heads=4)
    overrides.update(group_size=8, moe_layers="every:2")
model = models.from_preset(
    "vmoe_softmax_ec_s32_e32_224",
    preprocessor=None,  # The pipelines' batches are preprocessed already.
    num_classes=len(data.ANIMAL_MNIST_CLASSES),
    image_size=IMAGE_SIZE,
    patch_size=4,
    num_experts=NUM_EXPERTS,
    representation_size=overrides["hidden_dim"],
    **overrides,
)
distribution.validate_layouts(model, layout_map)
print("every weight is laid out as the layout map says")

"""
Let's look at the expert weights. The sharding of a JAX array says how it is
split, and each device holds one *shard*: along the expert dimension, each
device of an expert-axis group of `n` holds `E / n` experts.
"""

for variable in model.weights:
    if "/experts/" in variable.path:
        value = variable.value
        shard = value.addressable_shards[0].data
        print(
            f"{variable.path:50s} {str(value.sharding.spec):28s} "
            f"full {tuple(value.shape)} -> per device {tuple(shard.shape)}"
        )

"""
## Training

Training looks exactly as on one device. `fit()` splits every global batch
along the batch axis. A V-MoE routes groups of `group_size` images, so the
global batch should be a multiple of `mesh["batch"] * group_size`: then no
routing group straddles two devices.
"""

group_size = model.backbone.group_size
batch_size = data_parallelism * group_size * (4 if QUICK else 8)
num_train = 8 * batch_size if QUICK else 8000
print(f"global batch {batch_size}, {batch_size // data_parallelism} per batch shard")

train_ds = data.train_pipeline(
    data.load("animal_mnist", f"train[:{num_train}]"),
    image_size=IMAGE_SIZE,
    batch_size=batch_size,
    channels=3,
    random_crop=False,
    seed=0,
)
test_ds = data.eval_pipeline(
    data.load("animal_mnist", "test"),
    image_size=IMAGE_SIZE,
    batch_size=batch_size,
    crop_fraction=None,
    channels=3,
    drop_remainder=True,  # Every batch holds whole routing groups.
)

epochs = 2 if QUICK else 10
training.compile_with_recipe(
    model, "vmoe", total_steps=epochs * (num_train // batch_size)
)
history = model.fit(
    train_ds,
    epochs=epochs,
    validation_data=test_ds,
    shuffle=False,  # The training pipeline already shuffles.
    verbose=2,
)

"""
The optimizer's moments of an expert weight follow its layout, so the memory
of the experts and of their Adam state is divided by the size of the expert
axis. The layouts hold after training:
"""

distribution.validate_layouts(model, layout_map)
moments = [
    v
    for v in model.optimizer.variables
    if "intermediate_kernel" in v.path and len(v.shape) == 3
]
for variable in moments[:2]:
    print(f"{variable.path:60s} {variable.value.sharding.spec}")

"""
## Sharding does not change the math

The distributed model computes what a single-device copy computes. We build
the same model without a distribution, copy the trained weights (reading
sharded weights gathers them), and compare the predictions. The routers add
no noise at inference, so the routing is the same.
"""

keras.distribution.set_distribution(None)
single_device = models.from_preset(
    "vmoe_softmax_ec_s32_e32_224",
    preprocessor=None,  # The pipelines' batches are preprocessed already.
    num_classes=len(data.ANIMAL_MNIST_CLASSES),
    image_size=IMAGE_SIZE,
    patch_size=4,
    num_experts=NUM_EXPERTS,
    representation_size=overrides["hidden_dim"],
    **overrides,
)
single_device.set_weights(model.get_weights())
batch = next(iter(test_ds))[0].numpy()
keras.distribution.set_distribution(dist)
sharded_logits = model.predict(batch, batch_size=batch_size, verbose=0)
keras.distribution.set_distribution(None)
single_logits = single_device.predict(batch, batch_size=batch_size, verbose=0)
print("largest difference:", np.abs(sharded_logits - single_logits).max())

"""
## Tensor parallelism on a third axis

Large dense blocks can be split too. With a third mesh axis passed as
`model_axis`, the layout map also shards attention on its heads and the
dense MLPs Megatron-style (the first kernel by columns, the second by rows).
Its size must divide the number of heads and the MLP width.
"""

if len(devices) % 8 == 0:
    mesh_3d = keras.distribution.DeviceMesh(
        shape=(len(devices) // 4, 2, 2),
        axis_names=("batch", "expert", "model"),
        devices=devices,
    )
    layout_map_3d = VisionMoEBackbone.get_layout_map(
        mesh_3d, expert_axis="expert", model_axis="model"
    )
    for path in (
        "encoder_block_0/attention/query/kernel",
        "encoder_block_0/attention/attention_output/kernel",
        "encoder_block_0/mlp/dense_1/kernel",
        "encoder_block_0/mlp/dense_2/kernel",
        "encoder_block_1/moe/experts/intermediate_kernel",
    ):
        print(f"{path:52s} {layout_map_3d[path].axes}")

"""
## On real hardware

- **Several accelerators, one host.** The code above runs unchanged: the
  mesh uses the real devices, and the `XLA_FLAGS` line has no effect on them.
- **Several hosts** (TPU pod slices, GPU clusters). Call
  `keras.distribution.initialize()` at the start of the script (on Cloud TPU
  and under SLURM it discovers the hosts), run the same script on every host,
  and build the mesh from `keras.distribution.list_devices()`, which then
  lists every device of every host. Feed `fit()` a `tf.data.Dataset` of
  global batches.
- **Choosing the axes.** The expert axis must divide the number of experts
  (32 for the V-MoE presets: up to 32 devices); the rest of the devices go to
  the batch axis. The V-MoE paper uses a one-dimensional layout in which every
  device holds a slice of the batch *and* a slice of the experts:
  `DeviceMesh((n,), ("expert",), devices)` with
  `get_layout_map(mesh, data_axis="expert")` and
  `ModelParallel(layout_map=layout_map, batch_dim_name="expert")`.
- **TensorFlow** shards nothing with `keras.distribution`; use data
  parallelism with a `tf.distribute.MirroredStrategy` (or a `TPUStrategy`):
  build and compile the model under `strategy.scope()`, and make the batch of
  each replica a multiple of `group_size`.
- **PyTorch** runs the model on one device.
"""

"""
## From the command line: `keras-vmoe train` on every device

`keras-vmoe train` does all of the above itself on the JAX backend. The
same command runs on a laptop, a multi-GPU machine, a GPU cluster and a TPU
pod slice; what changes is how many processes start it and where.

```shell
keras-vmoe train --preset vmoe_softmax_tc_b16_e32_224 --dataset imagenet2012 \
    --batch-size 4096 --epochs 90 --output /shared/runs/b16
```

**The mesh.** The command builds a `(batch, expert)` device mesh over every
device of every process, with the layout map of `get_layout_map` and
`ModelParallel(..., batch_dim_name="batch")`. The expert axis is the
largest size that divides both the number of experts and the devices of one
process (so experts are sharded within a host), the batch axis takes the
rest; the run prints the mesh it chose (`mesh batch=2 x expert=4`).
`--mesh batch=B,expert=E` sets it, `--no-distribution` trains on one
device. Before training, the command refuses a mesh that would replicate
the experts (an MoE model on an expert axis of 1 over several devices), an
expert axis that does not divide the experts, and a `--batch-size` that does
not split into `B` batch shards of whole routing groups; it then checks
every live weight against the layout map (`layout_problems`).

**The router study.** `keras-vmoe study` uses every local device the same
way, in one process: each MoE model trains and is evaluated on the mesh
`keras-vmoe train` would pick for it (`--mesh batch=B,expert=E` to set it,
`--no-distribution` for one device), and the dense ViT, which has no
experts to shard, is data parallel over the same devices (`batch=B*E`; on
an expert axis each device of a batch row would repeat its whole
computation). The study prints the meshes and saves them in
`results.json`; it refuses, naming the model, a mesh that would replicate
the experts and a training or evaluation batch that does not split into
batch shards of whole routing groups. Images per second on a mesh are
those of each model's own mesh.

**One host, several GPUs (or one TPU host).** Nothing changes: run the
command once. With 8 GPUs and 32 experts the mesh is `batch=1 x expert=8`
(each GPU holds 4 experts of every MoE layer and a slice of every
dispatched batch); `--mesh batch=2,expert=4` trades expert parallelism for
data parallelism.

**Several GPU hosts.** Start one process per host, each seeing its own
GPUs, with the address of process 0 and a distinct index:

```shell
# on host i of N (i = 0 .. N-1); HOST0:PORT reachable from every host
keras-vmoe train ... --output /shared/runs/b16 \
    --coordinator HOST0:1234 --num-processes N --process-id i
```

The variables of `keras.distribution.initialize` work too
(`KERAS_DISTRIBUTION_JOB_ADDRESSES`, whose first address is the
coordinator, `KERAS_DISTRIBUTION_NUM_PROCESSES`,
`KERAS_DISTRIBUTION_PROCESS_ID`), and under SLURM or Open MPI
`--coordinator auto` lets JAX discover all three. Process 0 listens on
`PORT` (JAX's coordination service) and on `PORT + 1`, where every other
process claims its `--process-id` before it joins: a second process with
the same id stops at once with a clear error, instead of making JAX abort
the whole cluster. The processes then check that they agree on the run's
arguments; a process that cannot join (a wrong address, a wrong
`--num-processes`) stops with one line after `--distributed-timeout`
seconds (default 120) instead of waiting.

**Who reads what.** The training and evaluation splits are cut into
`--data-shards` contiguous blocks (one per process by default), and every
batch takes an equal block of rows from each. A process reads, decodes and
augments only the records of its own blocks (a TFDS slice such as
`train[640583:1281167]`), which are exactly its rows of every global batch.
The batches depend on the seed and the data shards, not on the devices:
one process with `--data-shards 8` trains on the same batches as eight
hosts, which is how the tests check that a two-process run equals a
one-process one. The loss, the metrics, the validation and the few-shot
features are computed over all processes (the few-shot sets are small and
every process reads them whole; each feature batch is one forward pass on
the mesh), and process 0 alone writes the logs and the trained preset.

**Checkpoints and resuming.** `--output` must be on a file system every
host sees: the backups (`backup/`, for `--resume`) and the best weights
(`checkpoints/best/`) are Orbax checkpoints in which each process writes
the shards it holds, so no host ever gathers the model (only the final
preset is gathered, onto process 0). `--resume` on every host continues a
run after a host was lost, on the device layout that `run.json` records
(one device, or the mesh); `--mesh` moves it to other devices, whose
shards Orbax reads from the same backup.

**A TPU pod slice.** Run the same command on every host of the slice with
`--coordinator auto` (Cloud TPU tells JAX the hosts) and `--output` on a
file system mounted on every host (e.g. NFS or Filestore):

```shell
gcloud compute tpus tpu-vm ssh my-slice --worker=all --command \
  "keras-vmoe train ... --output /mnt/shared/runs/b16 --coordinator auto"
```

**What talks to what.** On a `(batch, expert)` mesh:

- *Batch axis (data parallelism):* each step all-reduces the gradients of
  the replicated weights (attention, embeddings, routers, head) over the
  batch axis, and the gradients of each expert over the devices of its
  expert-axis column; the loss and metrics are all-reduced too. Across
  hosts this crosses the data-center network (NCCL over InfiniBand or
  Ethernet on GPU clusters, the inter-slice network on TPU), once per step.
- *Expert axis (expert parallelism):* each device of a batch row holds the
  row's tokens, so dispatching them to the row's experts needs no
  communication; combining the experts' outputs is one all-reduce (XLA may
  make it a reduce-scatter followed by an all-gather) over the expert axis,
  per MoE layer, forward and backward. Keeping this axis within a host puts
  these per-layer collectives on NVLink or the TPU's ICI links.
- *The 1-D V-MoE layout* of the library (`DeviceMesh((n,), ("expert",))`,
  above) moves tokens with two all-to-alls per MoE layer instead, and is
  available from Python, not from the command.
- On CPUs (tests, the benchmark) the same collectives run through gloo.
"""
