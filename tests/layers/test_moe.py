import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE

ROUTERS = ["softmax_token_choice", "softmax_expert_choice", "soft"]
RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 6, 8)).astype("float32")  # 24 tokens: 2 groups of 12


def make_moe(name, use_einsum_dispatch=False, num_experts=4, **router_kwargs):
    router_kwargs.setdefault("num_experts", num_experts)
    if name != "soft":
        router_kwargs.setdefault("seed", 0)
    return MoE(
        routers.get(name, **router_kwargs),
        MlpExperts(num_experts, 16, seed=0),
        group_size=12,
        use_einsum_dispatch=use_einsum_dispatch,
        name="moe",
    )


def make_model(name, num_classes=3, **router_kwargs):
    inputs = keras.Input((6, 8))
    x = make_moe(name, **router_kwargs)(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("name", ROUTERS)
def test_index_path_equals_einsum_reference(name):
    fast = make_moe(name)
    reference = make_moe(name, use_einsum_dispatch=True)
    fast(X)
    reference(X)
    reference.set_weights(fast.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(fast(X)), ops.convert_to_numpy(reference(X)), atol=1e-5
    )


def test_moe_equals_numpy_routing_by_hand():
    # Expert Choice with E=2, C=12 (every expert takes every token): the
    # output is sum_e gate_e * f_e(x), for every token.
    moe = MoE(
        routers.SoftmaxExpertChoiceRouter(2, capacity=12),
        MlpExperts(2, 16, activation="relu"),
        group_size=12,
    )
    y = ops.convert_to_numpy(moe(X))
    kernel = ops.convert_to_numpy(moe.router.gating_kernel)
    wi, bi, wo, bo = [ops.convert_to_numpy(v) for v in moe.experts.weights]
    tokens = X.reshape(-1, 8)
    logits = tokens @ kernel
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    expected = sum(
        gates[:, e : e + 1] * (np.maximum(tokens @ wi[e] + bi[e], 0) @ wo[e] + bo[e])
        for e in range(2)
    )
    np.testing.assert_allclose(y.reshape(-1, 8), expected, rtol=1e-4, atol=1e-5)


def test_aux_loss_is_added():
    moe = make_moe("softmax_token_choice")
    moe(X, training=True)
    assert len(moe.losses) == 1
    aux = float(ops.convert_to_numpy(moe.losses[0]))
    assert aux > 0
    assert aux == pytest.approx(moe.routing_statistics()["auxiliary_loss"], rel=1e-6)
    expert_choice = make_moe("softmax_expert_choice")
    expert_choice(X, training=True)
    assert expert_choice.losses == []


@pytest.mark.parametrize("name", ROUTERS)
def test_fit_trains_router_and_experts_and_lowers_loss(name):
    keras.utils.set_random_seed(0)
    model = make_model(name)
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = RNG.normal(size=(64, 6, 8)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int32") + (x[:, :, 1].mean(1) > 0.3)
    moe = model.get_layer("moe")
    before = [ops.convert_to_numpy(w).copy() for w in moe.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    after = [ops.convert_to_numpy(w) for w in moe.trainable_weights]
    # Every router and expert weight received a gradient.
    for w, b, a in zip(moe.trainable_weights, before, after):
        assert not np.allclose(b, a), f"{w.path} did not change"
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    stats = moe.routing_statistics()
    assert 0 <= stats["fraction_tokens_dropped"] <= 1
    assert stats["experts_per_token"] > 0


@pytest.mark.parametrize("name", ROUTERS)
def test_config_round_trip_and_keras_save_load(name, tmp_path):
    model = make_model(name)
    moe = model.get_layer("moe")
    clone = MoE.from_config(moe.get_config())
    assert clone.get_config() == moe.get_config()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model(X)), ops.convert_to_numpy(loaded(X))
    )


_OTHER = {"jax": "torch", "tensorflow": "jax", "torch": "tensorflow"}

_SAVE_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.layers.test_moe import X, make_model
model = make_model({name!r})
model.save_weights({weights!r})
from keras import ops
json.dump(ops.convert_to_numpy(model(X)).tolist(), open({outputs!r}, "w"))
"""


@pytest.mark.parametrize("name", ROUTERS)
def test_weights_load_across_backends(name, tmp_path):
    other = _OTHER[keras.backend.backend()]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    weights = str(tmp_path / "moe.weights.h5")
    outputs = str(tmp_path / "outputs.json")
    script = _SAVE_SCRIPT.format(root=root, name=name, weights=weights, outputs=outputs)
    env = dict(os.environ, KERAS_BACKEND=other)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=root)
    model = make_model(name)
    model.load_weights(weights)
    expected = np.array(json.load(open(outputs)), "float32")
    np.testing.assert_allclose(ops.convert_to_numpy(model(X)), expected, atol=1e-5)


def test_mixed_precision_outputs_follow_compute_dtype():
    keras.config.set_dtype_policy("mixed_bfloat16")
    moe = make_moe("softmax_token_choice")
    y = moe(ops.cast(X, "bfloat16"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert moe.router.compute_dtype == "float32"
    assert np.isfinite(ops.convert_to_numpy(ops.cast(y, "float32"))).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        make_moe("soft")(X[:, :5])  # 20 tokens, groups of 12
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        make_moe("soft")(X[0])
    with pytest.raises(ValueError, match="group_size"):
        MoE(routers.SoftRouter(4), MlpExperts(4, 8), group_size=0)
    with pytest.raises(ValueError, match="disagree"):
        MoE(routers.SoftRouter(4), MlpExperts(3, 8), group_size=4)
    with pytest.raises(ValueError, match="router"):
        MoE("soft", MlpExperts(3, 8), group_size=4)


@pytest.mark.parametrize(
    "name", ["sinkhorn_token_choice", "sparsity_constrained_expert_choice"]
)
def test_fit_with_unknown_batch_size(name):
    # Regression: under tf.function the group axis is unknown (None); shape
    # checks must not turn a symbolic dimension into a Python bool.
    model = make_model(name)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(X, np.array([0, 1, 2, 0]), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
