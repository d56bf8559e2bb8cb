"""
Title: Comparing routers: the router study
Author: keras_vmoe team
Date created: 2026/11/29
Last modified: 2026/12/03
Description: Run the paper's router comparison with keras-vmoe study, read its results, and scale it up.
Accelerator: GPU
"""

import os

# Pick the backend ("jax", "tensorflow" or "torch") before Keras is imported.
os.environ["KERAS_BACKEND"] = "jax"

import csv
import json
import tempfile

import matplotlib.pyplot as plt

from keras_vmoe import cli, data, models, study

# Quick mode (used by the tests) runs a smoke-test study with a tiny model, a
# few hundred images and one epoch, and compares four of the seven models.
QUICK = os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"

"""
## Introduction

*Routers in Vision Mixture of Experts: An Empirical Study* (Liu, Blondel,
Riquelme, Puigcerver; TMLR 2024, [arXiv 2401.15969](https://arxiv.org/abs/2401.15969))
trains the same Vision Transformer with each of six routers, at equal compute,
and compares them on upstream accuracy and few-shot transfer. Its findings:
Expert Choice routers beat Token Choice routers, the allocation algorithm
matters more than how the token-expert affinity is parameterised, and Soft
MoE is the strongest of all.

The `keras-vmoe study` command runs the same experiment in miniature and fully
offline: it pre-trains a small ViT-MoE on the bundled `animal_mnist`
silhouettes with each router (and a dense ViT of equal compute), then reports
test accuracy, few-shot transfer to the bundled `digits`, throughput, FLOPs,
dropped tokens and load imbalance, with plots. This guide runs it, reads its
outputs, and shows how to take the comparison to real datasets on an
accelerator.
"""

"""
## Equal compute

A fair comparison gives every model the same FLOPs per image.
`keras_vmoe.study.equal_compute` works out the router settings from the
study configuration: the sparse routers (groups of 4 images) fill the same
expert slots, Token Choice with `K = 2` at capacity factor `c` and Expert
Choice at factor `K * c`, without rounding capacities up to a multiple of 4.
The experts have `mlp_dim / K` hidden units, so the dense ViT's MLP costs
the same per token. Soft MoE routes one image per group, and its slots per
expert are the count whose FLOPs per image the cost model puts closest to
the sparse routers' (within 3%): a Soft MoE slot also mixes all `S` tokens
of its group, `3*S*d` extra multiply-accumulates against the expert's
`2*d*h`.
"""

config = study.QUICK if QUICK else study.DEFAULT
print(study.describe_equal_compute(config))
plan = study.equal_compute(config)
for name, router_config in plan["router_configs"].items():
    print(f"  {name:36s} {router_config}")

"""
## Running the study

From a shell, the study is one command. `--quick` is a smoke test that takes a
minute or two on a CPU; the default study trains the dense ViT, Softmax
Token and Expert Choice and Soft MoE with 4 seeds of 3 epochs each, sized
for `make demo`'s 10-minute budget on 2 CPU cores; `--scale gpu` is a
larger study for one GPU:

```shell
keras-vmoe study --output study_output            # 4 models, 4 seeds, 3 epochs
keras-vmoe study --routers all --seeds 6          # all seven models
keras-vmoe study --scale gpu                      # larger ViT-MoE, on a GPU
keras-vmoe study --scale gpu --dataset imagenet2012 --image-size 64 --train-size 100000
keras-vmoe study --quick --output /tmp/study      # a smoke test
```

`--epochs`, `--batch-size`, `--seeds` and `--routers` override the
configuration; `--dataset` takes a TFDS dataset prepared on disk or an image
folder. From Python,
`keras_vmoe.cli.main` takes the same arguments (and returns the exit status).
Here we write the outputs into a temporary folder.
"""

output_dir = tempfile.mkdtemp(prefix="router_study_")
if QUICK:
    arguments = ["study", "--quick", "--output", output_dir]
    arguments += ["--routers", "dense,softmax_token_choice,softmax_expert_choice,soft"]
else:
    arguments = ["study", "--output", output_dir, "--seeds", "2"]
status = cli.main(arguments)
print("exit status:", status)

"""
## The outputs

The output folder holds the numbers and the pictures:

- `results.json`: the settings (with the equal-compute statement), a summary
  per model (mean and standard deviation over seeds of every metric), the
  paired differences of every model against the dense ViT and Softmax Token
  Choice with their 95% intervals, the verdict, and every run (per seed);
- `results.csv` (one row per run), `summary.csv` (one row per model) and
  `differences.csv` (one row per comparison);
- `accuracy.png`, `differences.png` (with more than one seed),
  `training_curves.png` and `routing.png`.
"""

print(sorted(f for f in os.listdir(output_dir) if not f.startswith(".")))
with open(os.path.join(output_dir, "results.json")) as f:
    results = json.load(f)
print("sections:", list(results))
print("metrics per model:", [k for k in results["summary"]["dense"] if k != "seeds"])

"""
The summary maps each model to `{metric: {"mean": ..., "std": ...}}`. Let's
print the main columns: upstream test accuracy, 10-shot transfer accuracy,
the fraction of tokens that reached no expert, and the load imbalance (the
busiest expert's share of the slots over the mean share; 1 is perfect).
"""


def mean(entry, metric):
    """The mean of a summary metric, or None when it does not apply."""
    value = entry.get(metric)
    return None if value is None else value["mean"]


def cell(value, fmt):
    """Formats a number, or a dash for a missing one."""
    return "-" if value is None else format(value, fmt)


header = f"{'model':36s} {'test acc':>8} {'10-shot':>8} {'dropped':>8} {'imbal.':>7}"
print(header)
for name, entry in results["summary"].items():
    print(
        f"{name:36s} {cell(mean(entry, 'test_accuracy'), '.3f'):>8} "
        f"{cell(mean(entry, 'fewshot_10shot'), '.3f'):>8} "
        f"{cell(mean(entry, 'fraction_tokens_dropped'), '.3f'):>8} "
        f"{cell(mean(entry, 'load_imbalance'), '.2f'):>7}"
    )

"""
The CSV files hold the same numbers for a spreadsheet or pandas:
"""

with open(os.path.join(output_dir, "summary.csv")) as f:
    rows = list(csv.DictReader(f))
print(f"{len(rows)} rows; columns: {', '.join(list(rows[0])[:6])}, ...")

"""
## The plots

`accuracy.png` compares test and 10-shot accuracy (with the spread over
seeds), `training_curves.png` the training loss of each model, and
`routing.png` shows, for a few test images, which expert each patch goes to
in the last MoE layer of each router.
"""

for picture in ("accuracy.png", "training_curves.png", "routing.png"):
    image = plt.imread(os.path.join(output_dir, picture))
    height, width = image.shape[:2]
    plt.figure(figsize=(width / 100, height / 100))
    plt.imshow(image)
    plt.axis("off")
    plt.show()

"""
## Reading the results

- **Intervals first.** With small models and short runs, two seeds of the
  same router can differ by more than two routers do. The study pairs the
  models by seed and prints each router's difference against the dense ViT
  and Softmax Token Choice with a 95% interval; its verdict states a ranking
  only where those intervals separate, and none when the MoE models do not
  beat the dense ViT. The quick study trains for one epoch on a few hundred
  images with one seed: it checks that everything runs, and its numbers
  mean nothing.
- **Dropped tokens and imbalance explain Token Choice.** Softmax Token
  Choice drops tokens whose chosen experts are full and balances its experts
  only through auxiliary losses. Sinkhorn Token Choice balances the
  assignment before choosing. Expert Choice routers are balanced by
  construction (imbalance 1) but may skip tokens that no expert picks.
- **Throughput is not FLOPs.** All routers cost nearly the same FLOPs per
  image, but their images per second differ: the optimal-transport routers
  run iterative solvers, and small models on a CPU are dominated by
  per-operation overheads. Compare throughput on the hardware you will use.
- **Routing pictures.** Grey patches reached no expert. Compare how the
  routers split background and animal patches, and how many patches each
  expert receives: a Token Choice router that sends most patches to a few
  experts shows up here before it shows up in the accuracy.

## Scaling up

The paper's comparison runs on ImageNet-21k or JFT at 224x224 with ViT-S/B/L
backbones. The pieces of keras_vmoe scale the same way; only the data and the
model size change.

**Data.** `keras_vmoe.data.load(name, split)` reads any TFDS dataset that is
prepared locally (`tfds build cifar10`, or `download=True`). It never
downloads by default: an unprepared dataset raises
`DatasetNotPreparedError` with the command that prepares it.
"""

empty_dir = tempfile.mkdtemp(prefix="tfds_")
try:
    data.load("cifar10", "train", data_dir=empty_dir)
except data.DatasetNotPreparedError as error:
    print(error)

"""
Few-shot transfer datasets of the V-MoE papers include `cifar10`,
`cifar100`, `oxford_iiit_pet`, `caltech_birds2011` and `imagenet2012`
(which needs a manual download). Pass them to
`keras_vmoe.callbacks.FewShotEvaluator` as `load_arrays(name, split,
image_size=224, channels=3)` pairs.

**Models.** Every router has a preset at each V-MoE size, with the
equal-compute settings of the paper (Token Choice `K = 2` at capacity factor
1.05, Expert Choice at 2, Soft MoE with `2 * tokens / E` slots). They are
architectures: `from_preset(name, num_classes=...)` builds a randomly
initialised model, ready to pre-train.
"""

presets = models.list_presets()
for name in sorted(presets):
    if name.endswith("_b16_e32_224"):
        meta = presets[name]
        print(
            f"{name:32s} {meta['parameter_count'] / 1e6:7.1f}M parameters "
            f"{meta['flops_per_image'] / 1e9:6.1f} GFLOPs per image"
        )

"""
**Training.** On an accelerator, one pre-training run per router looks like
this (the `pretraining` guide explains each piece, and the `scaling_out`
guide spreads the experts over several devices):

```python
for preset in ("vmoe_softmax_tc_b16_e32_224", "vmoe_softmax_ec_b16_e32_224"):
    # The pipeline resizes and scales: no preprocessor on the model.
    model = models.from_preset(preset, num_classes=1000, preprocessor=None)
    train = data.train_pipeline(
        data.load("imagenet2012", "train", shuffle_files=True),
        image_size=224, batch_size=1024, num_classes=1000,
        rand_augment=(2, 0.5), mixup_alpha=0.2, repeat=True,
    )
    training.compile_with_recipe(model, "vmoe", total_steps=90_000)
    model.fit(
        train, epochs=90, steps_per_epoch=1000,
        callbacks=[
            callbacks.RoutingStatistics(),
            callbacks.FewShotEvaluator(fewshot_datasets, every_n_epochs=10),
            keras.callbacks.BackupAndRestore(f"runs/{preset}/backup"),
        ],
    )
    model.save_to_preset(f"runs/{preset}/preset")
```

Keep the batch a multiple of the routing group (8 images for the V-MoE
presets, 1 for Soft MoE), compare the routers at equal compute and with
several seeds, and report few-shot accuracy with the same shots, seed and l2
for every model, as the study does.
"""
