"""The study's data: Animal-MNIST (or your own) upstream, digits downstream.

By default everything is bundled with the environment and loaded into
memory once per study (a few MB): nothing goes online. `StudyConfig.dataset`
replaces the upstream data with

- the name of a TFDS dataset already prepared on disk (`tfds build NAME`;
  nothing is downloaded): its `train` split, and its `test` split (or
  `validation` where there is no labelled `test`, as for `imagenet2012`);
- or the path of an image folder: `DIR/train/CLASS/*.png` and
  `DIR/test/CLASS/*.png`, or `DIR/CLASS/*.png` (every fifth image of each
  class, in sorted file order, becomes a test image).

Images are resized (bilinear, whole image) to `image_size` and converted to
`channels`. The arrays live in memory, so on a large dataset cap them with
`train_size` and `test_size`.
"""

import dataclasses
import os

import numpy as np

from keras_vmoe.data import CLASS_NAMES, DatasetNotPreparedError, load_arrays

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

UPSTREAM = "animal_mnist"
DOWNSTREAM = "digits"


class StudyDataError(ValueError):
    """`StudyConfig.dataset` cannot be loaded (not prepared, no images, ...)."""


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


def _class_dirs(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _image_files(directory):
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )


def _read_images(paths, image_size, channels):
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(paths), image_size, image_size, channels), np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert(mode).resize(
                (image_size, image_size), Image.Resampling.BILINEAR
            )
            pixels = np.asarray(image, np.float32).reshape(image_size, image_size, -1)
        images[i] = pixels / 127.5 - 1.0
    return images


def load_image_folder(root, image_size, channels):
    """Train and test arrays of an image folder (see the module docstring).

    Args:
        root: str. The folder.
        image_size: int. Square size to resize to.
        channels: int. 1 (grayscale) or 3 (RGB).

    Returns:
        `((x_train, y_train), (x_test, y_test), class_names)`: float32
        images in [-1, 1], int64 labels in sorted class-name order.

    Raises:
        StudyDataError: no class folders or no images.
    """
    split_dirs = [os.path.join(root, split) for split in ("train", "test")]
    if all(os.path.isdir(d) for d in split_dirs):
        classes = _class_dirs(split_dirs[0])
        files = {
            split: [
                (path, label)
                for label, name in enumerate(classes)
                for path in _image_files(os.path.join(d, name))
            ]
            for split, d in zip(("train", "test"), split_dirs)
        }
    else:
        classes = _class_dirs(root)
        files = {"train": [], "test": []}
        for label, name in enumerate(classes):
            for index, path in enumerate(_image_files(os.path.join(root, name))):
                files["test" if index % 5 == 4 else "train"].append((path, label))
    if len(classes) < 2:
        raise StudyDataError(
            f"--dataset folder {root!r} needs one subfolder per class (at least "
            "2), or train/ and test/ folders holding them."
        )
    arrays = []
    for split in ("train", "test"):
        if not files[split]:
            raise StudyDataError(f"--dataset folder {root!r} has no {split} images.")
        order = np.random.default_rng(0).permutation(len(files[split]))
        chosen = [files[split][i] for i in order]  # classes mixed, seeded
        x = _read_images([p for p, _ in chosen], image_size, channels)
        arrays.append((x, np.array([lab for _, lab in chosen], np.int64)))
    return arrays[0], arrays[1], tuple(classes)


def _tfds_splits(name):
    import tensorflow_datasets as tfds

    return set(tfds.builder(name).info.splits)


def _tfds_class_names(name, num_classes):
    try:
        import tensorflow_datasets as tfds

        names = tfds.builder(name).info.features["label"].names
        return tuple(names)
    except Exception:  # no label names recorded: number the classes
        return tuple(str(i) for i in range(num_classes))


def load_upstream(config):
    """`((x_train, y_train), (x_test, y_test), class_names)` of the study.

    Animal-MNIST, a prepared TFDS dataset or an image folder (module
    docstring), before `classes` and the sizes are applied.
    """
    size, channels = config.image_size, config.channels
    if config.dataset is None:
        return (
            load_arrays(UPSTREAM, "train", image_size=size, channels=channels),
            load_arrays(UPSTREAM, "test", image_size=size, channels=channels),
            CLASS_NAMES[UPSTREAM],
        )
    if os.path.isdir(config.dataset):
        return load_image_folder(config.dataset, size, channels)
    try:
        train = load_arrays(config.dataset, "train", image_size=size, channels=channels)
        splits = _tfds_splits(config.dataset)
        test = None
        if "test" in splits:
            test = load_arrays(
                config.dataset, "test", image_size=size, channels=channels
            )
        if test is None or (test[1] < 0).any():  # no labelled test split
            test = load_arrays(
                config.dataset, "validation", image_size=size, channels=channels
            )
    except (DatasetNotPreparedError, ValueError) as error:
        raise StudyDataError(f"--dataset {config.dataset!r}: {error}") from error
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    return train, test, _tfds_class_names(config.dataset, num_classes)


def load_study_data(config):
    """Loads the upstream and few-shot arrays a `StudyConfig` asks for.

    Upstream: the first `train_size` / `test_size` images of the train /
    test splits (Animal-MNIST's are already in a seeded random order),
    optionally only the `classes` listed. Downstream: the digits train split
    (1,437) is the few-shot pool and its test split (360) the few-shot test
    set (or their first `fewshot_train_size` / `fewshot_test_size` images),
    8x8 bilinearly resized to `image_size`.

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
    train, test, names = load_upstream(config)
    if classes is not None and not all(0 <= c < len(names) for c in classes):
        raise ValueError(f"classes must be in 0..{len(names) - 1}, got {classes}.")
    x_train, y_train = _select(*train, classes, config.train_size)
    x_test, y_test = _select(*test, classes, config.test_size)
    fewshot = {}
    sizes = {"train": config.fewshot_train_size, "test": config.fewshot_test_size}
    for split, size in sizes.items():
        x, y = load_arrays(
            DOWNSTREAM, split, image_size=config.image_size, channels=config.channels
        )
        fewshot[f"x_{split}"], fewshot[f"y_{split}"] = x[:size], y[:size]
    return StudyData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=tuple(names[c] for c in (classes or range(len(names)))),
        fewshot=fewshot,
    )
