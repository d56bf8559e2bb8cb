"""Bundled datasets: the seeded split, TFDS builders, offline `load`, `load_arrays`."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_vmoe import data


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One data_dir where both bundled datasets are prepared (once)."""
    path = tmp_path_factory.mktemp("tfds")
    for cls in (data.AnimalMnist, data.Digits):
        cls(data_dir=str(path)).download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return str(path)


def _arrays(ds):
    images, labels = [], []
    for ex in ds.as_numpy_iterator():
        images.append(ex["image"])
        labels.append(ex["label"])
    return np.stack(images), np.array(labels)


# ---------------------------------------------------------------- splits


def test_split_is_sklearn_train_test_split():
    from sklearn.model_selection import train_test_split

    for n in (10000, 1797):
        train, test = train_test_split(np.arange(n), test_size=0.2, random_state=42)
        idx = data.split_indices(n)
        np.testing.assert_array_equal(idx["train"], train)
        np.testing.assert_array_equal(idx["test"], test)
        assert np.intersect1d(idx["train"], idx["test"]).size == 0


def test_bundled_arrays_are_the_real_images():
    images, labels = data.bundled_arrays("animal_mnist", "all")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    assert images.max() == 255 and 20 < images.mean() < 200  # real silhouettes
    # Class 0 of the wheel is "bear": its first image is not a blank frame.
    assert images[labels == 0][0].std() > 10
    x, y = data.bundled_arrays("digits", "all")
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.uint8 and x.max() == 255


# ---------------------------------------------------------------- builders


def test_animal_mnist_builder(tfds_dir):
    builder = data.AnimalMnist(data_dir=tfds_dir)
    info = builder.info
    assert info.splits["train"].num_examples == 8000
    assert info.splits["test"].num_examples == 2000
    assert info.features["label"].num_classes == 10
    assert info.features["label"].names == list(data.ANIMAL_MNIST_CLASSES)
    assert info.features["image"].shape == (28, 28, 1)
    total = 0
    for split in ("train", "test"):
        x, y = _arrays(builder.as_dataset(split=split))
        assert x.shape[1:] == (28, 28, 1) and x.dtype == np.uint8
        total += len(y)
        # Same examples as the documented split (TFDS stores them in its own
        # order): compare per-class counts and pixel sums.
        bx, by = data.bundled_arrays("animal_mnist", split)
        np.testing.assert_array_equal(np.bincount(y, minlength=10), np.bincount(by))
        for c in range(10):
            assert x[y == c].sum(dtype=np.int64) == bx[by == c].sum(dtype=np.int64)
    assert total == 10000
    assert data.SPLIT_SIZES["animal_mnist"] == {"train": 8000, "test": 2000}


def test_digits_builder(tfds_dir):
    builder = data.Digits(data_dir=tfds_dir)
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    x, y = _arrays(builder.as_dataset(split="test"))
    assert x.shape == (360, 8, 8, 1) and x.dtype == np.uint8
    assert set(np.unique(y)) == set(range(10))
    # Importing keras_vmoe.data registered the builders with TFDS.
    ds = tfds.load("digits", split="test", data_dir=tfds_dir, download=False)
    assert int(ds.cardinality()) == 360


# ---------------------------------------------------------------- load


def test_load_bundled(tfds_dir):
    ds = data.load("animal_mnist", "test", data_dir=tfds_dir)
    assert set(ds.element_spec) >= {"image", "label"}
    sup = data.load("digits", "train[:100]", data_dir=tfds_dir, as_supervised=True)
    x, y = next(iter(sup.batch(100)))
    assert x.shape == (100, 8, 8, 1) and y.shape == (100,)


def test_load_prepares_bundled_dataset_on_first_use(tmp_path):
    ds = data.load("digits", "test", data_dir=str(tmp_path))
    assert int(ds.cardinality()) == 360
    assert data.Digits(data_dir=str(tmp_path)).is_prepared()


def test_load_unprepared_tfds_dataset_raises_clear_error(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError) as err:
        data.load("cifar10", "train", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "tfds build cifar10" in message and "download=True" in message
    assert str(tmp_path) in message
    assert isinstance(err.value, FileNotFoundError)


def test_load_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="`name`"):
        data.load("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`split`"):
        data.load("digits", "", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`name`"):
        data.bundled_arrays("cifar10", "train")


def test_load_arrays():
    x, y = data.load_arrays("digits", "test")
    bx, by = data.bundled_arrays("digits", "test")
    assert x.shape == (360, 8, 8, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, by)
    np.testing.assert_allclose(x, bx / 127.5 - 1.0, atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0
    x16, y16 = data.load_arrays("digits", "train", image_size=16, channels=3)
    assert x16.shape == (1437, 16, 16, 3) and len(y16) == 1437
    assert x16.min() >= -1.0 and x16.max() <= 1.0
    np.testing.assert_array_equal(x16[..., 0], x16[..., 2])
    with pytest.raises(ValueError, match="`channels`"):
        data.load_arrays("digits", "test", channels=2)
    with pytest.raises(ValueError, match="`image_size`"):
        data.load_arrays("digits", "test", image_size=(8,))
