"""Sparse upcycling on Animal-MNIST: continue dense vs upcycled V-MoE.

    python -m benchmarks.upcycling [--quick] [--seeds N] [--output FILE.json]

1. Trains a dense ViT on Animal-MNIST (the study's data and model size:
   28x28 images, 7x7 patches, 4 blocks of width 64, MLP 128) with the
   V-MoE recipe, once (seed 0), and saves it as a preset.
2. For each seed, continues training from that checkpoint
   (a) the dense ViT, for `extra_epochs` passes over the training set, and
   (b) its upcycled V-MoE (`keras_vmoe.models.upcycle`: Expert Choice,
   8 experts in blocks 1 and 3, each expert the dense MLP, capacity factor
   1), for the same extra compute: its steps are the dense steps times the
   ratio of forward FLOPs per image of the cost model
   (`keras_vmoe.models.vision_moe.cost`), the same batch size.
   Both restart the recipe's schedule (warmup 10%, linear decay) at the
   same peak rate; a seed fixes the data order, the router initialisation
   and noise, and the few-shot draw for both models.
3. Reports test accuracy and 10-shot digits accuracy (linear probe on the
   pooled class token) of both, and their paired differences (upcycled -
   dense) with 95% t intervals over the seeds
   (`keras_vmoe.study.statistics.paired_difference`).

It prints one JSON line (prefix `JSON`) and a markdown table, and with
`--write` saves the BENCHMARKS.md section to `benchmarks/upcycling_results.md`
(`make bench` copies that file into BENCHMARKS.md without rerunning this
experiment, which takes about 15 minutes on an idle 2-core CPU).
`--from-json FILE` rewrites the section from a saved result. Accuracies do
not depend on the machine's load; the times do.
"""

import argparse
import json
import os
import tempfile
import time

import keras
import numpy as np

from keras_vmoe.evaluation import fewshot_linear_accuracy, predict_in_groups
from keras_vmoe.models import (
    VisionMoEBackbone,
    VisionMoEImageClassifier,
    backbone_flops,
    from_preset,
    upcycle,
)
from keras_vmoe.models.vision_moe.cost import head_flops
from keras_vmoe.study.config import StudyConfig
from keras_vmoe.study.data import load_study_data
from keras_vmoe.study.statistics import paired_difference
from keras_vmoe.training import compile_with_recipe

FULL = dict(
    train_size=None,
    test_size=None,
    fewshot_train_size=None,
    fewshot_test_size=None,
    pretrain_epochs=4,
    extra_epochs=2,
    seeds=3,
)
QUICK = dict(
    train_size=512,
    test_size=256,
    fewshot_train_size=400,
    fewshot_test_size=200,
    pretrain_epochs=1,
    extra_epochs=1,
    seeds=2,
)
MODEL = dict(
    image_shape=(28, 28, 1),
    patch_size=7,
    num_layers=4,
    num_heads=4,
    hidden_dim=64,
    mlp_dim=128,
    group_size=4,
)
UPCYCLE = dict(
    router="softmax_expert_choice",
    num_experts=8,
    moe_layers="last_odd:2",
    router_config={"capacity_factor": 1.0, "capacity_multiple_of": 1},
)
BATCH_SIZE = 128
PRETRAIN_LEARNING_RATE = 3e-3
CONTINUE_LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
SHOTS = 10
FEWSHOT_L2 = 1.0


def _train_dataset(x, y, seed):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(BATCH_SIZE, drop_remainder=True).prefetch(2)


def train(model, data, steps, learning_rate, seed):
    """`steps` steps of the V-MoE recipe (warmup a tenth, linear decay)."""
    keras.utils.set_random_seed(seed)
    compile_with_recipe(
        model,
        "vmoe",
        total_steps=steps,
        peak_learning_rate=learning_rate,
        warmup_steps=max(1, steps // 10),
        weight_decay=WEIGHT_DECAY,
        loss="softmax",
    )
    start = time.perf_counter()
    model.fit(
        _train_dataset(data.x_train, data.y_train, seed),
        steps_per_epoch=steps,
        epochs=1,
        verbose=0,
    )
    return time.perf_counter() - start


def evaluate(model, data, seed):
    """Test accuracy and 10-shot digits accuracy (pooled class token)."""
    evaluator = keras.Model(
        model.input, [model.output, model.get_layer("pre_logits").output]
    )
    group = MODEL["group_size"]
    logits, _ = predict_in_groups(evaluator, data.x_test, 256, group_size=group)
    fs = data.fewshot
    _, f_train = predict_in_groups(evaluator, fs["x_train"], 256, group_size=group)
    _, f_test = predict_in_groups(evaluator, fs["x_test"], 256, group_size=group)
    fewshot = fewshot_linear_accuracy(
        f_train,
        fs["y_train"],
        f_test,
        fs["y_test"],
        shots=(SHOTS,),
        l2_regs=(FEWSHOT_L2,),
        seed=seed,
    )
    return {
        "test_accuracy": float(np.mean(logits.argmax(axis=-1) == data.y_test)),
        "fewshot_10": float(next(iter(fewshot[SHOTS].values()))),
    }


def flops_per_image(model):
    config = model.backbone.get_config()
    return backbone_flops(config) + head_flops(
        model.backbone.hidden_dim, model.num_classes, model.representation_size
    )


def run(settings):
    data = load_study_data(
        StudyConfig(
            train_size=settings["train_size"],
            test_size=settings["test_size"],
            fewshot_train_size=settings["fewshot_train_size"],
            fewshot_test_size=settings["fewshot_test_size"],
        )
    )
    steps_per_epoch = len(data.x_train) // BATCH_SIZE
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    dense = VisionMoEImageClassifier(
        VisionMoEBackbone(**MODEL), num_classes=data.num_classes, loss_type="softmax"
    )
    pretrain_steps = settings["pretrain_epochs"] * steps_per_epoch
    pretrain_seconds = train(dense, data, pretrain_steps, PRETRAIN_LEARNING_RATE, 0)
    checkpoint = evaluate(dense, data, seed=0)
    folder = tempfile.mkdtemp(prefix="upcycling_dense_")
    dense.save_to_preset(folder)

    dense_steps = settings["extra_epochs"] * steps_per_epoch
    probe = upcycle(folder, seed=0, **UPCYCLE)
    dense_flops, moe_flops = flops_per_image(dense), flops_per_image(probe)
    moe_steps = int(round(dense_steps * dense_flops / moe_flops))
    at_start = evaluate(probe, data, seed=0)

    rows = []
    for seed in range(settings["seeds"]):
        continued = from_preset(folder)
        dense_seconds = train(
            continued, data, dense_steps, CONTINUE_LEARNING_RATE, seed
        )
        moe = upcycle(folder, seed=seed, **UPCYCLE)
        moe_seconds = train(moe, data, moe_steps, CONTINUE_LEARNING_RATE, seed)
        rows.append(
            {
                "seed": seed,
                "dense": evaluate(continued, data, seed),
                "upcycled": evaluate(moe, data, seed),
                "dense_seconds": dense_seconds,
                "upcycled_seconds": moe_seconds,
            }
        )
        print(f"seed {seed}: {rows[-1]}", flush=True)

    differences = {}
    for metric in ("test_accuracy", "fewshot_10"):
        diff = paired_difference(
            [r["upcycled"][metric] for r in rows], [r["dense"][metric] for r in rows]
        )
        differences[metric] = diff.as_dict()
    return {
        "settings": settings,
        "model": MODEL,
        "upcycle": UPCYCLE,
        "train_images": len(data.x_train),
        "batch_size": BATCH_SIZE,
        "pretrain_steps": pretrain_steps,
        "pretrain_seconds": pretrain_seconds,
        "dense_checkpoint": checkpoint,
        "upcycled_before_training": at_start,
        "dense_flops_per_image": dense_flops,
        "upcycled_flops_per_image": moe_flops,
        "dense_extra_steps": dense_steps,
        "upcycled_extra_steps": moe_steps,
        "runs": rows,
        "differences": differences,
        "backend": keras.backend.backend(),
        "load_average": os.getloadavg(),
        "total_seconds": time.perf_counter() - start,
    }


def markdown(result):
    """The BENCHMARKS.md table of a `run` result."""

    def mean(kind, metric):
        return np.mean([r[kind][metric] for r in result["runs"]])

    lines = [
        "| model | extra steps | FLOPs/image | test accuracy | 10-shot digits |",
        "| --- | --- | --- | --- | --- |",
        "| dense checkpoint (start) | 0 | {:,} | {:.4f} | {:.4f} |".format(
            result["dense_flops_per_image"],
            result["dense_checkpoint"]["test_accuracy"],
            result["dense_checkpoint"]["fewshot_10"],
        ),
        "| upcycled, before training | 0 | {:,} | {:.4f} | {:.4f} |".format(
            result["upcycled_flops_per_image"],
            result["upcycled_before_training"]["test_accuracy"],
            result["upcycled_before_training"]["fewshot_10"],
        ),
        "| (a) dense, continued | {} | {:,} | {:.4f} | {:.4f} |".format(
            result["dense_extra_steps"],
            result["dense_flops_per_image"],
            mean("dense", "test_accuracy"),
            mean("dense", "fewshot_10"),
        ),
        "| (b) upcycled V-MoE, continued | {} | {:,} | {:.4f} | {:.4f} |".format(
            result["upcycled_extra_steps"],
            result["upcycled_flops_per_image"],
            mean("upcycled", "test_accuracy"),
            mean("upcycled", "fewshot_10"),
        ),
    ]
    cells = []
    for metric in ("test_accuracy", "fewshot_10"):
        d = result["differences"][metric]
        if d["low"] is None:
            cells.append(f"{d['mean']:+.4f}")
        else:
            cells.append(f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
    n = len(result["runs"])
    lines.append(
        f"| (b) - (a), mean [95% CI], {n} seeds | | | {cells[0]} | {cells[1]} |"
    )
    return "\n".join(lines)


RESULTS_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "upcycling_results.md"
)


def section(result):
    """The BENCHMARKS.md section (without its title) of a `run` result."""
    runs = result["runs"]
    dense_s = np.mean([r["dense_seconds"] for r in runs])
    moe_s = np.mean([r["upcycled_seconds"] for r in runs])
    load = ", ".join(f"{v:.1f}" for v in result["load_average"])
    return "\n".join(
        [
            "`python -m benchmarks.upcycling --write` (not part of `make bench`: it "
            "trains 1 + 2 x seeds models). A dense ViT (28x28 Animal-MNIST, 7x7 "
            "patches, 4 blocks, d=64, MLP 128) trained for "
            f"{result['pretrain_steps']} steps of {result['batch_size']} images is "
            "continued (a) dense and (b) upcycled (`keras_vmoe.models.upcycle`: "
            f"{result['upcycle']['router']}, {result['upcycle']['num_experts']} "
            f"experts in blocks `{result['upcycle']['moe_layers']}`, capacity "
            "factor 1) for the same extra forward FLOPs (cost model: "
            f"{result['dense_extra_steps']} dense steps, "
            f"{result['upcycled_extra_steps']} upcycled steps), restarting the "
            "V-MoE recipe's schedule at peak rate 1e-3. One seed fixes the data "
            "order, router initialisation and few-shot draw of both models; the "
            "last row is the paired difference with its 95% t interval "
            "(`keras_vmoe.study.statistics.paired_difference`). Accuracies do "
            "not depend on the machine's load.",
            "",
            markdown(result),
            "",
            f"Wall time per continuation (mean over seeds): dense {dense_s:.0f} s, "
            f"upcycled {moe_s:.0f} s ({moe_s / dense_s:.2f}x at equal FLOPs: the "
            "routing, dispatch and combine cost time the FLOP count leaves out); "
            f"whole run {result['total_seconds'] / 60:.0f} min on "
            f"{result['backend']}, load average at the end {load} on a shared "
            "2-core machine, so the times are inflated and only their ratio "
            "means anything.",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="Tiny sizes (a smoke run)."
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--output", default=None, help="Also write the JSON here.")
    parser.add_argument(
        "--write", action="store_true", help=f"Write the section to {RESULTS_PATH}."
    )
    parser.add_argument("--from-json", default=None, help="Section from a saved run.")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        _write_section(result)
        print(section(result))
        return
    settings = dict(QUICK if args.quick else FULL)
    if args.seeds:
        settings["seeds"] = args.seeds
    result = run(settings)
    print("JSON" + json.dumps(result))
    print(markdown(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    if args.write:
        _write_section(result)


def _write_section(result):
    with open(RESULTS_PATH, "w") as f:
        f.write(section(result) + "\n")


if __name__ == "__main__":
    main()
