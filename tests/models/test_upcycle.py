"""Tests of `upcycle`: a dense ViT (keras-hub's or ours) becomes a V-MoE.

The must-show checks of sparse upcycling: with one expert and a capacity
that keeps every token the upcycled model computes the dense model's outputs
(1e-5, every backend); with E experts every expert equals the dense MLP and
every other weight its source; keras-hub options upcycle or fail naming the
option; a saved upcycled preset reloads exactly.
"""

import re

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.models import (
    VisionMoEBackbone,
    VisionMoEImageClassifier,
    VisionMoEImageClassifierPreprocessor,
    from_preset,
    upcycle,
)
from keras_vmoe.models.vision_moe.upcycle import dense_source
from keras_vmoe.routers import ROUTER_NAMES

HUB_TINY = dict(
    image_shape=(16, 16, 3),
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
)
OURS_TINY = dict(HUB_TINY, group_size=2)
# One expert that keeps every token: Token Choice K=1 at capacity factor 1
# (C = ceil(S * 1 * 1.0 / 1) = S slots), Expert Choice at factor 1 (C = S).
KEEP_ALL = {
    "softmax_token_choice": {"num_selected_experts": 1, "capacity_factor": 1.0},
    "softmax_expert_choice": {"capacity_factor": 1.0},
}
# Keras warns that a softmax over one expert is always 1: that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:You are using a softmax over axis")


def _randomize(model, seed=0):
    """Every weight redrawn from N(0, 0.5^2), so biases and norms are not 0/1."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype(v.dtype))


def _images(n=4, seed=1):
    return np.random.default_rng(seed).random((n, 16, 16, 3)).astype("float32")


def _hub_backbone(**options):
    backbone = keras_hub.models.ViTBackbone(**{**HUB_TINY, **options})
    _randomize(backbone)
    return backbone


def _ours_dense(**options):
    backbone = VisionMoEBackbone(**{**OURS_TINY, **options})
    _randomize(backbone)
    return backbone


def _hub_classifier(**options):
    """A keras-hub ViT classifier (3 classes) with every weight redrawn."""
    classifier = keras_hub.models.ViTImageClassifier(
        _hub_backbone(), num_classes=3, intermediate_dim=8, **options
    )
    _randomize(classifier, seed=3)
    return classifier


def _outputs(model, x):
    """One eager inference call (cheaper than compiling `predict`)."""
    out = model(x, training=False)
    if isinstance(out, dict):
        return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}
    return keras.ops.convert_to_numpy(out)


def _sequence(model, x):
    out = _outputs(model, x)
    return out["sequence_output"] if isinstance(out, dict) else out


def _one_expert(dense, router, moe_layers="all"):
    """`dense` upcycled to one expert per MoE block that keeps every token."""
    return upcycle(
        dense,
        router=router,
        num_experts=1,
        moe_layers=moe_layers,
        router_config=KEEP_ALL[router],
        group_size=2,
        seed=0,
    )


@pytest.mark.parametrize("router", sorted(KEEP_ALL))
def test_one_expert_keeps_keras_hub_outputs(router):
    dense = _hub_backbone()
    moe = _one_expert(dense, router)
    x = _images()
    np.testing.assert_allclose(_sequence(moe, x), _sequence(dense, x), atol=1e-5)


@pytest.mark.parametrize("router", sorted(KEEP_ALL))
def test_one_expert_keeps_our_dense_outputs(router):
    dense = _ours_dense()
    moe = _one_expert(dense, router, moe_layers=[0, 1])
    x = _images()
    want, got = _outputs(dense, x), _outputs(moe, x)
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


@pytest.mark.parametrize("router", sorted(ROUTER_NAMES))
def test_every_expert_is_the_dense_mlp_and_the_rest_is_copied(router):
    dense = _ours_dense()
    moe = upcycle(dense, router=router, num_experts=4, moe_layers=[1], seed=0)
    assert moe.router == router and moe.moe_layer_indices == (1,)
    want = {v.path: np.asarray(v) for v in dense.weights}
    block = "encoder_block_1/"
    pairs = {
        "moe/experts/intermediate_kernel": "mlp/dense_1/kernel",
        "moe/experts/intermediate_bias": "mlp/dense_1/bias",
        "moe/experts/output_kernel": "mlp/dense_2/kernel",
        "moe/experts/output_bias": "mlp/dense_2/bias",
    }
    checked = set()
    for v in moe.weights:
        got = np.asarray(v)
        if v.path in want:
            np.testing.assert_array_equal(got, want[v.path], err_msg=v.path)
            checked.add(v.path)
        elif v.path.startswith(block + "moe/experts/"):
            source = block + pairs[v.path[len(block) :]]
            assert got.shape[0] == 4
            for e in range(4):
                np.testing.assert_array_equal(got[e], want[source], err_msg=v.path)
            checked.add(source)
    # Every dense weight went somewhere: copied or into the experts.
    assert checked == set(want)


def _our_path(hub_path):
    """Where a keras-hub ViT weight goes in our backbone (written out by hand)."""
    renames = (
        ("vit_patching_and_embedding/patch_embedding/", "patch_embedding/conv/"),
        ("vit_patching_and_embedding/class_token", "class_token/token"),
        ("vit_patching_and_embedding/position_embedding/", "position_embedding/"),
        ("vit_encoder/ln/", "encoder_norm/"),
    )
    for old, new in renames:
        if hub_path.startswith(old):
            return new + hub_path[len(old) :]
    match = re.fullmatch(r"vit_encoder/transformer_block_(\d+)/(.*)", hub_path)
    rest = match[2].replace("mha/", "attention/", 1)
    return f"encoder_block_{int(match[1]) - 1}/{rest}"


def test_every_keras_hub_weight_lands_on_its_path():
    dense = _hub_backbone()
    moe = upcycle(dense, router="soft", num_experts=2, moe_layers=[1], seed=0)
    ours = {v.path: np.asarray(v) for v in moe.weights}
    experts = {
        "mlp/dense_1/kernel": "moe/experts/intermediate_kernel",
        "mlp/dense_1/bias": "moe/experts/intermediate_bias",
        "mlp/dense_2/kernel": "moe/experts/output_kernel",
        "mlp/dense_2/bias": "moe/experts/output_bias",
    }
    for v in dense.weights:
        hub, path = np.asarray(v), _our_path(v.path)
        block, _, rest = path.partition("/")
        if block == "encoder_block_1" and rest in experts:
            stacked = ours[f"{block}/{experts[rest]}"]
            assert stacked.shape == (2, *hub.shape)
            for e in range(2):
                np.testing.assert_array_equal(stacked[e], hub, err_msg=v.path)
        elif path == "position_embedding/embeddings":
            # keras-hub keeps (T, d); ours (1, T, d).
            np.testing.assert_array_equal(ours[path][0], hub)
        else:
            np.testing.assert_array_equal(ours[path], hub, err_msg=v.path)


def test_non_default_keras_hub_options_upcycle_exactly():
    # No class token (gap pooling), no biases anywhere, another epsilon,
    # non-square patches and image.
    options = dict(
        image_shape=(16, 8, 3),
        patch_size=(4, 2),
        use_class_token=False,
        use_mha_bias=False,
        use_mlp_bias=False,
        use_patch_bias=False,
        layer_norm_epsilon=1e-3,
    )
    dense = _hub_backbone(**options)
    moe = _one_expert(dense, "softmax_token_choice")
    assert not moe.use_class_token and moe.pooling == "gap"
    assert moe.layer_norm_epsilon == 1e-3
    assert moe.layout.patch_grid == (4, 4)
    x = np.random.default_rng(2).random((4, 16, 8, 3)).astype("float32")
    np.testing.assert_allclose(_sequence(moe, x), _sequence(dense, x), atol=1e-5)
    weights = {v.path: np.asarray(v) for v in moe.weights}
    # The missing biases became zeros (2 heads of 8 / 2 = 4 dims).
    np.testing.assert_array_equal(
        weights["encoder_block_0/attention/query/bias"], np.zeros((2, 8))
    )
    np.testing.assert_array_equal(
        weights["encoder_block_1/moe/experts/intermediate_bias"], np.zeros((1, 32))
    )
    np.testing.assert_array_equal(weights["patch_embedding/conv/bias"], np.zeros(16))


def test_channels_first_fails_naming_the_option():
    dense = keras_hub.models.ViTBackbone(
        **{**HUB_TINY, "image_shape": (3, 16, 16)}, data_format="channels_first"
    )
    with pytest.raises(ValueError, match="data_format"):
        upcycle(dense, router="soft", num_experts=2)


def test_keras_hub_classifier_gap_with_class_token_fails_naming_pooling():
    classifier = keras_hub.models.ViTImageClassifier(
        _hub_backbone(), num_classes=3, pooling="gap"
    )
    with pytest.raises(ValueError, match="pooling='gap'"):
        upcycle(classifier, router="soft", num_experts=2)


def test_keras_hub_classifier_keeps_its_logits():
    classifier = _hub_classifier()
    moe = _one_expert(classifier, "softmax_expert_choice")
    assert isinstance(moe, VisionMoEImageClassifier)
    assert moe.representation_size == 8 and moe.num_classes == 3
    x = _images()
    np.testing.assert_allclose(_outputs(moe, x), _outputs(classifier, x), atol=1e-5)


def test_classifier_preprocessor_carries_over():
    # A keras-hub ViT classifier whose converter scales pixels by 1/255 (no
    # offset) and resizes to 16x16: the upcycled classifier prepares raw
    # images the same way, so with one expert that keeps every token its
    # preprocessed logits on 24x20 float images equal the dense ones.
    converter = keras_hub.layers.ImageConverter(image_size=(16, 16), scale=1 / 255)
    classifier = _hub_classifier(
        preprocessor=keras_hub.models.ImageClassifierPreprocessor(
            image_converter=converter
        )
    )
    moe = _one_expert(classifier, "softmax_expert_choice")
    ours = moe.preprocessor.image_converter
    assert ours.image_size == (16, 16)
    assert ours.scale == pytest.approx(1 / 255) and ours.offset is None
    raw = np.random.default_rng(5).uniform(0, 255, (2, 24, 20, 3)).astype("float32")
    expected = _outputs(classifier, classifier.preprocessor(raw))
    np.testing.assert_allclose(
        _outputs(moe, moe.preprocessor(raw)), expected, atol=1e-5
    )
    # Our dense classifier's [-1, 1] converter carries over unchanged.
    dense = VisionMoEImageClassifier(
        _ours_dense(),
        num_classes=3,
        preprocessor=VisionMoEImageClassifierPreprocessor.for_backbone(_ours_dense()),
    )
    upcycled = upcycle(dense, router="soft", num_experts=2, seed=0)
    assert upcycled.preprocessor.image_converter.get_config() == (
        dense.preprocessor.image_converter.get_config()
    )


def test_already_moe_and_no_block_fail():
    moe = VisionMoEBackbone(**OURS_TINY, router="soft", num_experts=2)
    with pytest.raises(ValueError, match="already a V-MoE"):
        upcycle(moe, router="soft", num_experts=2)
    with pytest.raises(ValueError, match="no block"):
        upcycle(_ours_dense(), router="soft", num_experts=2, moe_layers="none")
    with pytest.raises(ValueError, match="ViTBackbone"):
        dense_source(keras.Sequential([keras.layers.Dense(2)]))


def test_expert_noise_and_router_scale():
    dense = _ours_dense()
    moe = upcycle(
        dense,
        router="softmax_token_choice",
        num_experts=8,
        moe_layers=[1],
        expert_noise=0.1,
        router_init_stddev=0.01,
        seed=0,
    )
    layer = moe.get_layer("encoder_block_1").mlp
    kernel = np.asarray(layer.experts.intermediate_kernel)  # (8, 16, 32)
    dense_kernel = np.asarray(dense.get_layer("encoder_block_1").mlp.dense_1.kernel)
    noise = kernel - dense_kernel[None]
    # The noise has std 0.1 * std(dense kernel), independently per expert
    # (8 * 16 * 32 = 4096 draws: the sample std is within 5% of it).
    np.testing.assert_allclose(noise.std(), 0.1 * dense_kernel.std(), rtol=0.05)
    assert not np.allclose(noise[0], noise[1])
    # Biases are copied exactly.
    np.testing.assert_array_equal(
        np.asarray(layer.experts.intermediate_bias)[3],
        np.asarray(dense.get_layer("encoder_block_1").mlp.dense_1.bias),
    )
    gating = np.asarray(layer.router.gating_kernel)  # (16, 8): 128 draws
    assert abs(gating.std() - 0.01) < 0.002
    # The same seed gives the same model.
    again = upcycle(
        dense,
        router="softmax_token_choice",
        num_experts=8,
        moe_layers=[1],
        expert_noise=0.1,
        router_init_stddev=0.01,
        seed=0,
    )
    for a, b in zip(moe.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saved_upcycled_preset_reloads_exactly(tmp_path):
    dense = VisionMoEImageClassifier(
        _ours_dense(), num_classes=3, representation_size=8
    )
    _randomize(dense, seed=4)
    dense_dir = tmp_path / "dense"
    dense.save_to_preset(str(dense_dir))
    moe = upcycle(str(dense_dir), router="softmax_token_choice", num_experts=2, seed=0)
    assert isinstance(moe, VisionMoEImageClassifier)
    x = _images()
    # The dense classifier's head is copied.
    np.testing.assert_array_equal(
        np.asarray(moe.get_layer("head").kernel),
        np.asarray(dense.get_layer("head").kernel),
    )
    out_dir = tmp_path / "moe"
    moe.save_to_preset(str(out_dir))
    reloaded = from_preset(str(out_dir))
    for a, b in zip(moe.weights, reloaded.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    np.testing.assert_array_equal(_outputs(reloaded, x), _outputs(moe, x))


def test_keras_hub_preset_folder_upcycles(tmp_path):
    classifier = keras_hub.models.ViTImageClassifier(_hub_backbone(), num_classes=3)
    _randomize(classifier, seed=5)
    classifier.save_to_preset(str(tmp_path / "vit"))
    moe = _one_expert(str(tmp_path / "vit"), "softmax_token_choice")
    x = _images()
    np.testing.assert_allclose(_outputs(moe, x), _outputs(classifier, x), atol=1e-5)
