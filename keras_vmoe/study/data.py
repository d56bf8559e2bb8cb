"""The study's data: Animal-MNIST upstream, scikit-learn digits downstream.

Everything is bundled with the environment and loaded into memory once per
study (a few MB): nothing goes online.
"""

import dataclasses

import numpy as np

from keras_vmoe.data import CLASS_NAMES, load_arrays

UPSTREAM = "animal_mnist"
DOWNSTREAM = "digits"


@dataclasses.dataclass
class StudyData:
    """In-memory arrays of one study (float32 images in [-1, 1], int labels).

    Attributes:
        x_train, y_train, x_test, y_test: upstream (Animal-MNIST) arrays.
        class_names: tuple of str. Names of the upstream classes used.
        fewshot: dict with `x_train, y_train, x_test, y_test` of the
            downstream few-shot task (digits, resized to the model's input).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    fewshot: dict

    @property
    def num_classes(self):
        return len(self.class_names)


def _select(x, y, classes, size):
    if classes is not None:
        keep = np.isin(y, classes)
        x, y = x[keep], y[keep]
        remap = {c: i for i, c in enumerate(classes)}
        y = np.array([remap[int(c)] for c in y], dtype=np.int64)
    if size is not None:
        x, y = x[:size], y[:size]
    return x, y


def load_study_data(config):
    """Loads the upstream and few-shot arrays a `StudyConfig` asks for.

    Upstream: the first `train_size` / `test_size` images of the Animal-MNIST
    train / test splits (already in a seeded random order), optionally only
    the `classes` listed. Downstream: the digits train split (1,437) is the
    few-shot pool and its test split (360) the few-shot test set (or their
    first `fewshot_train_size` / `fewshot_test_size` images), 8x8
    bilinearly resized to `image_size`.

    Args:
        config: `keras_vmoe.study.StudyConfig`.

    Returns:
        `StudyData`.

    Example:
    >>> from keras_vmoe.study.config import StudyConfig
    >>> data = load_study_data(StudyConfig(train_size=100, classes=(1, 6)))
    >>> data.x_train.shape[1:], data.class_names, sorted(set(data.y_train.tolist()))
    ((28, 28, 1), ('bird', 'giraffe'), [0, 1])
    """
    classes = None if config.classes is None else tuple(int(c) for c in config.classes)
    names = CLASS_NAMES[UPSTREAM]
    if classes is not None and not all(0 <= c < len(names) for c in classes):
        raise ValueError(f"classes must be in 0..{len(names) - 1}, got {classes}.")
    x_train, y_train = _select(
        *load_arrays(UPSTREAM, "train", image_size=config.image_size),
        classes,
        config.train_size,
    )
    x_test, y_test = _select(
        *load_arrays(UPSTREAM, "test", image_size=config.image_size),
        classes,
        config.test_size,
    )
    fewshot = {}
    sizes = {"train": config.fewshot_train_size, "test": config.fewshot_test_size}
    for split, size in sizes.items():
        x, y = load_arrays(DOWNSTREAM, split, image_size=config.image_size)
        fewshot[f"x_{split}"], fewshot[f"y_{split}"] = x[:size], y[:size]
    return StudyData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=tuple(names[c] for c in (classes or range(len(names)))),
        fewshot=fewshot,
    )
