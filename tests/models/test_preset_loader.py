"""The preset loader is generic: the classes come from the preset's files.

A keras-hub dense ViT preset (another model family) loads through
`keras_vmoe.models.from_preset`, with overrides checked against its own
constructor; the family's own `from_preset` refuses another family's preset.
"""

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe import models
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier, preset_loader

IMAGES = np.random.RandomState(0).rand(2, 16, 16, 3).astype("float32")


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory):
    """A saved keras-hub `ViTImageClassifier` preset, with its logits."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
    )
    model = keras_hub.models.ViTImageClassifier(backbone, num_classes=3)
    head = model.output_dense
    head.kernel.assign(np.random.RandomState(1).normal(size=(8, 3)))
    folder = tmp_path_factory.mktemp("vit") / "preset"
    model.save_to_preset(str(folder))
    return folder, keras.ops.convert_to_numpy(model(IMAGES, training=False))


def test_another_family_loads_with_its_own_classes(vit_preset):
    folder, logits = vit_preset
    model = models.from_preset(str(folder))
    assert type(model) is keras_hub.models.ViTImageClassifier
    out = keras.ops.convert_to_numpy(model(IMAGES, training=False))
    np.testing.assert_allclose(out, logits, atol=1e-6)
    backbone = preset_loader.load_backbone(str(folder))
    assert type(backbone) is keras_hub.models.ViTBackbone
    # Overrides are the preset's classes' arguments.
    small = models.from_preset(
        str(folder), load_weights=False, image_size=8, num_classes=5
    )
    assert small.backbone.image_shape == (8, 8, 3) and small.num_classes == 5
    with pytest.raises(ValueError, match="Unknown preset override 'num_experts'"):
        models.from_preset(str(folder), num_experts=4)


def test_family_from_preset_refuses_another_family(vit_preset):
    folder, _ = vit_preset
    with pytest.raises(
        ValueError, match=r"config\.json.*ViTBackbone.*VisionMoEBackbone"
    ):
        VisionMoEBackbone.from_preset(str(folder))
    with pytest.raises(ValueError, match=r"task\.json.*ViTImageClassifier"):
        VisionMoEImageClassifier.from_preset(str(folder))


def test_task_class_found_from_the_backbone_without_task_json(tmp_path):
    backbone = VisionMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
    )
    backbone.save_to_preset(str(tmp_path))
    assert not (tmp_path / "task.json").exists()
    with pytest.raises(ValueError, match="no `task.json`; pass `num_classes=`"):
        models.from_preset(str(tmp_path))
    model = models.from_preset(str(tmp_path), num_classes=2)
    assert type(model) is VisionMoEImageClassifier
