"""get_config round trips, `.keras` files and keras-hub preset folders."""

import inspect
import json
import os

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe import models
from keras_vmoe.models import (
    VisionMoEBackbone,
    VisionMoEImageClassifier,
    VisionMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vision_moe.presets import preset_files
from tests.models.tiny import TINY, tiny_moe

BACKBONE_ARGS = dict(
    tiny_moe("softmax_token_choice"),
    moe_layers="last_odd:1",
    expert_hidden_dim=24,
    identical_expert_init=True,
    dropout_rate=0.1,
    attention_dropout=0.05,
    expert_dropout_rate=0.0,
    layer_norm_epsilon=1e-5,
    use_class_token=False,
    pooling="gap",
    tokens_per_group=16,  # one image of 16 patches per group; 2 per batch unit
    attention_qk_norm=True,
    mlp_activation="gelu_approximate",
    bfloat16_dispatch=True,
    # Not the default None (Keras' global setting); channels_first round
    # trips in test_shapes_and_data_format.py.
    data_format="channels_last",
)
CLASSIFIER_ARGS = dict(
    num_classes=3,
    representation_size=8,
    activation="sigmoid",
    loss_type="sigmoid",
    head_bias_init=-2.0,
    dropout=0.1,
    head_dtype="float32",
)


def _constructor_defaults(cls):
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p.default
        for name, p in params.items()
        if name not in ("self", "kwargs", "dtype", "backbone", "preprocessor")
    }


def _predict(model, images):
    out = model(images, training=False)  # eager: no per-model compilation
    out = out["sequence_output"] if isinstance(out, dict) else out
    return keras.ops.convert_to_numpy(out)


def test_test_arguments_cover_every_constructor_argument():
    """Each argument is set to a non-default value, so a dropped one shows."""
    for cls, args in (
        (VisionMoEBackbone, BACKBONE_ARGS),
        (VisionMoEImageClassifier, CLASSIFIER_ARGS),
    ):
        for name, default in _constructor_defaults(cls).items():
            assert name in args, f"{cls.__name__}({name}=...) is not tested"
            assert args[name] != default, f"{cls.__name__}: {name} is the default"


def test_get_config_round_trips_every_argument():
    backbone = VisionMoEBackbone(**BACKBONE_ARGS)
    config = backbone.get_config()
    for key, value in BACKBONE_ARGS.items():
        assert config[key] == value, key
    clone = VisionMoEBackbone.from_config(json.loads(json.dumps(config)))
    assert clone.get_config() == json.loads(json.dumps(config)) | {
        "image_shape": tuple(BACKBONE_ARGS["image_shape"])
    }
    assert clone.count_params() == backbone.count_params()
    classifier = VisionMoEImageClassifier(backbone, **CLASSIFIER_ARGS)
    config = classifier.get_config()
    for key, value in CLASSIFIER_ARGS.items():
        assert config[key] == value, key
    clone = VisionMoEImageClassifier.from_config(json.loads(json.dumps(config)))
    assert clone.get_config()["backbone"]["config"] == backbone.get_config()
    for key, value in CLASSIFIER_ARGS.items():
        assert clone.get_config()[key] == value, key


def test_head_dtype_round_trips_under_mixed_precision():
    backbone = VisionMoEBackbone(**TINY, dtype="mixed_bfloat16")
    for head_dtype, expected in (
        ("float32", "float32"),
        (keras.DTypePolicy("float16"), "float16"),
        (None, "mixed_bfloat16"),  # the backbone's policy
    ):
        model = VisionMoEImageClassifier(backbone, num_classes=2, head_dtype=head_dtype)
        config = json.loads(json.dumps(model.get_config()))
        # (from_config replaces the backbone entry of the dict it is given.)
        clone = VisionMoEImageClassifier.from_config(json.loads(json.dumps(config)))
        for m in (model, clone):
            assert m.get_layer("head").dtype_policy.name == expected
            assert m.get_layer("pre_logits").dtype_policy.name == expected
        assert json.loads(json.dumps(clone.get_config())) == config


@pytest.mark.parametrize("router", [None, "softmax_token_choice"])
def test_keras_file_round_trip(tmp_path, images, router):
    args = dict(BACKBONE_ARGS, router=router) if router else dict(TINY)
    if not router:
        args["pooling"] = "gap"
    model = VisionMoEImageClassifier(VisionMoEBackbone(**args), **CLASSIFIER_ARGS)
    rng = np.random.RandomState(0)
    model.get_layer("head").kernel.assign(rng.normal(size=(8, 3)).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    expected = _predict(model, images)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, VisionMoEImageClassifier)
    np.testing.assert_array_equal(_predict(loaded, images), expected)
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)  # compile restored


def test_preset_round_trip_and_keras_hub_loader(tmp_path, images):
    backbone = VisionMoEBackbone(**BACKBONE_ARGS)
    model = VisionMoEImageClassifier(backbone, **CLASSIFIER_ARGS)
    rng = np.random.RandomState(0)
    model.get_layer("head").kernel.assign(rng.normal(size=(8, 3)).astype("float32"))
    expected = _predict(model, images)
    model.save_to_preset(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"config.json", "metadata.json", "task.json", "model.weights.h5"} <= files
    # Our loaders.
    for loaded in (
        models.from_preset(str(tmp_path)),
        VisionMoEImageClassifier.from_preset(str(tmp_path)),
        keras_hub.models.ImageClassifier.from_preset(str(tmp_path)),
    ):
        assert isinstance(loaded, VisionMoEImageClassifier)
        np.testing.assert_array_equal(_predict(loaded, images), expected)
    features = _predict(backbone, images)
    for loaded in (
        VisionMoEBackbone.from_preset(str(tmp_path)),
        keras_hub.models.Backbone.from_preset(str(tmp_path)),
    ):
        assert isinstance(loaded, VisionMoEBackbone)
        np.testing.assert_array_equal(_predict(loaded, images), features)
    # A new head (num_classes override) keeps the backbone weights.
    new_head = models.from_preset(str(tmp_path), num_classes=5)
    assert new_head.get_layer("head").units == 5
    np.testing.assert_array_equal(_predict(new_head.backbone, images), features)


def test_generated_json_matches_save_to_preset(tmp_path):
    """Preset files written without building equal what keras-hub writes."""
    backbone = VisionMoEBackbone(**BACKBONE_ARGS)
    preprocessor = VisionMoEImageClassifierPreprocessor.for_backbone(backbone)
    VisionMoEImageClassifier(
        backbone, preprocessor=preprocessor, **CLASSIFIER_ARGS
    ).save_to_preset(str(tmp_path))
    generated = preset_files("x", "tiny", BACKBONE_ARGS, CLASSIFIER_ARGS)
    for filename in (
        "config.json",
        "task.json",
        "preprocessor.json",
        "image_converter.json",
    ):
        with open(tmp_path / filename) as f:
            saved = json.load(f)
        ours = json.loads(json.dumps(generated[filename]))
        for doc in (saved, ours):  # the dtype policy is left to the loader
            cfg = doc["config"]
            cfg.get("backbone", {}).get("config", {}).pop("dtype", None)
            cfg.pop("dtype", None)
        assert ours == saved, filename
    with open(tmp_path / "metadata.json") as f:
        saved_meta = json.load(f)
    assert (
        generated["metadata.json"]["parameter_count"] == saved_meta["parameter_count"]
    )


def test_sharded_preset_round_trip(tmp_path, images):
    """A preset saved in shards (keras-hub's `max_shard_size`) loads exactly."""
    backbone = VisionMoEBackbone(**BACKBONE_ARGS)
    model = VisionMoEImageClassifier(backbone, **CLASSIFIER_ARGS)
    expected = _predict(backbone, images)
    # 2e-5 GB = 21,475 bytes; the backbone's weights are larger, so shards.
    assert backbone.count_params() * 4 > 2e-5 * 1024**3
    model.save_to_preset(str(tmp_path), max_shard_size=2e-5)
    files = set(os.listdir(tmp_path))
    assert "model.weights.json" in files and "model.weights.h5" not in files
    assert {"model_00000.weights.h5", "model_00001.weights.h5"} <= files
    for loaded in (
        models.from_preset(str(tmp_path)).backbone,
        VisionMoEBackbone.from_preset(str(tmp_path)),
        keras_hub.models.Backbone.from_preset(str(tmp_path)),
    ):
        np.testing.assert_array_equal(_predict(loaded, images), expected)
