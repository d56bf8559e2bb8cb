"""Models: `VisionMoEBackbone`, `VisionMoEImageClassifier`, its preprocessing,
presets and `upcycle`.

One folder per model family (`vision_moe/`); `preset_loader` loads any
family's presets (the classes come from the preset's files).

Example:
>>> from keras_vmoe import models
>>> "vmoe_softmax_tc_b16_e32_224" in models.list_presets()
True
"""

from keras_vmoe.models.preset_loader import (
    PresetFileError,
    UnsafePresetError,
    from_preset,
    presets_dir,
)
from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.config import VisionMoELayout, parse_moe_layers
from keras_vmoe.models.vision_moe.cost import (
    backbone_flops,
    count_backbone_params,
    count_head_params,
)
from keras_vmoe.models.vision_moe.image_classifier import (
    ClassificationCrossEntropy,
    Top1Accuracy,
    VisionMoEImageClassifier,
)
from keras_vmoe.models.vision_moe.image_classifier_preprocessor import (
    VisionMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vision_moe.image_converter import VisionMoEImageConverter
from keras_vmoe.models.vision_moe.presets import (
    generate_presets,
    list_presets,
    register_with_keras_hub,
)
from keras_vmoe.models.vision_moe.upcycle import upcycle

register_with_keras_hub()

__all__ = [
    "ClassificationCrossEntropy",
    "PresetFileError",
    "Top1Accuracy",
    "UnsafePresetError",
    "VisionMoEBackbone",
    "VisionMoEImageClassifier",
    "VisionMoEImageClassifierPreprocessor",
    "VisionMoEImageConverter",
    "VisionMoELayout",
    "backbone_flops",
    "count_backbone_params",
    "count_head_params",
    "from_preset",
    "generate_presets",
    "list_presets",
    "parse_moe_layers",
    "presets_dir",
    "upcycle",
]
