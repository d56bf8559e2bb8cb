"""int8 quantization of V-MoE backbones and classifiers, experts included."""

import keras
import numpy as np
import pytest

from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier
from tests.models.tiny import tiny_moe


def _np(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


@pytest.fixture
def images():
    return np.random.RandomState(0).rand(4, 16, 16, 3).astype("float32")


def _classifier(router="soft"):
    backbone = VisionMoEBackbone(**tiny_moe(router))
    model = VisionMoEImageClassifier(backbone, num_classes=3, representation_size=8)
    rng = np.random.RandomState(1)
    for v in model.weights:  # non-trivial weights (the zero head too)
        if v.trainable:
            v.assign(v + rng.normal(0, 0.1, v.shape).astype("float32"))
    return model


def _int8_layers(model):
    return {
        layer.path
        for layer in model._flatten_layers()
        if layer.quantization_mode == "int8"
    }


def test_classifier_quantizes_experts_and_saves_exactly(images, tmp_path):
    model = _classifier()
    expected = _np(model(images))
    model.quantize("int8")
    quantized = _int8_layers(model)
    # Expert kernels, attention and MLP kernels, pre-logits and head.
    assert {
        "encoder_block_1/moe/experts",
        "encoder_block_0/mlp/dense_1",
        "encoder_block_0/attention/query",
        "pre_logits",
        "head",
    } <= quantized
    experts = model.backbone.get_layer("encoder_block_1").mlp.experts
    assert keras.backend.standardize_dtype(experts.output_kernel.dtype) == "int8"
    got = _np(model(images))
    error = np.abs(got - expected).max() / np.abs(expected).max()
    # Tiny model, 2 blocks: int8 rounding (<= 1/254 relative per factor)
    # through ~8 quantized matmuls stays within a few percent.
    assert 0 < error < 0.05, error

    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert _int8_layers(restored) == quantized
    np.testing.assert_array_equal(_np(restored(images)), got)

    preset = str(tmp_path / "preset")
    model.save_to_preset(preset)
    from_preset = VisionMoEImageClassifier.from_preset(preset)
    assert _int8_layers(from_preset) == quantized
    np.testing.assert_array_equal(_np(from_preset(images)), got)


def test_backbone_quantize_and_dtype_policy_map_route(images):
    # Soft MoE: continuous routing, so the comparison with float measures
    # the int8 arithmetic (a Token Choice router may pick another expert
    # where two gates nearly tie).
    backbone = VisionMoEBackbone(**tiny_moe("soft"))
    expected = _np(backbone(images)["pooled_output"])
    backbone.quantize("int8")
    got = _np(backbone(images)["pooled_output"])
    assert np.isfinite(got).all()
    # keras-hub's route: the config records the quantized layers in a
    # DTypePolicyMap; a backbone built from it has int8 variables, and the
    # quantized weights give the same outputs.
    config = backbone.get_config()
    assert isinstance(config["dtype"], dict)
    policy_map = keras.dtype_policies.get(config["dtype"])
    assert policy_map["encoder_block_1/moe/experts"].name == "int8_from_float32"
    rebuilt = VisionMoEBackbone.from_config(config)
    assert _int8_layers(rebuilt) == _int8_layers(backbone)
    rebuilt.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(_np(rebuilt(images)["pooled_output"]), got)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 0 < error < 0.05, error
