"""The two datasets that ship with the environment, as NumPy arrays.

Nothing here touches the network or TensorFlow Datasets: the TFDS builders in
`builders.py` and `load_arrays` both read their examples from these
functions, so the two paths always agree on the split.

- `animal_mnist`: the 10,000 real 28x28 grayscale silhouettes of the
  `animal-mnist` 0.4 wheel (1,000 per class). The wheel has no split of its
  own; its benchmark uses `sklearn.model_selection.train_test_split(
  test_size=0.2, random_state=42)`, which we reproduce exactly (a
  `numpy.random.RandomState(42)` permutation; the first 2,000 indices are the
  test split, the other 8,000 the train split, both in permutation order).
- `digits`: scikit-learn's bundled `load_digits` (1,797 8x8 images, values
  0..16, rescaled to uint8 0..255 as `round(v * 255 / 16)`), split the same
  way with `test_size=0.2, random_state=42`: 1,437 train, 360 test.
"""

import gzip
import importlib.resources
import math
import pickle

import numpy as np

ANIMAL_MNIST_CLASSES = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
DIGITS_CLASSES = tuple(str(i) for i in range(10))

SPLIT_SEED = 42
TEST_FRACTION = 0.2

# Number of examples per split (checked by the tests).
SPLIT_SIZES = {
    "animal_mnist": {"train": 8000, "test": 2000},
    "digits": {"train": 1437, "test": 360},
}
CLASS_NAMES = {"animal_mnist": ANIMAL_MNIST_CLASSES, "digits": DIGITS_CLASSES}
IMAGE_SHAPES = {"animal_mnist": (28, 28, 1), "digits": (8, 8, 1)}
BUNDLED_NAMES = tuple(SPLIT_SIZES)


def split_indices(num_examples, test_fraction=TEST_FRACTION, seed=SPLIT_SEED):
    """Indices of a seeded train/test split, as scikit-learn draws them.

    Identical to `sklearn.model_selection.train_test_split(..., test_size=
    test_fraction, random_state=seed)` (not stratified): a
    `numpy.random.RandomState(seed)` permutation whose first
    `ceil(test_fraction * num_examples)` entries are the test split.

    Args:
        num_examples: int. Size of the whole dataset.
        test_fraction: float. Fraction of examples in the test split.
            Defaults to `0.2`.
        seed: int. Seed of the permutation. Defaults to `42`.

    Returns:
        Dict `{"train": indices, "test": indices}` of int64 arrays.

    Example:

    >>> sorted(len(v) for v in split_indices(10).values())
    [2, 8]
    """
    if num_examples < 2:
        raise ValueError(f"`num_examples` must be >= 2, got {num_examples}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    num_test = math.ceil(test_fraction * num_examples)
    num_train = math.floor((1.0 - test_fraction) * num_examples)
    perm = np.random.RandomState(seed).permutation(num_examples)
    return {"test": perm[:num_test], "train": perm[num_test : num_test + num_train]}


def _animal_mnist_all():
    root = importlib.resources.files("animal_mnist.data") / "Animal_MNIST"
    with (root / "animal_data_version_3.gz").open("rb") as raw:
        with gzip.open(raw, "rb") as f:
            images = np.asarray(pickle.load(f), dtype=np.uint8)
    with (root / "animal_label_version_3.gz").open("rb") as raw:
        with gzip.open(raw, "rb") as f:
            labels = np.asarray(pickle.load(f), dtype=np.int64)
    return images[..., None], labels


def _digits_all():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images[..., None], digits.target.astype(np.int64)


_LOADERS = {"animal_mnist": _animal_mnist_all, "digits": _digits_all}


def bundled_arrays(name, split):
    """Raw images and labels of a bundled dataset split.

    Args:
        name: str. `"animal_mnist"` or `"digits"`.
        split: str. `"train"`, `"test"` or `"all"` (the whole dataset in its
            original order).

    Returns:
        `(images, labels)`: uint8 array `(N, H, W, 1)` with values 0..255 and
        int64 array `(N,)` of class ids 0..9.

    Example:

    >>> images, labels = bundled_arrays("digits", "test")
    >>> images.shape, images.dtype.name
    ((360, 8, 8, 1), 'uint8')
    """
    if name not in _LOADERS:
        raise ValueError(
            f"`name` must be one of {BUNDLED_NAMES} for bundled data, got {name!r}."
        )
    if split not in ("train", "test", "all"):
        raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}.")
    images, labels = _LOADERS[name]()
    if split == "all":
        return images, labels
    idx = split_indices(len(labels))[split]
    return images[idx], labels[idx]
