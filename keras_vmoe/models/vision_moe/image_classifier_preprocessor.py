"""`VisionMoEImageClassifierPreprocessor`: the classifier's input preprocessing."""

import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.image_converter import VisionMoEImageConverter
from keras_vmoe.utils.pixels import PIXEL_OFFSET, PIXEL_SCALE


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionMoEImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Preprocessing of `VisionMoEImageClassifier`: raw images in, model inputs out.

    Runs its `VisionMoEImageConverter` on the images `x` and passes labels
    `y` and `sample_weight` through, so `classifier.predict(raw_images)` and
    `classifier.fit(raw_images, labels)` (arrays or a `tf.data.Dataset` of
    `(images, labels)`) resize and scale the images as the model expects.
    The classifier's `from_preset` restores it from `preprocessor.json`.

    Images that are already preprocessed (e.g. the `keras_vmoe.data`
    pipelines' batches, in [-1, 1]) go to a classifier whose `preprocessor`
    is `None`: set `classifier.preprocessor = None`, or pass
    `preprocessor=None` to `from_preset`.

    Args:
        image_converter: `VisionMoEImageConverter` or None. Defaults to
            `None` (images pass unchanged).
        **kwargs: `keras_hub.models.Preprocessor` arguments (`name`, ...).

    Example:
    >>> import numpy as np
    >>> preprocessor = VisionMoEImageClassifierPreprocessor(
    ...     VisionMoEImageConverter(image_size=(8, 8)))
    >>> x, y = preprocessor(np.zeros((2, 20, 30, 3), "uint8"), np.array([0, 1]))
    >>> tuple(x.shape), float(np.asarray(x).max())
    ((2, 8, 8, 3), -1.0)
    """

    backbone_cls = VisionMoEBackbone
    image_converter_cls = VisionMoEImageConverter

    def __init__(self, image_converter=None, **kwargs):
        kwargs.setdefault("name", "vision_moe_image_classifier_preprocessor")
        super().__init__(image_converter=image_converter, **kwargs)

    @classmethod
    def for_backbone(cls, backbone, **converter_kwargs):
        """The preprocessor of a backbone: resize to its image size, scale to [-1, 1].

        The converter takes images in the backbone's `data_format`.

        Args:
            backbone: `VisionMoEBackbone`. Its `image_shape` gives the size.
            **converter_kwargs: Other `VisionMoEImageConverter` arguments.

        Example:
        >>> backbone = VisionMoEBackbone(
        ...     image_shape=(16, 16, 3), patch_size=4, num_layers=1,
        ...     num_heads=2, hidden_dim=8, mlp_dim=16)
        >>> VisionMoEImageClassifierPreprocessor.for_backbone(backbone).image_size
        (16, 16)
        """
        if not isinstance(backbone, VisionMoEBackbone):
            raise ValueError(
                f"`backbone` must be a VisionMoEBackbone, got {backbone!r}."
            )
        height, width, channels = backbone.layout.image_shape  # in any format
        converter_kwargs.setdefault("data_format", backbone.data_format)
        if converter_kwargs["data_format"] == "channels_first":
            # keras-hub's converter broadcasts a scale or offset over
            # channels-first images only when given one value per channel.
            for name, default in (("scale", PIXEL_SCALE), ("offset", PIXEL_OFFSET)):
                value = converter_kwargs.get(name, default)
                if isinstance(value, (int, float)):
                    converter_kwargs[name] = (float(value),) * channels
        converter = cls.image_converter_cls(
            image_size=(height, width), **converter_kwargs
        )
        return cls(image_converter=converter)
