"""Expert parallelism with `keras.distribution` (JAX, 8 simulated CPU devices).

`keras.distribution` shards variables and data on the JAX backend only, so
the sharding tests skip on TensorFlow (data parallel with `tf.distribute`:
see `test_tf_mirrored.py`) and torch (single device). The layout map itself
and the MoE `expert_axis` argument are checked on every backend (the docstring
examples run in tests/test_docstring_examples.py).
"""

import inspect
import os
import re
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import distribution as vmoe_distribution
from keras_vmoe import routers
from keras_vmoe.distribution import (
    check_layouts,
    get_layout_map,
    layout_problems,
    validate_layouts,
)
from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier
from keras_vmoe.routers import ROUTER_NAMES, SoftmaxTokenChoiceRouter
from keras_vmoe.routers.registry import get_class

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from tiny import tiny_moe, tiny_router_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND = keras.backend.backend()
JAX_ONLY = pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution shards variables on the JAX backend only "
    "(TensorFlow: tf.distribute, see test_tf_mirrored.py; torch: one device)",
)
EXPERT_SUFFIXES = tuple(vmoe_distribution.EXPERT_WEIGHTS)
# Deterministic routing (no gating noise) so sharded == single device.
ROUTER_CONFIG = {"num_selected_experts": 2, "capacity_factor": 1.0, "noise_std": 0.0}


def mesh_2x4():
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 JAX devices (XLA_FLAGS set by tests/conftest.py)")
    return keras.distribution.DeviceMesh(
        (2, 4), ("batch", "expert"), keras.distribution.list_devices()
    )


def classifier(num_experts=4, **overrides):
    """A tiny V-MoE classifier; by default its only block is an MoE block."""
    overrides.setdefault("num_layers", 1)
    overrides.setdefault("moe_layers", [0])
    config = tiny_moe(
        "softmax_token_choice",
        num_experts=num_experts,
        router_config=dict(ROUTER_CONFIG),
        **overrides,
    )
    return VisionMoEImageClassifier(backbone=VisionMoEBackbone(**config), num_classes=3)


def data(n=16):
    rng = np.random.RandomState(0)
    y = np.arange(n) % 3
    x = 0.5 * rng.rand(n, 16, 16, 3).astype("float32")
    x[np.arange(n), :, :, y] += 0.5
    return x, y


def expert_weights(model):
    return [w for w in model.weights if w.path.endswith(EXPERT_SUFFIXES)]


# ---------------------------------------------------------------------------
# Every backend: the layout map, the MoE argument, the docstring examples.
# ---------------------------------------------------------------------------


def test_layout_map_keys():
    mesh = keras.distribution.DeviceMesh(
        (1, 1, 1), ("batch", "expert", "model"), ["cpu:0"]
    )
    layout_map = get_layout_map(mesh, model_axis="model")
    axes = {
        "encoder_block_3/moe/experts/intermediate_kernel": ("expert", None, None),
        "encoder_block_3/moe/experts/intermediate_bias": ("expert", None),
        "encoder_block_3/moe/experts/output_kernel": ("expert", None, None),
        "encoder_block_3/moe/experts/output_bias": ("expert", None),
        "encoder_block_0/attention/query/kernel": (None, "model", None),
        "encoder_block_0/attention/value/bias": ("model", None),
        "encoder_block_0/attention/attention_output/kernel": ("model", None, None),
        "encoder_block_0/attention/attention_output/bias": (),
        "encoder_block_0/mlp/dense_1/kernel": (None, "model"),
        "encoder_block_0/mlp/dense_1/bias": ("model",),
        "encoder_block_0/mlp/dense_2/kernel": ("model", None),
        "encoder_block_0/mlp/dense_2/bias": (),
        "encoder_block_3/moe/router/gating_kernel": (),
        "encoder_block_3/moe/load_imbalance": (),
        "head/kernel": (),
        "outer/encoder_norm/gamma": (),  # a nested model still matches
    }
    for path, expected in axes.items():
        assert layout_map[path].axes == expected, path
    # Layer outputs (looked up by Keras as "<layer path>/output") and
    # unknown weights match no key.
    for path in ("encoder_block_3/moe/experts/output", "encoder_block_3/moe/output"):
        assert layout_map[path] is None, path
    assert layout_map["my_adapter/kernel"] is None

    with pytest.raises(ValueError, match="not an axis of the device mesh"):
        get_layout_map(mesh, expert_axis="experts")
    with pytest.raises(ValueError, match="must differ"):
        get_layout_map(mesh, model_axis="expert")
    # V-MoE style 1-D mesh: data and experts on the same axis.
    one_d = keras.distribution.DeviceMesh((1,), ("expert",), ["cpu:0"])
    one_d_map = get_layout_map(one_d, data_axis="expert")
    assert one_d_map["a/experts/output_bias"].axes == ("expert", None)
    backbone_map = VisionMoEBackbone.get_layout_map(mesh, model_axis="model")
    assert list(backbone_map) == list(layout_map)


def test_moe_expert_axis_config_and_noop_without_distribution():
    def make(**kwargs):
        return MoE(
            SoftmaxTokenChoiceRouter(4, noise_std=0.0),
            MlpExperts(4, 16, seed=0),
            group_size=12,
            **kwargs,
        )

    x = np.random.RandomState(0).rand(4, 6, 8).astype("float32")
    default, unconstrained = make(), make(expert_axis=None)
    assert default.expert_axis == "expert"
    default(x), unconstrained(x)
    unconstrained.set_weights(default.get_weights())
    np.testing.assert_array_equal(
        ops.convert_to_numpy(default(x)), ops.convert_to_numpy(unconstrained(x))
    )
    restored = MoE.from_config(make(expert_axis="experts").get_config())
    assert restored.expert_axis == "experts"
    with pytest.raises(ValueError, match="expert_axis"):
        make(expert_axis=3)


def test_readme_scaling_out_section():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Scaling out") :]
    blocks = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")  # valid Python
    code = "\n".join(blocks)
    for name in (
        "keras.distribution.initialize",
        "DeviceMesh",
        "get_layout_map",
        "ModelParallel",
        "set_distribution",
        "validate_layouts",
        "MirroredStrategy",
        "TPUStrategy",
    ):
        assert name in code, name
    assert callable(VisionMoEBackbone.get_layout_map)


# ---------------------------------------------------------------------------
# JAX: a 2 x 4 mesh (batch x expert), 8 simulated CPU devices.
# ---------------------------------------------------------------------------


@JAX_ONLY
def test_expert_weights_sharded_and_layouts_checked():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = mesh_2x4()
    layout_map = get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        # Block 0 dense, block 1 MoE: every kind of weight of the models.
        model = classifier(num_experts=4, num_layers=2, moe_layers=[1])

    experts = expert_weights(model)
    assert len(experts) == 4
    for weight in experts:
        sharding = weight.value.sharding
        assert isinstance(sharding, NamedSharding)
        assert sharding.mesh.axis_names == ("batch", "expert")
        expected = ("expert",) + (None,) * (len(weight.shape) - 1)
        assert sharding.spec == PartitionSpec(*expected), weight.path
        # Each device holds 1 of the 4 experts.
        assert sharding.shard_shape(tuple(weight.shape))[0] == 1
    assert check_layouts(model.backbone, layout_map) == []
    assert check_layouts(model, layout_map) == []
    validate_layouts(model, layout_map)

    # A weight that no key matches is reported (Keras replicated it).
    with distribution.scope():
        extra = keras.layers.Dense(4, name="adapter")
        extra.build((None, 16))
    reported = check_layouts(model, layout_map, variables=model.weights + extra.weights)
    assert [w.path for w in reported] == ["adapter/kernel", "adapter/bias"]
    assert extra.kernel.value.sharding.is_fully_replicated

    # A map that forgot an expert key: the expert weight is reported.
    partial = get_layout_map(mesh)
    del partial[r"(?:.*/)?experts/output_kernel"]
    reported = check_layouts(model, partial)
    assert [w.path for w in reported] == ["encoder_block_1/moe/experts/output_kernel"]
    with pytest.raises(
        ValueError, match=r"encoder_block_1/moe/experts/output_kernel: no key"
    ):
        validate_layouts(model, partial)


@JAX_ONLY
def test_model_built_outside_the_distribution_is_reported():
    mesh = mesh_2x4()
    layout_map = get_layout_map(mesh)
    model = classifier(num_experts=4)  # no distribution: one device
    # On one device, no weight has the mesh layout the map intends.
    problems = layout_problems(model, layout_map)
    assert [p.path for p in problems] == [w.path for w in model.weights]
    assert all("intended sharding" in p.reason for p in problems)
    # Checked against the shapes only, the map fits this model.
    assert check_layouts(model, layout_map, check_values=False) == []
    # 3 experts cannot be split over 4 devices.
    odd = classifier(num_experts=3)
    reported = check_layouts(odd, layout_map, check_values=False)
    assert sorted(w.path for w in reported) == sorted(
        w.path for w in expert_weights(odd)
    )


# (mesh shape, axis names, batch axis, experts, overrides): the (batch,
# expert) meshes of the issue and V-MoE's 1-D mesh, where every device holds
# a slice of the batch and a slice of the experts (one image per group there,
# so the 8 groups of a batch of 8 split evenly over 8 devices).
MESHES = {
    "2x4": ((2, 4), ("batch", "expert"), "batch", 4, {}),
    "1x8": ((1, 8), ("batch", "expert"), "batch", 8, {}),
    "expert8": ((8,), ("expert",), "expert", 8, {"group_size": 1}),
}


def mesh_and_distribution(name):
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 JAX devices (XLA_FLAGS set by tests/conftest.py)")
    shape, axes, batch_axis, num_experts, overrides = MESHES[name]
    mesh = keras.distribution.DeviceMesh(shape, axes, keras.distribution.list_devices())
    layout_map = get_layout_map(mesh, data_axis=batch_axis)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=batch_axis
    )
    return layout_map, distribution, num_experts, overrides


@JAX_ONLY
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_fit_on_mesh_equals_single_device(mesh_name):
    layout_map, distribution, num_experts, overrides = mesh_and_distribution(mesh_name)
    x, y = data(16)

    def compile_and_fit(model):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses = []
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras.callbacks.LambdaCallback(
                    on_train_batch_end=lambda batch, logs: losses.append(logs["loss"])
                )
            ],
        )
        return losses

    reference = classifier(num_experts, **overrides)
    initial = reference.get_weights()
    ref_loss = compile_and_fit(reference)

    with distribution.scope():
        model = classifier(num_experts, **overrides)
        model.set_weights(initial)
        loss = compile_and_fit(model)

        for weight in expert_weights(model):
            assert weight.value.sharding.spec[0] == "expert", weight.path
        # The optimizer slots of the experts are sharded like the experts.
        slots = [
            v for v in model.optimizer.variables if "experts_output_kernel" in v.path
        ]
        assert slots
        for slot in slots:
            assert slot.value.sharding.spec[0] == "expert", slot.path

    assert np.all(np.isfinite(loss))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert check_layouts(model, layout_map) == []


@JAX_ONLY
def test_compiled_moe_keeps_experts_sharded():
    """The compiled MoE layer (forward and backward) never gathers experts.

    Each device runs the matmuls of its own expert on the slots of its own
    batch shard: `E/4 * G/2 * C` rows, never the whole batch's `E/4 * G * C`
    (what a flat dispatch over all groups' tokens compiled to before the
    gather and segment sum were made per group).
    """
    import jax

    mesh = mesh_2x4()
    layout_map = get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        model = classifier(num_experts=4)
    moe = model.backbone.get_layer("encoder_block_0").mlp
    seq_len = model.backbone.sequence_length
    tokens = np.random.RandomState(1).rand(8, seq_len, 16).astype("float32")
    num_groups = 8 * seq_len // moe.group_size
    capacity = moe.router.slots_per_expert(moe.group_size, training=False)
    hidden = moe.experts.hidden_dim
    full_shapes = {
        "f32[" + ",".join(map(str, w.shape)) + "]" for w in expert_weights(model)
    }

    def compiled_text():
        trainable = [v.value for v in moe.trainable_variables]
        frozen = [v.value for v in moe.non_trainable_variables]

        def loss(trainable, x):
            out, _ = moe.stateless_call(trainable, frozen, x)
            return ops.sum(out**2)

        with distribution.scope():
            x = jax.device_put(
                tokens, distribution.get_data_layout(tokens.shape).backend_layout
            )
            step = jax.jit(jax.value_and_grad(loss))
            return step.lower(trainable, x).compile().as_text()

    def gathered_shapes(hlo):
        return set(re.findall(r"= (f32\[[\d,]*\])\{[^}]*\} all-gather\(", hlo))

    def expert_rows(hlo):
        # Rows of the first expert matmul (M, h) on one device.
        return {
            int(m)
            for m in re.findall(rf"= f32\[(\d+),{hidden}\]\{{[^}}]*\}} dot\(", hlo)
        }

    hlo = compiled_text()
    assert not gathered_shapes(hlo) & full_shapes, "expert weights were gathered"
    local_rows = (4 // 4) * (num_groups // 2) * capacity
    assert local_rows in expert_rows(hlo)
    assert 2 * local_rows not in expert_rows(hlo)


@JAX_ONLY
def test_model_axis_shards_attention_and_dense_mlp():
    import jax
    from jax.sharding import PartitionSpec

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 JAX devices (XLA_FLAGS set by tests/conftest.py)")
    mesh = keras.distribution.DeviceMesh(
        (2, 2, 2), ("batch", "expert", "model"), keras.distribution.list_devices()
    )
    layout_map = get_layout_map(mesh, model_axis="model")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        model = classifier(num_experts=4, num_layers=2, moe_layers=[1])
    assert check_layouts(model, layout_map) == []
    specs = {w.path: w.value.sharding.spec for w in model.weights}
    expected = {
        "encoder_block_0/attention/query/kernel": (None, "model", None),
        "encoder_block_0/attention/attention_output/kernel": ("model", None, None),
        "encoder_block_0/mlp/dense_1/kernel": (None, "model"),
        "encoder_block_0/mlp/dense_2/kernel": ("model", None),
        "encoder_block_1/moe/experts/output_kernel": ("expert", None, None),
    }
    for path, axes in expected.items():
        assert specs[path] == PartitionSpec(*axes), path
    assert specs["encoder_block_1/moe/router/gating_kernel"] == PartitionSpec()


def moe_layer(router, num_experts, group_size=8):
    config = dict(tiny_router_config(router), num_experts=num_experts)
    if "noise_std" in inspect.signature(get_class(router)).parameters:
        config["noise_std"] = 0.0  # deterministic: sharded == single device
    return MoE(  # named as in the backbone, so the layout map keys match
        routers.get(router, name="router", **config),
        MlpExperts(num_experts=num_experts, hidden_dim=32, name="experts"),
        group_size=group_size,
        name="moe",
    )


def jitted_loss_and_grads(moe, x):
    """`jax.jit` of the MoE layer's sum of squared outputs and its gradients."""
    import jax

    frozen = [v.value for v in moe.non_trainable_variables]

    def loss(trainable, x):
        out, _ = moe.stateless_call(trainable, frozen, x)
        return ops.sum(out**2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@JAX_ONLY
@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_each_router_on_2x4_mesh_equals_single_device(router):
    """Forward and backward of every router's MoE layer, sharded vs not."""
    import jax

    layout_map, distribution, num_experts, _ = mesh_and_distribution("2x4")
    x = np.random.RandomState(2).randn(16, 8, 16).astype("float32")  # 16 groups
    reference = moe_layer(router, num_experts)
    reference.build(x.shape)
    weights = reference.get_weights()
    step = jitted_loss_and_grads(reference, x)
    ref_loss, ref_grads = step([v.value for v in reference.trainable_variables], x)

    with distribution.scope():
        moe = moe_layer(router, num_experts)
        moe.build(x.shape)
        moe.set_weights(weights)
        assert moe.experts.output_kernel.value.sharding.spec[0] == "expert"
        xs = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)
        step = jitted_loss_and_grads(moe, xs)
        loss, grads = step([v.value for v in moe.trainable_variables], xs)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@JAX_ONLY
def test_compiled_moe_moves_tokens_with_all_to_all():
    """On V-MoE's 1-D mesh the tokens travel by all-to-all, never all-gather.

    Every device holds 2 of the 16 groups and 1 of the 8 experts. Routing is
    per group, so it stays local; dispatch sends each slot to its expert's
    device and combine sends it back, both as all-to-alls. Nothing is
    gathered onto every device: not the tokens, not the gating logits (XLA
    replicates a TopK, so the routers sort instead under a mesh), not the
    experts.
    """
    import jax

    _, distribution, num_experts, _ = mesh_and_distribution("expert8")
    x = np.random.RandomState(3).randn(16, 32, 16).astype("float32")
    for router in ("softmax_token_choice", "softmax_expert_choice"):
        with distribution.scope():
            moe = moe_layer(router, num_experts, group_size=32)
            moe.build(x.shape)
            xs = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)
            step = jitted_loss_and_grads(moe, xs)
            trainable = [v.value for v in moe.trainable_variables]
            hlo = step.lower(trainable, xs).compile().as_text()
        collectives = re.findall(r" (all-to-all|all-gather)(?:-start)?\(", hlo)
        assert "all-gather" not in collectives, router
        # Forward: dispatch and combine; backward: their transposes.
        assert collectives.count("all-to-all") >= 4, router


@JAX_ONLY
def test_experts_not_divisible_by_the_expert_axis():
    _, distribution, _, _ = mesh_and_distribution("2x4")
    with distribution.scope():
        with pytest.raises(
            ValueError,
            match=r"'encoder_block_0/moe': 3 experts cannot be sharded on mesh "
            r"axis 'expert' of size 4",
        ):
            classifier(num_experts=3)
