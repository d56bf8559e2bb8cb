"""Every built-in preset builds (tiny overrides); S/32 counts at full size."""

import json

import pytest

from keras_vmoe import models
from keras_vmoe.models import (
    VisionMoEBackbone,
    backbone_flops,
    count_backbone_params,
    count_head_params,
)
from keras_vmoe.models.vision_moe import presets

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


@pytest.mark.parametrize("name", NAMES)
def test_stated_counts_are_the_counts_of_the_shipped_config(name):
    """metadata.json's numbers follow from the folder's own config files.

    `count_backbone_params` counts from the config without building (it is
    checked against built models above and in test_backbone.py), so this
    covers the presets too big to build here, H/14 with 32 experts included.
    """
    folder = presets.presets_dir() / name
    backbone = json.loads((folder / "config.json").read_text())["config"]
    task = json.loads((folder / "task.json").read_text())["config"]
    meta = json.loads((folder / "metadata.json").read_text())
    params = count_backbone_params(backbone)
    assert meta["parameter_count"] == params
    head = count_head_params(
        backbone["hidden_dim"], task["num_classes"], task["representation_size"]
    )
    assert meta["classifier_parameter_count"] == params + head
    assert meta["flops_per_image"] == backbone_flops(backbone)


def test_h14_counts_by_hand():
    """ViT-H/14 at 224 (d=1280, mlp 5120, 32 blocks, 16x16 patches + class)."""
    meta = models.list_presets()
    d, h = 1280, 5120
    patch = 14 * 14 * 3 * d + d  # 753,920
    embeddings = d + 257 * d  # class token + position embedding
    mlp = d * h + h + h * d + d  # 13,113,600
    block = 2 * 2 * d + 4 * d * d + 4 * d + mlp  # 19,677,440
    dense = patch + embeddings + 32 * block + 2 * d
    assert dense == 630_764_800
    assert meta["vit_dense_h14_224"]["parameter_count"] == dense
    # + pre-logits 1280x1280 and a 1000-class head: ViT-H/14's 632M + 1.6M.
    head = d * d + d + d * 1000 + 1000
    assert meta["vit_dense_h14_224"]["classifier_parameter_count"] == dense + head
    # V-MoE H/14, every 2nd block of 32 -> 16 MoE blocks, each with 31 more
    # expert MLPs, a 1280x32 gating kernel and 4 routing statistics: 7.14B.
    moe = dense + 16 * (31 * mlp + d * 32 + 4)
    assert moe == 7_135_765_824
    assert meta["vmoe_softmax_tc_h14_e32_224"]["parameter_count"] == moe
    # Soft router: round(2 * 257 / 32) = 16 slots per expert, so a
    # 1280 x 32 x 16 slot embedding and a scale instead of the gating kernel.
    soft = moe + 16 * (d * 32 * 16 + 1 - d * 32)
    assert meta["vmoe_soft_h14_e32_224"]["parameter_count"] == soft
