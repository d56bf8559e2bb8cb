"""Extreme inputs: every router gives finite outputs and a well-defined routing."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE

ALL = routers.ROUTER_NAMES


def make(name, num_experts=4, group_size=8, **kwargs):
    return MoE(
        routers.get(name, num_experts=num_experts, **kwargs),
        MlpExperts(num_experts, 8, seed=0),
        group_size=group_size,
    )


def out(layer, x, training=False):
    return ops.convert_to_numpy(layer(x, training=training))


X = np.random.default_rng(0).normal(size=(2, 8, 6)).astype("float32")


@pytest.mark.parametrize("name", ALL)
def test_huge_logits(name):
    layer = make(name)
    layer(X)
    if hasattr(layer.router, "gating_kernel"):
        # Gating logits of magnitude ~1e4.
        layer.router.gating_kernel.assign(
            np.full((6, 4), 1e4 / 6, "float32") * [1, -1, 2, 0]
        )
    x = np.abs(X)
    for training in (False, True):
        assert np.isfinite(out(layer, x, training)).all()


@pytest.mark.parametrize("name", ALL)
def test_all_equal_scores_and_zero_tokens(name):
    layer = make(name)
    zeros = np.zeros_like(X)  # every logit 0 (equal); Soft MoE divides 0 by ~0
    y = out(layer, zeros)
    assert np.isfinite(y).all()
    routing, _ = layer.route(zeros)
    dispatch = ops.convert_to_numpy(routing.dispatch_tensor())
    if isinstance(routing, routers.SparseRouting):
        assert set(np.unique(dispatch)) <= {0.0, 1.0}
        assert (dispatch.sum(axis=1) <= 1).all()  # one token per slot at most
        assert dispatch.sum() >= 1
        if name == "softmax_token_choice":
            # Equal gates: every token's first choice is expert 0 (lower index).
            assert dispatch[:, :, 0].sum() == routing.capacity * 2
    else:
        np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_group_of_one_token_and_one_expert(name):
    kwargs = {"num_selected_experts": 1} if "token_choice" in name else {}
    layer = make(name, num_experts=1, group_size=1, **kwargs)
    y = out(layer, X[:, :3])
    assert y.shape == (2, 3, 6)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("name", ["softmax_expert_choice", "sinkhorn_expert_choice"])
def test_capacity_larger_than_group(name):
    layer = make(name, capacity=20)
    routing, _ = layer.route(X)
    mask = ops.convert_to_numpy(routing.slot_mask)
    assert (mask.sum(-1) == 8).all()  # every expert takes all 8 tokens
    assert np.isfinite(out(layer, X)).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_poisons_only_its_group(name, bad):
    layer = make(name)
    x = X.copy()
    x[1, 3, 2] = bad  # group 1 (tokens of the second image)
    y = out(layer, x)
    assert np.isnan(y[1]).all()
    np.testing.assert_allclose(y[0], out(layer, X)[0], atol=1e-6)


def test_mixed_precision_training_is_finite_and_close_to_float32():
    """A small MoE stack trains under mixed_bfloat16 with float32 routers.

    Tolerance: after 3 Adam steps from the same weights, bfloat16 training
    predictions stay within 0.05 of float32 training (bfloat16 has an 8-bit
    mantissa, so per-op relative errors are ~4e-3).
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 6)).astype("float32")
    y = rng.integers(0, 2, size=16)
    predictions = {}
    weights = None
    for policy in ("float32", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 6))
        h = make("softmax_token_choice", noise_std=0.0)(inputs)
        h = keras.layers.GlobalAveragePooling1D()(h)
        logits = keras.layers.Dense(2, dtype="float32")(h)
        model = keras.Model(inputs, logits)
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"]).all()
        predictions[policy] = ops.convert_to_numpy(model(x))
    keras.config.set_dtype_policy("float32")
    np.testing.assert_allclose(
        predictions["mixed_bfloat16"], predictions["float32"], atol=0.05
    )
