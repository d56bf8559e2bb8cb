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
from keras_vmoe.routers import Routing

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


@pytest.mark.parametrize(
    "policy, tolerance", [("mixed_bfloat16", 5e-2), ("mixed_float16", 5e-3)]
)
def test_mixed_precision_outputs_follow_compute_dtype(policy, tolerance):
    half = policy.split("_")[1]
    keras.config.set_dtype_policy(policy)
    moe = make_moe("softmax_token_choice")
    y = moe(ops.cast(X, half))
    assert keras.backend.standardize_dtype(y.dtype) == half
    assert moe.router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(moe.experts.compute_dtype) == half
    # Same layer in float32 on the same (rounded) inputs: the router sees the
    # same float32 values and routes identically, so the outputs differ only
    # by the experts' half-precision arithmetic.
    keras.config.set_dtype_policy("float32")
    reference = make_moe("softmax_token_choice")
    x32 = ops.cast(ops.cast(X, half), "float32")
    reference(x32)
    reference.set_weights(moe.get_weights())
    expected = ops.convert_to_numpy(reference(x32))
    got = ops.convert_to_numpy(ops.cast(y, "float32"))
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


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


@pytest.mark.parametrize("name", ["softmax_token_choice", "softmax_expert_choice"])
def test_index_path_never_builds_dense_routing_tensors(name, monkeypatch):
    # The forward pass (training and evaluation) and its gradient must not
    # call the dense (G, S, E, C) construction at all, on every backend.
    def refuse(self, slot_values):
        raise AssertionError("dense (G, S, E, C) routing tensor built")

    monkeypatch.setattr(Routing, "_slots_to_dense", refuse)
    model = make_model(name)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(ops.convert_to_numpy(model(X, training=False))).all()
    with pytest.raises(AssertionError, match="dense"):
        make_moe(name, use_einsum_dispatch=True)(X)  # the reference path does


def _largest_intermediate(jaxpr):
    """Elements of the largest value any equation of `jaxpr` computes."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="inspects a jaxpr")
@pytest.mark.parametrize(
    "name, router_kwargs, capacity",
    [
        # C = ceil(64 * 2 * 1.05 / 4) = 34 -> 36.
        ("softmax_token_choice", dict(num_selected_experts=2), 36),
        # C = ceil(64 * 2.0 / 4) = 32.
        ("softmax_expert_choice", dict(capacity_factor=2.0), 32),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_index_path_memory_is_linear_in_the_group(
    name, router_kwargs, capacity, training
):
    import jax

    g, s, e, d = 2, 64, 4, 4
    x = np.random.default_rng(1).normal(size=(g, s, d)).astype("float32")
    dense_routing = g * s * e * capacity  # elements of one (G, S, E, C) tensor

    def largest(use_einsum_dispatch):
        moe = MoE(
            routers.get(name, num_experts=e, seed=0, **router_kwargs),
            MlpExperts(e, 4, seed=0),
            group_size=s,
            use_einsum_dispatch=use_einsum_dispatch,
        )
        moe(x)
        trainable = [v.value for v in moe.trainable_variables]
        non_trainable = [v.value for v in moe.non_trainable_variables]

        def forward(trainable, non_trainable, x):
            return moe.stateless_call(trainable, non_trainable, x, training=training)

        jaxpr = jax.make_jaxpr(forward)(trainable, non_trainable, x).jaxpr
        return _largest_intermediate(jaxpr)

    # The reference path materialises (G, S, E, C); the index path's largest
    # value (gathered slots, the experts' hidden layer, the routing's
    # one-hot of K*S choices over E experts) is at most a quarter of that.
    assert largest(True) >= dense_routing
    assert largest(False) <= dense_routing // 4
