"""Evaluate a trained preset: test accuracy and few-shot linear accuracy.

    keras-vmoe eval --preset runs/digits/preset --dataset digits \\
        --fewshot digits,animal_mnist --shots 1,5,10,25 [--json]

Test accuracy needs a dataset with as many classes as the model's head;
few-shot accuracy (docs/routers.md, "Few-shot evaluation") works on any
dataset, on the frozen `pre_logits` features. Images are resized to the
model's input size (bundled datasets: whole image; other datasets: resize
and central crop 0.875, `keras_vmoe.data.eval_crop_fraction`).

V-MoE layers route groups of `group_size` images, so the model runs through
`keras_vmoe.evaluation.predict_in_groups` (test accuracy) and
`keras_vmoe.callbacks.FewShotEvaluator` (few-shot features, which uses it
too): one padding rule, a short last group filled with copies of its own
images, the padding dropped from the results.
"""

import json

from keras_vmoe.cli.common import (
    DEFAULT_SHOTS,
    check_dataset,
    format_table,
    one_line,
    parse_int_list,
    parse_name_list,
)


def test_accuracy(model, dataset, split="test", batch_size=256, data_dir=None):
    """Top-1 accuracy of a classifier on a dataset split (every example).

    Args:
        model: `VisionMoEImageClassifier`.
        dataset: str. Bundled or prepared TFDS dataset name.
        split: str. Defaults to `"test"`.
        batch_size: int. Defaults to `256`.
        data_dir: str or None. TFDS data directory. Defaults to `None`.

    Returns:
        dict with `accuracy` and `num_examples`.
    """
    import numpy as np

    from keras_vmoe import data
    from keras_vmoe.evaluation import model_image_shape, predict_in_groups

    h, w, c = model_image_shape(model)
    ds = data.eval_pipeline(
        data.load(dataset, split, data_dir=data_dir),
        (h, w),
        batch_size,
        crop_fraction=data.eval_crop_fraction(dataset),
        channels=c,
    )
    labels = []

    def images():  # the split's images in order; keeps the labels
        for batch_images, batch_labels in ds.as_numpy_iterator():
            labels.append(batch_labels)
            yield batch_images

    try:
        logits = predict_in_groups(model, images(), batch_size)  # (N, classes)
    except ValueError:
        if labels:
            raise
        return {"accuracy": 0.0, "num_examples": 0}  # an empty split
    labels = np.concatenate(labels)
    correct = int(np.sum(np.argmax(logits, axis=-1) == labels))
    return {"accuracy": correct / max(len(labels), 1), "num_examples": len(labels)}


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument(
        "--preset", required=True, help="Preset folder (from `train`) or built-in name."
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="Dataset for test accuracy (default: the preset's training dataset, "
        "unless --fewshot is given).",
    )
    parser.add_argument("--split", default="test", help="Split for test accuracy.")
    parser.add_argument(
        "--fewshot",
        default=None,
        help="Comma-separated datasets for few-shot accuracy.",
    )
    parser.add_argument(
        "--shots", default=DEFAULT_SHOTS, help="Comma-separated shots per class."
    )
    parser.add_argument(
        "--l2-sweep",
        action="store_true",
        help="Sweep the ridge l2 over 2^-10..2^19 and report the best (default 2^10).",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="Few-shot sampling seed.")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory.")
    parser.add_argument("--json", action="store_true", help="Print JSON only.")


def _preset_training(folder):
    """The `training` entry of a trained preset's metadata, or `{}`."""
    import os

    path = os.path.join(str(folder), "metadata.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("training") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def run(args):
    from keras_vmoe.cli.errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    shots = parse_int_list(args.shots, "--shots")
    fewshot = parse_name_list(args.fewshot, "--fewshot") if args.fewshot else ()

    from keras_vmoe.models import preset_loader

    try:
        folder = preset_loader.resolve_preset(args.preset)
    except ValueError as e:
        raise UsageError(one_line(e)) from None
    dataset = args.dataset or _preset_training(folder).get("dataset")
    if dataset is None and not fewshot:
        raise UsageError(
            "nothing to evaluate: pass --dataset and/or --fewshot (this preset "
            "does not record a training dataset)."
        )
    if dataset is not None:
        check_dataset(dataset, args.split, args.data_dir)
    for name in fewshot:
        check_dataset(name, "train", args.data_dir)
        check_dataset(name, "test", args.data_dir)

    import numpy as np

    from keras_vmoe import data
    from keras_vmoe.callbacks import FewShotEvaluator
    from keras_vmoe.evaluation import DEFAULT_L2, L2_SWEEP, model_image_shape

    try:
        # The eval pipeline and load_arrays preprocess the images already.
        model = preset_loader.load_classifier(folder, preprocessor=None)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(one_line(e)) from None
    results = {}
    if dataset is not None:
        classes = data.num_classes(dataset, args.data_dir)
        if classes != model.num_classes:
            raise UsageError(
                f"the model has {model.num_classes} classes but {dataset!r} has "
                f"{classes}: test accuracy needs the training label set (use "
                "--fewshot for other datasets)."
            )
        acc = test_accuracy(model, dataset, args.split, args.batch_size, args.data_dir)
        results[f"test/{dataset}/{args.split}_accuracy"] = acc["accuracy"]
        results[f"test/{dataset}/num_examples"] = acc["num_examples"]
    if fewshot:
        try:
            evaluator = FewShotEvaluator.from_dataset_names(
                fewshot,
                model_image_shape(model),
                shots,
                l2_regs=L2_SWEEP if args.l2_sweep else (DEFAULT_L2,),
                seed=args.seed,
                data_dir=args.data_dir,
            )
        except ValueError as e:
            raise UsageError(one_line(e)) from None
        metrics = evaluator.evaluate_now(model)
        results.update({k: float(np.asarray(v)) for k, v in metrics.items()})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"preset: {folder}")
        print(format_table(results))
    return 0
