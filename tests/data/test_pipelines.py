"""tf.data pipelines: shapes, value range, determinism, Keras RandAugment/MixUp."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_vmoe import data
from keras_vmoe.data import pipelines

# ---------------------------------------------------------------- pipelines


def _animal_ds(n=96):
    x, y = data.bundled_arrays("animal_mnist", "train")
    return tf.data.Dataset.from_tensor_slices({"image": x[:n], "label": y[:n]})


def _batches(ds):
    return [(np.asarray(x), np.asarray(y)) for x, y in ds]


def test_train_pipeline_shapes_range_and_determinism():
    kwargs = dict(num_classes=10, channels=3, shuffle_buffer=64, seed=7)
    first = _batches(data.train_pipeline(_animal_ds(), 24, 32, **kwargs))
    again = _batches(data.train_pipeline(_animal_ds(), 24, 32, **kwargs))
    other = _batches(data.train_pipeline(_animal_ds(), 24, 32, **{**kwargs, "seed": 8}))
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert x.shape == (32, 24, 24, 3) and x.dtype == np.float32
        assert y.shape == (32, 10) and y.dtype == np.float32
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9
        np.testing.assert_array_equal(np.sum(y, axis=1), 1.0)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(first[0][0], other[0][0])


def test_train_pipeline_new_augmentation_each_epoch():
    ds = data.train_pipeline(_animal_ds(32), 28, 32, shuffle_buffer=0, seed=1)
    [(x1, y1)], [(x2, y2)] = _batches(ds), _batches(ds)
    np.testing.assert_array_equal(y1, y2)  # no shuffle: same order
    assert not np.array_equal(x1, x2)  # but fresh crops / flips


def test_train_pipeline_without_crop_and_flip_is_a_plain_resize():
    x, y = data.bundled_arrays("digits", "train")
    ds = tf.data.Dataset.from_tensor_slices((x[:10], y[:10]))
    out = data.train_pipeline(
        ds, 8, 10, random_crop=False, flip=False, shuffle_buffer=0
    )
    images, labels = _batches(out)[0]
    np.testing.assert_allclose(images, x[:10] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, y[:10])
    assert labels.dtype == np.int32


def test_train_pipeline_randaugment_and_mixup():
    kwargs = dict(
        num_classes=10, channels=3, rand_augment=(2, 0.5), mixup_alpha=0.4, seed=3
    )
    first = _batches(data.train_pipeline(_animal_ds(32), 16, 16, **kwargs))
    again = _batches(data.train_pipeline(_animal_ds(32), 16, 16, **kwargs))
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert x.shape == (16, 16, 16, 3) and y.shape == (16, 10)
        assert x.min() >= -1.0 and x.max() <= 1.0
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
        assert (y.max(axis=1) < 1.0).any()  # labels were mixed
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_tf_histogram_matches_numpy():
    values = np.random.default_rng(0).uniform(0, 255, size=(9, 7, 1))
    hist = pipelines._tf_histogram(None, tf.constant(values), (0, 255), 256)
    expected = np.bincount(
        np.clip((values * 255 / 255).astype(np.int32), 0, 255).ravel(), minlength=256
    )
    np.testing.assert_array_equal(np.asarray(hist), expected)


def test_eval_pipeline_central_crop_and_order():
    # A 4x4 image with pixel value 10*row + col; with image_size=2 and
    # crop_fraction=0.5 the short side is resized to ceil(2 / 0.5) = 4 (no
    # resize), and the central 2x2 crop is rows 1-2, cols 1-2: 11 12 / 21 22.
    image = (10 * np.arange(4)[:, None] + np.arange(4)[None, :]).astype(np.uint8)
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": image[None, ..., None], "label": np.array([3])}
    )
    x, y = _batches(data.eval_pipeline(ds, 2, 1, crop_fraction=0.5))[0]
    np.testing.assert_allclose(x[0, ..., 0], np.array([[11, 12], [21, 22]]) / 127.5 - 1)
    assert y.tolist() == [3]
    # Order is kept, the last batch is partial, one-hot on request.
    xs, ys = data.bundled_arrays("digits", "test")
    ds = tf.data.Dataset.from_tensor_slices((xs, ys))
    out = _batches(data.eval_pipeline(ds, 12, 100, num_classes=10, channels=3))
    assert [len(b[1]) for b in out] == [100, 100, 100, 60]
    assert out[0][0].shape == (100, 12, 12, 3)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]).argmax(1), ys)


def test_pipeline_over_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load("cifar10", "train")
        train = _batches(data.train_pipeline(ds, 16, 4, num_classes=10, channels=1))
        test = _batches(data.eval_pipeline(data.load("cifar10", "test"), 16, 5))
    assert [x.shape for x, _ in train] == [(4, 16, 16, 1)] * 3
    assert [y.shape for _, y in train] == [(4, 10)] * 3
    assert [x.shape for x, _ in test] == [
        (5, 16, 16, 3),
        (5, 16, 16, 3),
        (2, 16, 16, 3),
    ]
    assert all(np.abs(x).max() <= 1.0 for x, _ in train + test)


def test_pipeline_argument_errors():
    ds = _animal_ds(8)
    with pytest.raises(ValueError, match="`mixup_alpha`"):
        data.train_pipeline(ds, 8, 4, mixup_alpha=0.2)
    with pytest.raises(ValueError, match="`batch_size`"):
        data.train_pipeline(ds, 8, 0)
    with pytest.raises(ValueError, match="`image_size`"):
        data.eval_pipeline(ds, -1, 4)
    with pytest.raises(ValueError, match="`crop_fraction`"):
        data.eval_pipeline(ds, 8, 4, crop_fraction=1.5)
    with pytest.raises(ValueError, match="`rand_augment`"):
        data.train_pipeline(ds, 8, 4, rand_augment=(2, 3.0))
    with pytest.raises(ValueError, match="`num_classes`"):
        data.train_pipeline(ds, 8, 4, num_classes=1)


def test_fit_on_pipeline():
    ds = data.train_pipeline(_animal_ds(64), 16, 16, num_classes=10, channels=3, seed=0)
    model = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True))
    history = model.fit(ds, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["loss"]))


def _ramp_copies(n):
    # 16x16 image whose pixel (r, c) is 16 r + c (0..255), n copies.
    image = (16 * np.arange(16)[:, None] + np.arange(16)[None, :]).astype(np.uint8)
    images = np.repeat(image[None, ..., None], n, axis=0)
    return image, tf.data.Dataset.from_tensor_slices((images, np.zeros(n, np.int64)))


def test_inception_crop_takes_a_random_window_of_the_asked_area():
    # Area fraction 1/4 and aspect ratio 1 of a 16x16 image: an 8x8 window
    # at a random place; resized to 8x8 it is that window, pixel for pixel.
    image, ds = _ramp_copies(32)
    out = data.train_pipeline(
        ds,
        8,
        32,
        crop_area_range=(0.25, 0.25),
        aspect_ratio_range=(1.0, 1.0),
        flip=False,
        shuffle_buffer=0,
        seed=5,
    )
    [(x, _)] = _batches(out)
    pixels = np.rint((x[..., 0] + 1.0) * 127.5)
    corners = set()
    for crop in pixels:
        top, left = divmod(int(crop[0, 0]), 16)
        assert top <= 8 and left <= 8
        np.testing.assert_array_equal(crop, image[top : top + 8, left : left + 8])
        corners.add((top, left))
    assert len(corners) > 5  # random places, not always the same window


def test_flip_mirrors_about_half_of_the_images():
    image, ds = _ramp_copies(64)
    out = data.train_pipeline(ds, 16, 64, random_crop=False, shuffle_buffer=0, seed=2)
    [(x, _)] = _batches(out)
    pixels = np.rint((x[..., 0] + 1.0) * 127.5)
    flipped = [bool(np.array_equal(p, image[:, ::-1])) for p in pixels]
    kept = [bool(np.array_equal(p, image)) for p in pixels]
    assert all(f != k for f, k in zip(flipped, kept))  # each one or the other
    # Binomial(64, 1/2): 32 +- 4; 16..48 is a 4-sigma band.
    assert 16 <= sum(flipped) <= 48


# ------------------------------------------------- the model's preprocessing


def _every_pixel_value():
    """Two 16x16x3 uint8 images holding each value 0..255 in every channel."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    return np.stack([values, values[::-1, ::-1]]).repeat(3, axis=-1)


def test_pipelines_scale_exactly_as_the_model_converter():
    from keras_vmoe.models import VisionMoEImageConverter

    images = _every_pixel_value()
    labels = np.array([0, 1])
    converter = VisionMoEImageConverter()  # scaling only
    expected = np.asarray(keras.ops.convert_to_numpy(converter(images)))
    # The scaling the pipelines computed before they shared the converter's:
    # float32 x / 127.5 - 1, within one float32 step (2^-23).
    before = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_allclose(expected, before, atol=2.0**-23, rtol=0)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    train = data.train_pipeline(
        ds, 16, 2, random_crop=False, flip=False, shuffle_buffer=0
    )
    evaluation = data.eval_pipeline(ds, 16, 2, crop_fraction=None)
    for pipeline in (train, evaluation):  # same-size resize: pixels unchanged
        ((x, y),) = _batches(pipeline)
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(y, labels)
    x, _ = data.load_arrays("digits", "test")
    raw, _ = data.bundled_arrays("digits", "test")
    np.testing.assert_array_equal(
        x, np.asarray(keras.ops.convert_to_numpy(converter(raw)))
    )


def test_eval_pipeline_resizes_as_the_model_converter():
    from keras_vmoe.models import (
        VisionMoEImageClassifierPreprocessor,
        VisionMoEImageConverter,
    )

    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(3, 50, 60, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2])
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ((x, _),) = _batches(data.eval_pipeline(ds, (16, 12), 3, crop_fraction=None))
    preprocessor = VisionMoEImageClassifierPreprocessor(
        VisionMoEImageConverter(image_size=(16, 12))
    )
    # In tf.data, as `fit` and `predict` run it: the same TF ops, bit for bit.
    ((x_model, _),) = _batches(ds.batch(3).map(preprocessor))
    np.testing.assert_array_equal(x_model, x)
    # Eager, with this backend's own resize kernel.
    eager = np.asarray(keras.ops.convert_to_numpy(preprocessor(images)))
    np.testing.assert_allclose(eager, x, atol=1e-5, rtol=0)
