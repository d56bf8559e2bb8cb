"""Dtype policies given to the backbone and classifier reach every sublayer.

A tiny V-MoE built with `dtype=policy` is compared with the float32 model
holding the same weights: every sublayer (routers and experts included)
computes in the policy's compute dtype and keeps its weights in its
variable dtype, the routers still route in float32, and the outputs stay
close to the float32 outputs. Runs on every backend (a few seconds each).
"""

import keras
import numpy as np
import pytest

from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier
from tests.models.tiny import tiny_moe

# Tolerances on max |policy - float32| / max |float32| of the pooled output,
# with the Soft MoE router (continuous routing, so the comparison measures
# arithmetic, not flipped choices). bfloat16 keeps 8 bits of mantissa
# (relative rounding 2^-9 ~ 2e-3 per operation), float16 11 bits (2^-12 ~
# 2.4e-4); two encoder blocks, LayerNorms and a softmax accumulate some ten
# such roundings, hence 5e-2 and 1e-2 with a margin. The pure "bfloat16"
# policy also rounds the weights.
POLICIES = {"mixed_bfloat16": 5e-2, "mixed_float16": 1e-2, "bfloat16": 5e-2}


def _np(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def _float_dtypes(layer):
    return {
        keras.backend.standardize_dtype(v.dtype)
        for v in layer.weights
        if "float" in keras.backend.standardize_dtype(v.dtype)
    }


@pytest.fixture
def images():
    return np.random.RandomState(0).rand(4, 16, 16, 3).astype("float32")


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_policy_reaches_every_sublayer_and_outputs_stay_close(images, policy_name):
    policy = keras.dtype_policies.get(policy_name)
    backbone = VisionMoEBackbone(**tiny_moe("soft"), dtype=policy_name)
    reference = VisionMoEBackbone(**tiny_moe("soft"))
    # Non-trivial weights everywhere (the zero-initialised class token too).
    rng = np.random.RandomState(1)
    for v in reference.weights:
        v.assign(v + rng.normal(0, 0.05, v.shape).astype("float32"))
    backbone.set_weights(reference.get_weights())

    sublayers = list(backbone._flatten_layers(include_self=False))
    names = {layer.name for layer in sublayers}
    assert {"router", "experts", "moe", "patch_embedding", "conv"} <= names
    for layer in sublayers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        assert layer.compute_dtype == policy.compute_dtype, layer.path
        assert layer.variable_dtype == policy.variable_dtype, layer.path
        assert _float_dtypes(layer) <= {policy.variable_dtype}, layer.path

    moe = backbone.get_layer("encoder_block_1").mlp
    with moe.capture_routing() as routings:
        out = backbone(images)
    for key in ("sequence_output", "pooled_output"):
        assert keras.backend.standardize_dtype(out[key].dtype) == policy.compute_dtype
    # The router routes in float32 whatever the policy.
    dispatch = routings[-1].dispatch_tensor()
    assert keras.backend.standardize_dtype(dispatch.dtype) == "float32"
    spec = backbone.compute_output_spec(images)
    assert spec["pooled_output"].dtype == policy.compute_dtype
    assert tuple(spec["pooled_output"].shape) == (4, 16)

    expected = _np(reference(images)["pooled_output"])
    got = _np(out["pooled_output"])
    assert np.isfinite(got).all()
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= POLICIES[policy_name], error
    # Not the float32 computation itself: the policy changed the arithmetic.
    assert error > 0


def test_sparse_router_policy_and_float32_routing(images):
    """Token Choice under mixed_bfloat16: float32 gates, same shapes."""
    backbone = VisionMoEBackbone(
        **tiny_moe("softmax_token_choice"), dtype="mixed_bfloat16"
    )
    moe = backbone.get_layer("encoder_block_1").mlp
    assert moe.router.compute_dtype == "bfloat16"
    assert moe.router.gating_kernel.dtype == "float32"
    assert moe.experts.intermediate_kernel.dtype == "float32"
    assert moe.load_imbalance.dtype == "float32"  # statistics: variable dtype
    with moe.capture_routing() as routings:
        out = backbone(images)
    routing = routings[-1]
    assert keras.backend.standardize_dtype(routing.slot_weight.dtype) == "float32"
    # The gates are float32 softmax probabilities: each token's kept gates
    # (K = 2 of E = 4, some dropped at this capacity) sum to at most 1.
    weights = _np(routing.combine_tensor()).sum(axis=(2, 3))  # (G, S)
    assert (weights <= 1 + 1e-6).all() and weights.max() > 0.5
    assert keras.backend.standardize_dtype(out["pooled_output"].dtype) == "bfloat16"


def test_dtype_policy_map_gives_each_layer_its_policy(images):
    policy_map = keras.dtype_policies.DTypePolicyMap(default_policy="mixed_bfloat16")
    policy_map["encoder_block_1/moe/experts"] = "float32"
    policy_map["encoder_block_1/moe/router"] = "float32"
    backbone = VisionMoEBackbone(**tiny_moe("softmax_token_choice"), dtype=policy_map)
    moe = backbone.get_layer("encoder_block_1").mlp
    assert moe.experts.path == "encoder_block_1/moe/experts"
    assert moe.experts.compute_dtype == "float32"
    assert moe.router.compute_dtype == "float32"
    assert moe.compute_dtype == "bfloat16"
    assert backbone.get_layer("encoder_block_0").attention.compute_dtype == "bfloat16"
    out = backbone(images)
    assert keras.backend.standardize_dtype(out["pooled_output"].dtype) == "bfloat16"
    # The map survives get_config / from_config.
    revived = VisionMoEBackbone.from_config(backbone.get_config())
    revived_moe = revived.get_layer("encoder_block_1").mlp
    assert revived_moe.experts.compute_dtype == "float32"
    assert revived_moe.router.compute_dtype == "float32"
    assert revived.get_layer("encoder_block_0").attention.compute_dtype == "bfloat16"


def test_classifier_follows_its_backbone_policy(images):
    backbone = VisionMoEBackbone(**tiny_moe("soft"), dtype="mixed_float16")
    model = VisionMoEImageClassifier(
        backbone, num_classes=3, representation_size=8, dtype="mixed_float16"
    )
    for layer in (model.pre_logits, model.head):
        assert (layer.compute_dtype, layer.variable_dtype) == ("float16", "float32")
    logits = model(images)
    assert keras.backend.standardize_dtype(logits.dtype) == "float16"
    assert model.compute_output_spec(images).dtype == "float16"
    with pytest.raises(ValueError, match="backbone's dtype policy"):
        VisionMoEImageClassifier(backbone, num_classes=3, dtype="bfloat16")
