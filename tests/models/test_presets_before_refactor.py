"""Presets saved by the code before the models/ refactor still load, exactly.

`tests/fixtures/presets_before_refactor/` holds two tiny classifier presets
(a Softmax Token Choice and a Soft MoE V-MoE) saved by the code of commit
71e8916, with every trainable weight perturbed from its initial value (so
the logits depend on all of them, the zero-initialised head included);
their `config.json` and `task.json` name the old module paths
(`keras_vmoe.models.vmoe_backbone`). `images.npy` holds four images and
each preset's `logits.npy` the old model's logits on them. The loader
resolves the classes by their registered names, so the old files build
today's classes, and the weights (paths unchanged) give the same logits.
"""

import pathlib

import keras
import numpy as np
import pytest

from keras_vmoe import models
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
FOLDER = FIXTURES / "presets_before_refactor"


@pytest.mark.parametrize("name", ["tiny_softmax_tc", "tiny_soft"])
def test_preset_saved_before_the_refactor_gives_the_same_logits(name):
    preset = FOLDER / name
    assert "keras_vmoe.models.vmoe_backbone" in (preset / "config.json").read_text()
    model = models.from_preset(str(preset))
    assert isinstance(model, VisionMoEImageClassifier)
    assert isinstance(model.backbone, VisionMoEBackbone)
    images = np.load(FOLDER / "images.npy")
    expected = np.load(preset / "logits.npy")
    assert expected.std() > 0.1  # every weight (the head too) was perturbed
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    # The backbone alone loads the same weights.
    backbone = VisionMoEBackbone.from_preset(str(preset))
    for a, b in zip(backbone.get_weights(), model.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
