"""Every built-in preset builds (tiny overrides); S/32 counts at full size."""

import json

import pytest

from keras_vmoe import models
from keras_vmoe.models import VisionMoEBackbone, count_backbone_params, presets

NAMES = sorted(presets.preset_definitions())
TINY_OVERRIDES = dict(
    image_size=16, patch_size=4, num_layers=2, hidden_dim=16, mlp_dim=32, num_heads=2
)


@pytest.mark.parametrize("name", ["vit_dense_s32_224", "vmoe_softmax_tc_s32_e32_224"])
def test_stated_count_equals_full_size_model(name):
    backbone = VisionMoEBackbone.from_preset(name)
    stated = models.list_presets()[name]
    assert backbone.count_params() == stated["parameter_count"]
    assert backbone.image_shape == (224, 224, 3)


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_builds_tiny(name):
    overrides = dict(TINY_OVERRIDES)
    config = json.load(open(presets.presets_dir() / name / "config.json"))["config"]
    if config["router"] is not None:
        overrides["num_experts"] = 4
    model = models.from_preset(name, **overrides)
    backbone = model.backbone
    assert backbone.router == config["router"] and backbone.num_layers == 2
    assert backbone.router_config == config["router_config"]
    assert backbone.count_params() == count_backbone_params(backbone.get_config())
    if config["router"] is not None:
        assert backbone.moe_layer_indices in {(1,), (0, 1)}  # every:2, last_odd, last:6
    assert model.num_classes == 1000 and model.get_layer("head").units == 1000
