"""VisionMoEBackbone: structure, weight paths, numerics, parameter counts."""

import keras
import numpy as np
import pytest
from scipy.special import erf

from keras_vmoe.models import VisionMoEBackbone, count_backbone_params
from keras_vmoe.routers import ROUTER_NAMES
from tests.models.tiny import TINY, tiny_moe


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _layer_norm(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _numpy_vit(
    w,
    x,
    patch,
    num_layers,
    num_heads,
    use_class_token=True,
    qk_norm=False,
    gelu_tanh=False,
):
    """An independent NumPy forward pass of a dense pre-norm ViT.

    `qk_norm`: flax's `normalize_qk` (LayerNorm over each head's queries and
    keys, scale only); `gelu_tanh`: flax's default tanh-approximated GELU.
    """
    b, h, wd, c = x.shape
    kernel, bias = w["patch_embedding/conv/kernel"], w["patch_embedding/conv/bias"]
    d = kernel.shape[-1]
    p = x.reshape(b, h // patch, patch, wd // patch, patch, c).transpose(
        0, 1, 3, 2, 4, 5
    )
    t = p.reshape(b, -1, patch * patch * c) @ kernel.reshape(-1, d) + bias
    if use_class_token:
        cls = np.broadcast_to(w["class_token/token"], (b, 1, d))
        t = np.concatenate([cls, t], axis=1)
    t = t + w["position_embedding/embeddings"]
    for i in range(num_layers):
        pre = f"encoder_block_{i}/"
        y = _layer_norm(t, w[pre + "ln_1/gamma"], w[pre + "ln_1/beta"])
        q, k, v = (
            np.einsum("btd,dhk->bthk", y, w[pre + f"attention/{n}/kernel"])
            + w[pre + f"attention/{n}/bias"]
            for n in ("query", "key", "value")
        )
        if qk_norm:
            q = _layer_norm(q, w[pre + "attention/query_norm/gamma"], 0.0)
            k = _layer_norm(k, w[pre + "attention/key_norm/gamma"], 0.0)
        logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(d // num_heads)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bhqt,bthk->bqhk", probs, v)
        o = np.einsum("bqhk,hkd->bqd", o, w[pre + "attention/attention_output/kernel"])
        t = t + o + w[pre + "attention/attention_output/bias"]
        y = _layer_norm(t, w[pre + "ln_2/gamma"], w[pre + "ln_2/beta"])
        y = y @ w[pre + "mlp/dense_1/kernel"] + w[pre + "mlp/dense_1/bias"]
        if gelu_tanh:
            y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
        else:
            y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
        t = t + y @ w[pre + "mlp/dense_2/kernel"] + w[pre + "mlp/dense_2/bias"]
    return _layer_norm(t, w["encoder_norm/gamma"], w["encoder_norm/beta"])


# ("gap" with a class token is worked by hand in SequencePooling's example.)
@pytest.mark.parametrize("pooling, use_class_token", [("token", True), ("gap", False)])
def test_dense_backbone_matches_numpy(images, pooling, use_class_token):
    backbone = VisionMoEBackbone(
        **TINY, pooling=pooling, use_class_token=use_class_token
    )
    rng = np.random.RandomState(1)
    for v in backbone.weights:  # non-trivial values everywhere (class token, biases)
        v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
    weights = {v.path: v.numpy() for v in backbone.weights}
    out = backbone(images)
    expected = _numpy_vit(weights, images.astype("float64"), 4, 2, 2, use_class_token)
    np.testing.assert_allclose(
        _np(out["sequence_output"]), expected, atol=2e-4, rtol=1e-4
    )
    pooled = (
        expected[:, 0]
        if pooling == "token"
        else expected[:, int(use_class_token) :].mean(1)
    )
    np.testing.assert_allclose(_np(out["pooled_output"]), pooled, atol=2e-4, rtol=1e-4)
    assert out["sequence_output"].shape == (4, 16 + int(use_class_token), 16)


def test_reference_initialisation():
    backbone = VisionMoEBackbone(
        **tiny_moe("softmax_expert_choice"), identical_expert_init=True
    )
    w = {v.path: v.numpy() for v in backbone.weights}
    np.testing.assert_array_equal(w["class_token/token"], 0.0)  # zeros, as vmoe
    assert 0.01 < w["position_embedding/embeddings"].std() < 0.03  # N(0, 0.02)
    assert np.abs(w["encoder_block_0/mlp/dense_1/bias"]).max() < 1e-4  # N(0, 1e-6)
    for name in ("intermediate_kernel", "output_kernel"):
        kernel = w[f"encoder_block_1/moe/experts/{name}"]
        assert kernel.shape[0] == 4
        for e in range(1, 4):  # identical experts, as the reference
            np.testing.assert_array_equal(kernel[e], kernel[0])


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_moe_backbone_builds_and_calls(images, router):
    config = tiny_moe(router)
    backbone = VisionMoEBackbone(**config)
    assert backbone.moe_layer_indices == (1,)
    paths = [v.path for v in backbone.weights]
    assert any(p.startswith("encoder_block_1/moe/router/") for p in paths)
    assert "encoder_block_1/moe/experts/intermediate_kernel" in paths
    assert "encoder_block_0/mlp/dense_1/kernel" in paths
    assert not any(p.startswith("encoder_block_0/moe") for p in paths)
    kernel = backbone.get_layer("encoder_block_1").mlp.experts.intermediate_kernel
    assert tuple(kernel.shape) == (4, 16, 32)  # expert_hidden_dim = mlp_dim
    for training in (False, True):
        out = backbone(images, training=training)
        seq, pooled = _np(out["sequence_output"]), _np(out["pooled_output"])
        assert seq.shape == (4, 17, 16) and pooled.shape == (4, 16)
        assert np.isfinite(seq).all()
        np.testing.assert_allclose(pooled, seq[:, 0], atol=1e-6)
    assert backbone.count_params() == count_backbone_params(config)


def test_moe_options_reach_the_layers():
    config = tiny_moe(
        "softmax_token_choice",
        moe_layers="every:1",
        expert_hidden_dim=8,
        group_size=4,
        router_config={"num_selected_experts": 1, "capacity_factor": 1.5},
    )
    backbone = VisionMoEBackbone(**config)
    assert backbone.moe_layer_indices == (0, 1)
    moe = backbone.get_layer("encoder_block_0").mlp
    assert moe.group_size == 4 * 17  # images -> tokens
    assert moe.router.num_selected_experts == 1 and moe.router.capacity_factor == 1.5
    assert tuple(moe.experts.output_kernel.shape) == (4, 8, 16)
    assert backbone.count_params() == count_backbone_params(config)


def test_layout_is_derived_once_and_read_everywhere():
    """`backbone.layout` (what the graph used), `layout_from_config` (no
    build) and the cost model's resolved config agree."""
    from keras_vmoe.models import VisionMoELayout
    from keras_vmoe.models.vision_moe.cost import resolve_backbone_config

    config = tiny_moe(
        "softmax_token_choice",
        image_shape=(16, 8, 3),
        moe_layers="every:1",
        expert_hidden_dim=8,
        group_size=4,
        use_class_token=False,
        pooling="gap",
    )
    backbone = VisionMoEBackbone(**config)
    expected = VisionMoELayout(
        image_shape=(16, 8, 3),
        patch_size=(4, 4),
        patch_grid=(4, 2),
        num_patches=8,
        sequence_length=8,
        moe_layer_indices=(0, 1),
        tokens_per_group=32,
        expert_hidden_dim=8,
    )
    assert backbone.layout == expected
    assert VisionMoEBackbone.layout_from_config(config) == expected
    assert VisionMoEBackbone.layout_from_config(backbone.get_config()) == expected
    assert backbone.get_layer("encoder_block_0").mlp.group_size == 32
    resolved = resolve_backbone_config(config)
    assert {k: resolved[k] for k in expected._fields} == expected._asdict()
    dense = VisionMoEBackbone.layout_from_config(TINY)
    assert dense.moe_layer_indices == () and dense.tokens_per_group is None
    assert dense.sequence_length == 17 and dense.expert_hidden_dim is None
    with pytest.raises(ValueError, match="'num_expert'.*Did you mean 'num_experts'"):
        VisionMoEBackbone.layout_from_config(dict(TINY, num_expert=4))


def test_default_placement_and_a_partial_group():
    backbone = VisionMoEBackbone(
        **dict(tiny_moe("softmax_expert_choice"), moe_layers=None)
    )
    assert backbone.moe_layer_indices == (1,)  # "every:2" by default
    # 3 images, groups of 2: the third is routed as a batch of its own.
    images = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype("float32")
    pooled = keras.ops.convert_to_numpy(backbone(images)["pooled_output"])
    alone = keras.ops.convert_to_numpy(backbone(images[2:])["pooled_output"])
    np.testing.assert_allclose(pooled[2:], alone, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router=None, moe_layers="every:2"), "needs a `router`"),
        (dict(router="softmax_expert_choise"), "Did you mean"),
        (dict(num_experts=None), "num_experts"),
        (dict(group_size=0), "group_size"),
        (dict(pooling="token", use_class_token=False), "use_class_token"),
        (dict(pooling="max"), "pooling"),
        (dict(image_shape=(18, 16, 3)), "divisible"),
        (dict(image_shape=(16, 16)), "image_shape"),
        (dict(num_heads=3), "divisible by num_heads"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        VisionMoEBackbone(**{**tiny_moe("softmax_expert_choice"), **overrides})


def test_analytic_parameter_count_by_hand():
    # d=8, h=16, 16x16x3 images, patch 4 -> 16 patches + class token.
    config = dict(TINY, num_layers=1, hidden_dim=8, mlp_dim=16)
    patch = 4 * 4 * 3 * 8 + 8
    embeddings = 8 + 17 * 8
    block = 4 * 8 + (4 * 8 * 8 + 4 * 8) + (8 * 16 + 16 + 16 * 8 + 8)
    assert count_backbone_params(config) == patch + embeddings + block + 2 * 8
    assert VisionMoEBackbone(**config).count_params() == patch + embeddings + block + 16


def test_mixed_precision_dense(images):
    backbone = VisionMoEBackbone(**TINY, dtype="mixed_bfloat16")
    out = backbone(images)
    assert keras.backend.standardize_dtype(out["sequence_output"].dtype) == "bfloat16"
    assert all(v.dtype == "float32" for v in backbone.weights)
    reference = VisionMoEBackbone(**TINY)
    reference.set_weights(backbone.get_weights())
    expected = _np(reference(images)["sequence_output"])
    got = _np(keras.ops.cast(out["sequence_output"], "float32"))
    np.testing.assert_allclose(got, expected, atol=0.1)


def test_qk_norm_and_tanh_gelu_match_numpy(images):
    """vmoe's attention_qk_norm and flax's tanh GELU, against NumPy."""
    backbone = VisionMoEBackbone(
        **TINY, attention_qk_norm=True, mlp_activation="gelu_approximate"
    )
    rng = np.random.RandomState(2)
    for v in backbone.weights:  # large MLP inputs, where the two GELUs differ
        v.assign(rng.normal(scale=1.0, size=v.shape).astype("float32"))
    weights = {v.path: v.numpy() for v in backbone.weights}
    assert weights["encoder_block_1/attention/query_norm/gamma"].shape == (8,)
    out = _np(backbone(images)["sequence_output"])
    x = images.astype("float64")
    expected = _numpy_vit(weights, x, 4, 2, 2, qk_norm=True, gelu_tanh=True)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)
    # Each option changes the output (so each is really applied).
    for qk_norm, gelu_tanh in ((False, True), (True, False)):
        other = _numpy_vit(weights, x, 4, 2, 2, qk_norm=qk_norm, gelu_tanh=gelu_tanh)
        assert np.abs(other - expected).max() > 1e-4  # 2.7e-4 for the GELU
    assert backbone.count_params() == count_backbone_params(
        dict(TINY, attention_qk_norm=True)
    )
    # The sharding rules cover the new weights (replicated on purpose).
    from keras_vmoe.models.vision_moe.layout_map import check_layouts

    mesh = keras.distribution.DeviceMesh(
        shape=(1, 1), axis_names=("batch", "expert"), devices=["cpu:0"]
    )
    layout_map = VisionMoEBackbone.get_layout_map(mesh)
    assert check_layouts(backbone, layout_map, check_values=False) == []
    config = backbone.get_config()
    assert (
        config["attention_qk_norm"] and config["mlp_activation"] == "gelu_approximate"
    )
    clone = VisionMoEBackbone.from_config(config)
    clone.set_weights(backbone.get_weights())
    np.testing.assert_allclose(_np(clone(images)["sequence_output"]), out, atol=1e-6)


@pytest.mark.parametrize(
    "tokens_per_group, group_size, pooling",
    [
        (17, 1, "token"),  # one image per group, in tokens
        (8, 1, "gap"),  # half an image of 16 tokens
        (24, 3, "gap"),  # 1.5 images: 3 images fill 2 groups
    ],
)
def test_tokens_per_group(images, tokens_per_group, group_size, pooling):
    config = tiny_moe(
        "soft",
        router_config={"num_slots": 2},
        tokens_per_group=tokens_per_group,
        group_size=group_size,
        pooling=pooling,
        use_class_token=pooling == "token",
    )
    backbone = VisionMoEBackbone(**config)
    assert backbone.layout.tokens_per_group == tokens_per_group
    moe = backbone.get_layer("encoder_block_1").mlp
    assert moe.group_size == tokens_per_group
    x = np.concatenate([images, images[:2]])[: 2 * group_size]
    with moe.capture_routing() as routings:
        backbone(x)
    tokens = x.shape[0] * backbone.sequence_length
    assert tuple(routings[-1].dispatch_tensor().shape) == (
        tokens // tokens_per_group,
        tokens_per_group,
        4,
        2,
    )
    # FLOPs per image charge the routing groups pro rata: the same per token
    # as a backbone whose groups are whole images of the same token count.
    assert backbone.count_params() == count_backbone_params(config)


def test_tokens_per_group_is_the_same_as_whole_images(images):
    """`tokens_per_group = group_size * T` is the default, exactly."""
    from keras_vmoe.models import backbone_flops

    base = tiny_moe("softmax_token_choice")
    a = VisionMoEBackbone(**base)
    b = VisionMoEBackbone(**base, tokens_per_group=2 * 17)
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(
        _np(a(images)["sequence_output"]), _np(b(images)["sequence_output"])
    )
    assert backbone_flops(base) == backbone_flops(dict(base, tokens_per_group=34))
    # Groups of one image with the same explicit capacity (C = 17, E = 4):
    # twice the groups per image, so twice the expert FLOPs (2 * d * h MACs
    # per slot); the router's FLOPs per token do not change.
    half = backbone_flops(dict(base, tokens_per_group=17, group_size=2))
    assert half - backbone_flops(base) == 2 * (4 * 17) * 2 * 16 * 32 // 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tokens_per_group=10), r"`group_size` must be a multiple of 10"),
        (dict(tokens_per_group=0), "tokens_per_group"),
        (dict(mlp_activation="gelu_tanh"), "mlp_activation"),
        (dict(attention_qk_norm="yes"), "attention_qk_norm"),
        (dict(bfloat16_dispatch=1), "bfloat16_dispatch"),
    ],
)
def test_bad_new_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        VisionMoEBackbone(**{**tiny_moe("softmax_expert_choice"), **overrides})
