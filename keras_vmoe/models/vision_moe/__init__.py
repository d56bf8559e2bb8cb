"""The V-MoE model family: a ViT whose MLP blocks may be Mixture-of-Experts.

One folder, read top to bottom: `vit_layers` (patches, class token, position
embedding, MLP), `encoder_block` (attention + MLP or MoE), `config` (argument
checks and the derived layout), `backbone`, `image_converter` and
`image_classifier_preprocessor` (resize and scale raw images),
`image_classifier` (with `losses`), `layout_map` (sharding with
`keras.distribution`), `cost` (parameters and FLOPs from a config) and
`presets`.
"""

from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.config import VisionMoELayout
from keras_vmoe.models.vision_moe.image_classifier import VisionMoEImageClassifier
from keras_vmoe.models.vision_moe.image_classifier_preprocessor import (
    VisionMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vision_moe.image_converter import VisionMoEImageConverter

__all__ = [
    "VisionMoEBackbone",
    "VisionMoEImageClassifier",
    "VisionMoEImageClassifierPreprocessor",
    "VisionMoEImageConverter",
    "VisionMoELayout",
]
