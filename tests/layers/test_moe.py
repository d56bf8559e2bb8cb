import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.routers import SparseRouting

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
    with moe.capture_routing() as routings:
        y = moe(ops.cast(X, half))
    assert keras.backend.standardize_dtype(y.dtype) == half
    # The policy reaches the router (float32 weights under a mixed policy),
    # which still routes in float32.
    assert moe.router.compute_dtype == half
    assert moe.router.gating_kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(routings[-1].slot_weight.dtype) == "float32"
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

    monkeypatch.setattr(SparseRouting, "_slots_to_dense", refuse)
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


# --------------------------------------------------------------------------
# Observing the routing (`capture_routing`) and optional statistics.
# --------------------------------------------------------------------------
def _np(x):
    return ops.convert_to_numpy(x)


def _assert_same_routing(observed, expected):
    assert type(observed) is type(expected)
    np.testing.assert_allclose(
        _np(observed.dispatch_tensor()), _np(expected.dispatch_tensor()), atol=1e-6
    )
    np.testing.assert_allclose(
        _np(observed.combine_tensor()), _np(expected.combine_tensor()), atol=1e-6
    )


@pytest.mark.parametrize("name", ROUTERS)
def test_captured_routing_is_the_routers_routing_of_the_groups(name):
    moe = make_moe(name)
    moe(X)  # builds
    with moe.capture_routing() as routings:
        y = _np(moe(X))
    assert len(routings) == 1
    groups = X.reshape(2, 12, 8)  # 24 tokens, groups of 12 consecutive tokens
    _assert_same_routing(routings[0], moe.router(groups, training=False))
    # The captured routing is the one the outputs were computed with.
    routing = routings[0]
    expected = _np(routing.einsum_combine(moe.experts(routing.einsum_dispatch(groups))))
    np.testing.assert_allclose(y, expected.reshape(X.shape), atol=1e-5)
    assert "route" not in vars(moe)  # no monkey-patching


@pytest.mark.parametrize("name", ROUTERS)
def test_capture_routing_inside_an_eager_model_call(name):
    model = make_model(name)
    moe = model.get_layer("moe")
    with moe.capture_routing() as outer:
        model(X)
        with moe.capture_routing() as inner:
            model(X[:2])
    model(X)  # after the blocks: recorded nowhere
    assert len(outer) == 2 and len(inner) == 1
    _assert_same_routing(outer[0], moe.router(X.reshape(2, 12, 8), training=False))
    _assert_same_routing(outer[1], moe.router(X[:2].reshape(1, 12, 8), training=False))
    assert inner[0] is outer[1]


def test_capture_routing_refuses_traced_calls():
    model = make_model("softmax_expert_choice")
    moe = model.get_layer("moe")
    expected = ops.convert_to_numpy(model(X))
    if keras.backend.backend() == "torch":  # predict runs eagerly on torch
        with moe.capture_routing() as routings:
            model.predict(X, batch_size=2, verbose=0)
        assert len(routings) == 2
        return
    with pytest.raises(RuntimeError, match="eager calls only"):
        with moe.capture_routing() as routings:
            outputs = model.predict(X, batch_size=2, verbose=0)
            model(X)
    # The traced call ran as usual, unrecorded; the eager one was recorded.
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    assert len(routings) == 1
    assert moe._routing_captures == ()
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-5)


def _statistics_model(track_statistics="training"):
    # Expert Choice, E=4, groups of 12: training capacity ceil(12 * 1 / 4) = 3
    # -> 4 (multiple of 4), evaluation capacity ceil(12 * 2 / 4) = 6 -> 8.
    router = routers.SoftmaxExpertChoiceRouter(
        4, capacity_factor=1.0, eval_capacity_factor=2.0
    )
    moe = MoE(
        router,
        MlpExperts(4, 16, seed=0),
        group_size=12,
        track_statistics=track_statistics,
        name="moe",
    )
    inputs = keras.Input((6, 8))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(moe(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, moe


TRAIN_EXPERTS_PER_TOKEN = 4 * 4 / 12  # E * C / S
EVAL_EXPERTS_PER_TOKEN = 4 * 8 / 12


def test_statistics_by_default_only_in_training():
    model, moe = _statistics_model()
    assert moe.track_statistics == "training"
    zeros = dict.fromkeys(moe.routing_statistics(), 0.0)
    model(X)
    moe(X)
    model.predict(X, batch_size=2, verbose=0)
    model.evaluate(X, np.array([0, 1, 0, 1]), batch_size=2, verbose=0)
    assert moe.routing_statistics() == zeros
    moe(X, training=True)
    trained = moe.routing_statistics()
    assert trained["experts_per_token"] == pytest.approx(TRAIN_EXPERTS_PER_TOKEN)
    assert trained["load_imbalance"] == pytest.approx(1.0)
    model.predict(X, batch_size=2, verbose=0)
    moe(X)
    assert moe.routing_statistics() == trained
    # fit() updates them: reset, then train one step.
    for name in trained:
        getattr(moe, name).assign(0.0)
    model.fit(X, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)
    assert moe.routing_statistics()["experts_per_token"] == pytest.approx(
        TRAIN_EXPERTS_PER_TOKEN
    )


def test_statistics_always_and_never():
    model, moe = _statistics_model("always")
    model.predict(X, batch_size=2, verbose=0)
    stats = moe.routing_statistics()
    assert stats["experts_per_token"] == pytest.approx(EVAL_EXPERTS_PER_TOKEN)
    moe(X, training=True)
    assert moe.routing_statistics()["experts_per_token"] == pytest.approx(
        TRAIN_EXPERTS_PER_TOKEN
    )
    model, moe = _statistics_model("never")
    moe(X, training=True)
    model.fit(X, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)
    assert moe.routing_statistics() == dict.fromkeys(moe.routing_statistics(), 0.0)
    # The variables exist whatever the setting (checkpoints keep their paths).
    names = {v.name for v in moe.non_trainable_variables}
    assert set(moe.routing_statistics()) <= names


def test_track_statistics_config_and_old_configs():
    _, moe = _statistics_model("always")
    config = moe.get_config()
    assert config["track_statistics"] == "always"
    clone = MoE.from_config(config)
    assert clone.track_statistics == "always"
    assert clone.get_config() == config
    # A config saved before the option existed loads with the default.
    del config["track_statistics"]
    old = MoE.from_config(config)
    assert old.track_statistics == "training"
    y = old(X)
    assert _np(y).shape == X.shape
    assert old.routing_statistics()["experts_per_token"] == 0.0
    with pytest.raises(ValueError, match="track_statistics"):
        MoE(
            routers.SoftRouter(4), MlpExperts(4, 8), group_size=4, track_statistics=True
        )
    with pytest.raises(ValueError, match="track_statistics"):
        moe.track_statistics = "sometimes"


def test_a_layer_with_num_experts_is_not_a_router():
    with pytest.raises(ValueError, match="keras_vmoe.routers.Router") as error:
        MoE(MlpExperts(4, 8), MlpExperts(4, 8), group_size=4)
    # The message lists the routers registered at the time of the error.
    for name in routers.ROUTER_NAMES:
        assert name in str(error.value)


def _bfloat16(x):
    import ml_dtypes

    return np.asarray(x, "float32").astype(ml_dtypes.bfloat16).astype("float32")


@pytest.mark.parametrize("name", ["softmax_expert_choice", "soft"])
def test_bfloat16_dispatch_rounds_expert_inputs_and_outputs(name):
    """vmoe's Bfloat16Dispatcher: the data entering the dispatch and the
    combine is rounded to bfloat16, the routing sees the float32 tokens."""
    kwargs = dict(capacity=12) if name != "soft" else dict(num_slots=2)
    plain = make_moe(name, use_einsum_dispatch=True, **kwargs)
    rounded = MoE.from_config(
        {**plain.get_config(), "bfloat16_dispatch": True, "name": "moe_bf16"}
    )
    assert rounded.bfloat16_dispatch and not plain.bfloat16_dispatch
    x = X * 3.0 + 0.1  # values that are far from exact in bfloat16
    plain(x)
    rounded(x)
    rounded.set_weights(plain.get_weights())
    with plain.capture_routing() as routings:
        expected_plain = ops.convert_to_numpy(plain(x))
    dispatch = ops.convert_to_numpy(routings[-1].dispatch_tensor())  # (G, S, E, C)
    combine = ops.convert_to_numpy(routings[-1].combine_tensor())
    groups = x.reshape(2, 12, 8)
    wi, bi, wo, bo = (ops.convert_to_numpy(w) for w in plain.experts.weights)

    def numpy_moe(round_fn):
        inputs = np.einsum("gsec,gsd->egcd", dispatch, round_fn(groups))
        hidden = np.einsum("egcd,edh->egch", inputs, wi) + bi[:, None, None]
        hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / np.sqrt(2)))
        outputs = np.einsum("egch,ehd->egcd", hidden, wo) + bo[:, None, None]
        return np.einsum("egcd,gsec->gsd", round_fn(outputs), combine).reshape(x.shape)

    np.testing.assert_allclose(expected_plain, numpy_moe(lambda v: v), atol=1e-4)
    for fast in (False, True):  # the index path (sparse) and the einsum path
        layer = rounded
        if fast:
            layer = MoE.from_config(
                {**rounded.get_config(), "use_einsum_dispatch": False}
            )
            layer(x)
            layer.set_weights(plain.get_weights())
        got = ops.convert_to_numpy(layer(x))
        np.testing.assert_allclose(got, numpy_moe(_bfloat16), atol=1e-5)
        # The rounding matters: bfloat16 has 8 significant bits.
        assert np.abs(got - expected_plain).max() > 1e-4


def test_bfloat16_dispatch_config():
    moe = make_moe("soft")
    assert moe.get_config()["bfloat16_dispatch"] is False
    config = {**moe.get_config(), "bfloat16_dispatch": True}
    assert MoE.from_config(config).get_config()["bfloat16_dispatch"] is True
    config.pop("bfloat16_dispatch")  # configs saved before the option
    assert MoE.from_config(config).bfloat16_dispatch is False
    with pytest.raises(ValueError, match="bfloat16_dispatch"):
        MoE(moe.router, moe.experts, group_size=12, bfloat16_dispatch="yes")
