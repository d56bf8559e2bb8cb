"""Evaluate a trained preset: test accuracy and few-shot linear accuracy.

    keras-vmoe eval --preset runs/digits/preset --dataset digits \\
        --fewshot digits,animal_mnist --shots 1,5,10,25 [--json]

Test accuracy needs a dataset with as many classes as the model's head;
few-shot accuracy (ROUTERS.md section 5) works on any dataset, on the
frozen `pre_logits` features. Images are resized to the model's input size
(bundled datasets: whole image; other datasets: resize and central crop
0.875, as in `keras_vmoe.data.eval_pipeline`).

The helpers here are shared with `keras-vmoe train`: V-MoE layers route
groups of `group_size` images, so every batch of the test and validation
splits fed to a model is padded to a multiple of the group size (by
repeating its own images) and the padding is dropped from the results. The
few-shot callback pads its own batches (with zero images).
"""

import json
import math

from keras_vmoe.callbacks.fewshot import model_group_size

DEFAULT_SHOTS = "1,5,10,25"


# ----------------------------------------------------------------------------
# Argument parsing helpers (shared with `keras-vmoe train`).
# ----------------------------------------------------------------------------
def parse_int_list(text, flag, minimum=1):
    """`"1,5,10"` -> `(1, 5, 10)`; raises `UsageError` naming `flag`."""
    from keras_vmoe.cli.errors import UsageError

    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UsageError(
            f"{flag} must be comma-separated integers, got {text!r}."
        ) from None
    if not values or min(values) < minimum:
        raise UsageError(
            f"{flag} must be comma-separated integers >= {minimum}, got {text!r}."
        )
    return values


def parse_name_list(text, flag):
    """`"digits,animal_mnist"` -> `("digits", "animal_mnist")`."""
    from keras_vmoe.cli.errors import UsageError

    names = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not names:
        raise UsageError(f"{flag} must name at least one dataset, got {text!r}.")
    return names


def one_line(error):
    """An exception's message on one line."""
    return " ".join(str(error).split())


def check_dataset(name, split, data_dir=None):
    """Checks that a dataset split can be read offline; `UsageError` if not.

    Returns:
        The number of examples in the split (or `None` if unknown).
    """
    from keras_vmoe import data
    from keras_vmoe.cli.errors import UsageError

    if name in data.BUNDLED_NAMES and split in ("train", "test"):
        return data.SPLIT_SIZES[name][split]
    try:
        ds = data.load(name, split, data_dir=data_dir)
    except data.DatasetNotPreparedError as e:
        raise UsageError(one_line(e)) from None
    except (ValueError, KeyError, AssertionError) as e:
        raise UsageError(f"dataset {name!r}, split {split!r}: {one_line(e)}") from None
    size = int(ds.cardinality())
    return size if size >= 0 else None


def num_classes_of(name, data_dir=None):
    """Number of classes of a bundled or TFDS dataset (its `label` feature)."""
    from keras_vmoe import data

    if name in data.CLASS_NAMES:
        return len(data.CLASS_NAMES[name])
    import tensorflow_datasets as tfds

    return int(tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes)


def crop_fraction_for(dataset):
    """Evaluation crop: none for the small bundled datasets, else 0.875."""
    from keras_vmoe import data

    return None if dataset in data.BUNDLED_NAMES else 0.875


def model_image_shape(model):
    """`(height, width, channels)` of the model's input."""
    shape = model.inputs[0].shape
    return tuple(int(s) for s in shape[1:4])


# ----------------------------------------------------------------------------
# Group-padded inference.
# ----------------------------------------------------------------------------
def pad_to_multiple(images, multiple):
    """Repeats the batch's own images until its size is a multiple.

    Returns:
        `(padded images, number of real images)`.

    Example:
    >>> import numpy as np
    >>> padded, n = pad_to_multiple(np.arange(5)[:, None], 4)
    >>> padded[:, 0].tolist(), n
    ([0, 1, 2, 3, 4, 0, 1, 2], 5)
    """
    import numpy as np

    n = len(images)
    size = math.ceil(n / multiple) * multiple
    if size == n:
        return images, n
    return np.take(images, np.arange(size) % n, axis=0), n


def group_padded(dataset, group_size):
    """Pads every batch of a `(images, labels)` tf.data.Dataset to whole groups.

    Returns:
        A Dataset of `(images, labels, sample_weight)` where padded rows
        (copies of the batch's first images) have weight 0, for `fit`'s
        `validation_data` or `evaluate`.
    """
    import tensorflow as tf

    def pad(images, labels):
        n = tf.shape(images)[0]
        size = (n + group_size - 1) // group_size * group_size
        index = tf.range(size) % n
        weight = tf.cast(tf.range(size) < n, tf.float32)
        return tf.gather(images, index), tf.gather(labels, index), weight

    return dataset.map(pad)


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
    import keras
    import numpy as np

    from keras_vmoe import data

    h, w, c = model_image_shape(model)
    ds = data.eval_pipeline(
        data.load(dataset, split, data_dir=data_dir),
        (h, w),
        batch_size,
        crop_fraction=crop_fraction_for(dataset),
        channels=c,
    )
    group = model_group_size(model)
    correct = total = 0
    for images, labels in ds.as_numpy_iterator():
        padded, n = pad_to_multiple(images, group)
        logits = keras.ops.convert_to_numpy(model.predict_on_batch(padded))[:n]
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
        total += n
    return {"accuracy": correct / max(total, 1), "num_examples": total}


def fewshot_evaluator(
    names,
    image_shape,
    shots,
    l2_regs=None,
    seed=0,
    data_dir=None,
    every_n_epochs=1,
):
    """A `FewShotEvaluator` over bundled / TFDS datasets at the model's size.

    Args:
        names: sequence of str. Dataset names (train split for the probe,
            test split for the accuracy).
        image_shape: tuple. `(height, width, channels)` of the model input.
        shots: sequence of int. Examples per class.
        l2_regs: sequence of float or None. Ridge strengths. Defaults to
            `None` (2^10).
        seed: int. Few-shot sampling seed. Defaults to `0`.
        data_dir: str or None. TFDS data directory. Defaults to `None`.
        every_n_epochs: int. Defaults to `1`.

    Returns:
        `keras_vmoe.callbacks.FewShotEvaluator`.
    """
    from keras_vmoe import data
    from keras_vmoe.callbacks import FewShotEvaluator
    from keras_vmoe.evaluation import DEFAULT_L2

    h, w, c = image_shape
    datasets = {}
    for name in names:
        datasets[name] = tuple(
            data.load_arrays(
                name, split, image_size=(h, w), data_dir=data_dir, channels=c
            )
            for split in ("train", "test")
        )
    return FewShotEvaluator(
        datasets,
        shots=shots,
        l2_regs=(DEFAULT_L2,) if l2_regs is None else tuple(l2_regs),
        every_n_epochs=every_n_epochs,
        seed=seed,
    )


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


def format_table(results):
    """Two-column text table of `{metric: value}`."""
    width = max([len("metric")] + [len(k) for k in results])
    lines = [f"{'metric':<{width}}  value"]
    for key, value in results.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


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

    from keras_vmoe.evaluation import L2_SWEEP

    try:
        model = preset_loader.load_classifier(folder)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(one_line(e)) from None
    results = {}
    if dataset is not None:
        classes = num_classes_of(dataset, args.data_dir)
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
            evaluator = fewshot_evaluator(
                fewshot,
                model_image_shape(model),
                shots,
                l2_regs=L2_SWEEP if args.l2_sweep else None,
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
