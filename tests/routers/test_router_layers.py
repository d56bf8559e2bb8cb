import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import routers
from keras_vmoe.routers import (
    SoftmaxExpertChoiceRouter,
    SoftmaxTokenChoiceRouter,
    SoftRouter,
)
from tests import numpy_reference as ref

RNG = np.random.default_rng(3)
X = RNG.normal(size=(2, 12, 8)).astype("float32")
KERNEL = RNG.normal(size=(8, 4)).astype("float32")


def np_(x):
    return ops.convert_to_numpy(x)


def built(router, x=X):
    router.build(x.shape)
    if hasattr(router, "gating_kernel"):
        router.gating_kernel.assign(KERNEL)
    return router


def test_softmax_token_choice_equals_numpy():
    router = built(
        SoftmaxTokenChoiceRouter(4, num_selected_experts=2, capacity_factor=1.0)
    )
    routing = router(X, training=False)
    gates = ref.softmax(X.astype("float64") @ KERNEL)
    # C = ceil(12 * 2 * 1.0 / 4) = 6, rounded up to a multiple of 4: 8.
    assert routing.capacity == 8
    expected = ref.token_choice(gates, 2, 8)
    np.testing.assert_allclose(np_(routing.combine_tensor()), expected, atol=1e-5)
    # Evaluation adds the importance loss only (no noise -> no load loss).
    np.testing.assert_allclose(
        np_(routing.auxiliary_loss), 0.005 * ref.importance_loss(gates), rtol=1e-4
    )
    assert set(routing.auxiliary_losses) == {"importance_loss"}


def test_softmax_token_choice_training_losses_and_eval_capacity():
    router = built(
        SoftmaxTokenChoiceRouter(
            4,
            num_selected_experts=1,
            capacity_factor=1.0,
            eval_capacity_factor=2.0,
            capacity_multiple_of=1,
            gshard_loss_weight=0.5,
            z_loss_weight=0.25,
            seed=1,
        )
    )
    train = router(X, training=True)
    assert train.capacity == 3  # ceil(12 * 1 / 4)
    assert router(X, training=False).capacity == 6  # ceil(12 * 2 / 4)
    assert set(train.auxiliary_losses) == {
        "importance_loss",
        "load_loss",
        "gshard_loss",
        "router_z_loss",
    }
    clean = X.astype("float64") @ KERNEL
    losses = {k: np_(v) for k, v in train.auxiliary_losses.items()}
    np.testing.assert_allclose(
        losses["importance_loss"], ref.importance_loss(ref.softmax(clean)), rtol=1e-4
    )
    np.testing.assert_allclose(losses["router_z_loss"], ref.z_loss(clean), rtol=1e-4)
    total = (
        0.005 * losses["importance_loss"]
        + 0.005 * losses["load_loss"]
        + 0.5 * losses["gshard_loss"]
        + 0.25 * losses["router_z_loss"]
    )
    np.testing.assert_allclose(np_(train.auxiliary_loss), total, rtol=1e-5)


def test_noise_scale():
    # Noise is noise_std / E * N(0, 1): with noise_std 2 and E 4, std 0.5.
    router = built(SoftmaxTokenChoiceRouter(4, noise_std=2.0, seed=0))
    x = RNG.normal(size=(16, 256, 8)).astype("float32")
    clean, noisy = router.gating_logits(x, training=True)
    assert np.std(np_(noisy) - np_(clean)) == pytest.approx(0.5, rel=0.03)
    clean, noisy = router.gating_logits(x, training=False)
    np.testing.assert_array_equal(np_(noisy), np_(clean))


def test_softmax_expert_choice_equals_numpy():
    router = built(SoftmaxExpertChoiceRouter(4, capacity_factor=1.0))
    routing = router(X)
    assert routing.capacity == 4  # ceil(12 * 1.0 / 4) = 3 -> 4
    gates = ref.softmax(X.astype("float64") @ KERNEL)
    np.testing.assert_allclose(
        np_(routing.combine_tensor()), ref.expert_choice(gates, 4), atol=1e-6
    )
    assert routing.auxiliary_loss is None


def test_soft_router_equals_numpy():
    router = SoftRouter(4, num_slots=2)
    router.build(X.shape)
    phi = RNG.normal(size=(8, 4, 2)).astype("float32")
    router.slot_embeddings.assign(phi)
    router.scale.assign(1.7)
    routing = router(X)
    dispatch, combine = ref.soft_routing(X.astype("float64"), phi, 1.7)
    np.testing.assert_allclose(np_(routing.dispatch_tensor()), dispatch, atol=1e-5)
    np.testing.assert_allclose(np_(routing.combine_tensor()), combine, atol=1e-5)
    # Dispatch columns (per slot) and combine rows (per token) sum to 1.
    np.testing.assert_allclose(np_(routing.dispatch_tensor()).sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(np_(routing.combine_tensor()).sum((2, 3)), 1, atol=1e-5)


def test_soft_router_slots_from_capacity_factor_and_zero_token():
    router = SoftRouter(4, capacity_factor=1.0)
    x = X.copy()
    x[0, 0] = 0.0  # a zero token must not produce NaN
    routing = router(x)
    assert routing.capacity == 3  # round(12 * 1.0 / 4)
    assert np.isfinite(np_(routing.combine_tensor())).all()


@pytest.mark.parametrize(
    "name", ["softmax_token_choice", "softmax_expert_choice", "soft"]
)
def test_config_round_trip(name):
    router = routers.get(name, num_experts=4)
    config = router.get_config()
    clone = type(router).from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(router))
    assert type(restored) is type(router)


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="softmax_expert_choice"):
        routers.get("softmax_expert_chioce", num_experts=4)


def test_routers_compute_in_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = SoftmaxTokenChoiceRouter(4)
    assert router.compute_dtype == "float32"
    routing = router(ops.cast(X, "bfloat16"), training=True)
    assert keras.backend.standardize_dtype(routing.combine_tensor().dtype) == "float32"
    soft = SoftRouter(4)
    combine = soft(ops.cast(X, "float16")).combine_tensor()
    assert keras.backend.standardize_dtype(combine.dtype) == "float32"


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: SoftmaxTokenChoiceRouter(4, num_selected_experts=5),
            "num_selected_experts",
        ),
        (lambda: SoftmaxTokenChoiceRouter(0), "num_experts"),
        (lambda: SoftmaxTokenChoiceRouter(-2), "num_experts"),
        (lambda: SoftmaxExpertChoiceRouter(4, capacity_factor=None), "capacity_factor"),
        (lambda: SoftmaxExpertChoiceRouter(4, capacity=0), "capacity"),
        (lambda: SoftmaxExpertChoiceRouter(4, capacity_factor=0.0), "capacity_factor"),
        (
            lambda: SoftmaxExpertChoiceRouter(4, eval_capacity_factor=-1.0),
            "eval_capacity",
        ),
        (lambda: SoftmaxExpertChoiceRouter(4, noise_std=-1.0), "noise_std"),
        (lambda: SoftmaxTokenChoiceRouter(4, load_loss_weight=-1), "load_loss_weight"),
        (lambda: SoftRouter(4, num_slots=1, capacity_factor=1.0), "num_slots"),
        (lambda: SoftRouter(4, num_slots=0), "num_slots"),
        (lambda: SoftRouter(0), "num_experts"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_rank():
    with pytest.raises(ValueError, match="groups, group_size, dim"):
        SoftmaxExpertChoiceRouter(4)(X[0])
