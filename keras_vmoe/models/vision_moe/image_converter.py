"""`VisionMoEImageConverter`: raw pixels to the V-MoE input (resize, [-1, 1])."""

import keras
import numpy as np
from keras_hub.layers import ImageConverter
from keras_hub.src.utils.tensor_utils import in_tf_function

from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.utils.pixels import PIXEL_OFFSET, PIXEL_SCALE


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionMoEImageConverter(ImageConverter):
    """Resizes raw images to the model's size and scales them to [-1, 1].

    A keras-hub `ImageConverter` whose defaults are those V-MoE models are
    trained with in `keras_vmoe.data`: the whole image resized in float32
    (bilinear, antialiased, no crop, as `eval_pipeline(crop_fraction=None)`
    and `load_arrays` do; integer images are not rounded back to integers
    after resizing), then pixels 0..255 scaled by `1 / 127.5` and shifted by
    `-1` (`keras_vmoe.utils.pixels.scale_pixels`, the same float32
    operations). Inputs are channels-last images, uint8 or float, batched
    `(B, H, W, C)` or not; the output is in the layer's compute dtype.

    A `VisionMoEImageClassifier` loaded from a preset carries one (in its
    `VisionMoEImageClassifierPreprocessor`), resizing to its backbone's
    `image_shape`.

    Args:
        image_size: `(height, width)` or None. Output size; `None` keeps
            the input size. Defaults to `None`.
        scale: float, per-channel tuple, or None. Defaults to `1 / 127.5`.
        offset: float, per-channel tuple, or None. Defaults to `-1.0`.
        crop_to_aspect_ratio: bool. Crop to the output's aspect ratio
            before resizing instead of stretching. Defaults to `False`.
        interpolation: str. Resize interpolation. Defaults to `"bilinear"`.
        antialias: bool. Antialias when downsampling. Defaults to `True`.
        **kwargs: Other `keras_hub.layers.ImageConverter` arguments
            (`pad_to_aspect_ratio`, `data_format`, `dtype`, `name`).

    Example:
    >>> import numpy as np
    >>> converter = VisionMoEImageConverter(image_size=(8, 8))
    >>> images = np.zeros((2, 40, 60, 3), dtype="uint8")  # black: 0 -> -1
    >>> out = np.asarray(converter(images))
    >>> out.shape, float(out.min()), float(out.max())
    ((2, 8, 8, 3), -1.0, -1.0)
    """

    backbone_cls = VisionMoEBackbone

    def __init__(
        self,
        image_size=None,
        scale=PIXEL_SCALE,
        offset=PIXEL_OFFSET,
        crop_to_aspect_ratio=False,
        interpolation="bilinear",
        antialias=True,
        **kwargs,
    ):
        kwargs.setdefault("name", "vision_moe_image_converter")
        super().__init__(
            image_size=image_size,
            scale=scale,
            offset=offset,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
            interpolation=interpolation,
            antialias=antialias,
            **kwargs,
        )

    def call(self, inputs):
        return super().call(_integers_as_float(inputs))


def _integers_as_float(images):
    """Integer images as float32, so that resizing does not round them."""
    if isinstance(images, (dict, list, tuple)):  # boxes, or a ragged batch
        return images
    if isinstance(images, np.ndarray):
        if np.issubdtype(images.dtype, np.integer):
            return images.astype(np.float32)
        return images
    if not keras.backend.is_int_dtype(keras.backend.standardize_dtype(images.dtype)):
        return images
    if in_tf_function():  # a tf.data pipeline, on any backend
        import tensorflow as tf

        return tf.cast(images, tf.float32)
    return keras.ops.cast(images, "float32")
