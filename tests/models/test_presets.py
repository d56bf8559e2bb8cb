"""Built-in presets: listing, generation, tiny builds, counts, bad inputs."""

import json
import shutil

import keras_hub
import numpy as np
import pytest

from keras_vmoe import models
from keras_vmoe.models import VisionMoEBackbone
from keras_vmoe.models.vision_moe import presets
from keras_vmoe.routers import ROUTER_NAMES

NAMES = sorted(presets.preset_definitions())
TINY_OVERRIDES = dict(
    image_size=16, patch_size=4, num_layers=2, hidden_dim=16, mlp_dim=32, num_heads=2
)


def test_preset_names():
    expected = {"soft_moe_s16_e128_224", "soft_moe_b16_e128_224"}
    for size in ("s32", "b32", "b16", "l16", "h14"):
        expected.add(f"vit_dense_{size}_224")
        for router in (
            "softmax_tc",
            "sinkhorn_tc",
            "softmax_ec",
            "sinkhorn_ec",
            "sparsity_ec",
            "soft",
        ):
            expected.add(f"vmoe_{router}_{size}_e32_224")
    assert set(NAMES) == expected
    listed = models.list_presets()
    assert sorted(listed) == NAMES
    for name, meta in listed.items():
        assert meta["description"] and meta["name"] == name
        assert meta["parameter_count"] > 0 and meta["flops_per_image"] > 0
    routers = {meta["router"] for meta in listed.values()}
    assert routers == set(ROUTER_NAMES) | {None}
    assert set(keras_hub.models.Backbone.presets) >= set(NAMES)  # registered


def test_preset_folders_are_up_to_date(tmp_path):
    """The shipped JSON files are exactly what the generator writes."""
    presets.generate_presets(tmp_path)
    for name in NAMES:
        for filename in (
            "config.json",
            "task.json",
            "preprocessor.json",
            "image_converter.json",
            "metadata.json",
        ):
            with open(tmp_path / name / filename) as f:
                generated = json.load(f)
            with open(presets.presets_dir() / name / filename) as f:
                shipped = json.load(f)
            assert shipped == generated, f"{name}/{filename}: run presets/generate.py"


def test_known_sizes_and_placements():
    meta = models.list_presets()
    # Dense ViT-B/16: 85.8M parameters (as keras-hub's ViT-B/16 backbone).
    assert meta["vit_dense_b16_224"]["parameter_count"] == 85_798_656
    # ViT-B/16 at 224: 197 tokens, ~17.6 G multiply-adds.
    assert meta["vit_dense_b16_224"]["sequence_length"] == 197
    assert 34e9 < meta["vit_dense_b16_224"]["flops_per_image"] < 36e9
    assert meta["vmoe_softmax_tc_s32_e32_224"]["moe_layers"] == [5, 7]  # last 2 odd
    assert meta["vmoe_softmax_ec_b16_e32_224"]["moe_layers"] == [1, 3, 5, 7, 9, 11]
    assert meta["vmoe_sinkhorn_tc_h14_e32_224"]["moe_layers"] == list(range(1, 32, 2))
    assert meta["soft_moe_b16_e128_224"]["moe_layers"] == list(range(6, 12))
    assert meta["soft_moe_s16_e128_224"]["sequence_length"] == 196  # no class token
    # H/14 with 32 experts in 16 blocks: billions of weights, counted not built.
    assert meta["vmoe_softmax_tc_h14_e32_224"]["parameter_count"] > 7e9


@pytest.mark.parametrize(
    "name",
    ["vmoe_sparsity_ec_s32_e32_224", "soft_moe_s16_e128_224", "vit_dense_b32_224"],
)
def test_preset_forward_pass(name):
    model = models.from_preset(
        name, num_classes=4, num_experts=4, group_size=1, **TINY_OVERRIDES
    )
    images = np.random.RandomState(0).rand(2, 16, 16, 3).astype("float32")
    logits = model.predict(images, batch_size=2, verbose=0)
    assert logits.shape == (2, 4) and np.isfinite(logits).all()


def test_overrides():
    model = models.from_preset(
        "vmoe_softmax_tc_b16_e32_224",
        router="softmax_expert_choice",
        num_classes=7,
        **TINY_OVERRIDES,
    )
    backbone = model.backbone
    assert backbone.router == "softmax_expert_choice"
    assert backbone.router_config is None  # reset to the new router's defaults
    assert backbone.num_experts == 32 and backbone.image_shape == (16, 16, 3)
    dense = VisionMoEBackbone.from_preset(
        "vmoe_soft_b16_e32_224", router=None, **TINY_OVERRIDES
    )
    assert dense.router is None and dense.moe_layer_indices == ()
    moe = VisionMoEBackbone.from_preset(
        "vit_dense_b16_224",
        router="soft",
        num_experts=4,
        group_size=1,
        **TINY_OVERRIDES,
    )
    assert moe.moe_layer_indices == (1,)
    hub = keras_hub.models.Backbone.from_preset(
        "vit_dense_s32_224",
        load_weights=False,
        num_layers=1,
        hidden_dim=8,
        mlp_dim=8,
        num_heads=2,
    )
    assert isinstance(hub, VisionMoEBackbone) and hub.num_layers == 1


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(num_clases=3), ValueError, "Did you mean num_classes"),
        (dict(router="sinkhorn_tokn_choice"), ValueError, "Did you mean"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(image_size=15), ValueError, "divisible"),
        (dict(moe_layers="first:2"), ValueError, "Unknown MoE placement"),
    ],
)
def test_bad_overrides(overrides, error, message):
    kwargs = {**TINY_OVERRIDES, "num_experts": 4, **overrides}
    with pytest.raises(error, match=message):
        models.from_preset("vmoe_softmax_tc_s32_e32_224", **kwargs)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match="vmoe_softmax_ec_b16_e32_224"):
        models.from_preset("vmoe_softmax_ec_b16_e23_224")
    with pytest.raises(ValueError, match="Unknown preset"):
        VisionMoEBackbone.from_preset("resnet_50")


def _copy(name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(presets.presets_dir() / name, folder)
    return folder


def test_broken_preset_folders_name_the_file(tmp_path):
    folder = _copy("vit_dense_s32_224", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_preset(str(folder))
    folder = _copy("vmoe_softmax_ec_s32_e32_224", tmp_path)
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="metadata.json"):
        models.from_preset(str(folder), **TINY_OVERRIDES)
    (folder / "metadata.json").unlink()
    (folder / "task.json").write_text('{"class_name": "Dense", "config": {}}')
    with pytest.raises(ValueError, match="task.json"):
        models.from_preset(str(folder), **TINY_OVERRIDES)
    (folder / "task.json").unlink()
    with pytest.raises(ValueError, match="num_classes"):
        models.from_preset(str(folder), **TINY_OVERRIDES)
    (folder / "config.json").write_text(
        '{"config": {}, "registered_name": "keras_vmoe>Nope"}'
    )
    with pytest.raises(ValueError, match="config.json"):
        VisionMoEBackbone.from_preset(str(folder))


def test_corrupt_weights_name_the_file(tmp_path):
    folder = _copy("vit_dense_s32_224", tmp_path)
    (folder / "model.weights.h5").write_bytes(b"not an h5 file")
    small = dict(TINY_OVERRIDES, num_classes=2)
    with pytest.raises(ValueError, match="model.weights.h5"):
        models.from_preset(str(folder), **small)
    models.from_preset(str(folder), load_weights=False, **small)  # skips the file


def _saved_preset(tmp_path, max_shard_size=10):
    folder = tmp_path / "saved"
    backbone = VisionMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
    )
    model = models.VisionMoEImageClassifier(backbone, num_classes=2)
    model.save_to_preset(str(folder), max_shard_size=max_shard_size)
    return folder


def test_missing_weights_name_the_file(tmp_path):
    """A saved preset without its weights fails; architecture presets do not."""
    folder = _saved_preset(tmp_path)
    (folder / "model.weights.h5").unlink()
    for load in (models.from_preset, VisionMoEBackbone.from_preset):
        with pytest.raises(FileNotFoundError, match="model.weights.h5"):
            load(str(folder))
        load(str(folder), load_weights=False)  # random weights, on request
    # Built-in presets say `"weights": null` in metadata.json: no file needed.
    assert models.list_presets()["vit_dense_s32_224"]["weights"] is None
    copy = _copy("vit_dense_s32_224", tmp_path)
    assert not any(p.name.endswith(".h5") for p in copy.iterdir())
    models.from_preset(str(copy), num_classes=2, **TINY_OVERRIDES)
    # Without that statement (here: no metadata.json), weights are expected.
    (copy / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.weights.h5"):
        models.from_preset(str(copy), num_classes=2, **TINY_OVERRIDES)


def test_broken_sharded_weights_name_the_file(tmp_path):
    folder = _saved_preset(tmp_path, max_shard_size=2e-6)  # 2,147-byte shards
    shards = sorted(p.name for p in folder.glob("model_*.weights.h5"))
    assert len(shards) >= 2 and not (folder / "model.weights.h5").exists()
    (folder / shards[1]).write_bytes(b"truncated")
    with pytest.raises(models.PresetFileError, match=shards[1]):
        VisionMoEBackbone.from_preset(str(folder))
    (folder / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        models.from_preset(str(folder))
    (folder / "model.weights.json").write_text('{"weight_map": ')
    with pytest.raises(models.PresetFileError, match="model.weights.json"):
        models.from_preset(str(folder))
