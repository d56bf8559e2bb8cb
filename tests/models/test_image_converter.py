"""`VisionMoEImageConverter` and `VisionMoEImageClassifierPreprocessor`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vmoe.models import (
    VisionMoEBackbone,
    VisionMoEImageClassifierPreprocessor,
    VisionMoEImageConverter,
)
from keras_vmoe.utils.pixels import PIXEL_OFFSET, PIXEL_SCALE, scale_pixels
from tests.models.keras_hub_harness import TestCase
from tests.models.tiny import TINY


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


class VisionMoEImageConverterTest(TestCase):
    def test_scaling_by_hand(self):
        # x / 127.5 - 1: 0 -> -1, 51 -> -0.6, 255 -> 1 (no resize).
        converter = VisionMoEImageConverter()
        pixels = np.array([0, 51, 255], "uint8").reshape(1, 1, 3, 1)
        out = _np(converter(pixels)).ravel()
        self.assertAllClose(out, [-1.0, -0.6, 1.0], atol=1e-7, rtol=0)
        self.assertEqual(out.dtype, np.float32)

    def test_scaling_is_scale_pixels_exactly(self):
        # Every uint8 value: bit for bit the function the data pipelines
        # use, and within one float32 step of the float32 `x / 127.5 - 1`
        # they computed before (x * (1 / 127.5) rounds differently from
        # x / 127.5 for 111 of the 256 values, by 2^-23 at most).
        pixels = np.arange(256, dtype="uint8").reshape(1, 16, 16, 1)
        out = _np(VisionMoEImageConverter()(pixels))
        np.testing.assert_array_equal(out, scale_pixels(pixels.astype("float32")))
        old = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        np.testing.assert_allclose(out, old, atol=2.0**-23, rtol=0)
        np.testing.assert_allclose(out, pixels / 127.5 - 1.0, atol=2e-7, rtol=0)
        self.assertEqual(float(out.min()), -1.0)
        self.assertEqual(float(out.max()), 1.0)

    def test_resizes_as_the_pipelines_resize(self):
        # The whole image, bilinear with antialiasing (tf.image.resize is the
        # independent reference; each backend resizes with its own kernel).
        rng = np.random.RandomState(0)
        images = rng.randint(0, 256, size=(2, 50, 60, 3)).astype("uint8")
        out = _np(VisionMoEImageConverter(image_size=(16, 12))(images))
        resized = tf.image.resize(images.astype("float32"), (16, 12), antialias=True)
        expected = resized.numpy() / 127.5 - 1.0
        self.assertEqual(out.shape, (2, 16, 12, 3))
        self.assertAllClose(out, expected, atol=1e-5, rtol=0)

    def test_defaults_and_serialization(self):
        converter = VisionMoEImageConverter(image_size=(8, 8))
        config = converter.get_config()
        self.assertEqual(config["scale"], PIXEL_SCALE)
        self.assertEqual(config["offset"], PIXEL_OFFSET)
        self.assertFalse(config["crop_to_aspect_ratio"])
        self.assertTrue(config["antialias"])
        self.assertEqual(converter.name, "vision_moe_image_converter")
        self.assertIs(VisionMoEImageConverter.backbone_cls, VisionMoEBackbone)
        self.run_serialization_test(converter)


class VisionMoEImageClassifierPreprocessorTest(TestCase):
    def test_images_converted_labels_passed_through(self):
        preprocessor = VisionMoEImageClassifierPreprocessor(
            VisionMoEImageConverter(image_size=(4, 4))
        )
        images = np.full((2, 10, 10, 3), 255, "uint8")
        x, y, sw = preprocessor(images, np.array([2, 0]), np.array([1.0, 0.5]))
        self.assertAllClose(x, np.ones((2, 4, 4, 3)))  # 255 -> 1 everywhere
        self.assertAllEqual(y, [2, 0])
        self.assertAllClose(sw, [1.0, 0.5])
        # In a tf.data pipeline (keras-hub runs preprocessors there in fit).
        ds = tf.data.Dataset.from_tensor_slices((images, [2, 0])).batch(2)
        x_ds, y_ds = next(iter(ds.map(preprocessor)))
        self.assertAllClose(x_ds, np.ones((2, 4, 4, 3)))
        self.assertAllEqual(y_ds, [2, 0])

    def test_for_backbone(self):
        backbone = VisionMoEBackbone(**dict(TINY, image_shape=(16, 12, 3)))
        preprocessor = VisionMoEImageClassifierPreprocessor.for_backbone(backbone)
        self.assertIsInstance(preprocessor.image_converter, VisionMoEImageConverter)
        self.assertEqual(preprocessor.image_size, (16, 12))
        with pytest.raises(ValueError, match="VisionMoEBackbone"):
            VisionMoEImageClassifierPreprocessor.for_backbone("backbone")

    def test_serialization(self):
        self.run_serialization_test(
            VisionMoEImageClassifierPreprocessor(
                VisionMoEImageConverter(image_size=(8, 8))
            )
        )
