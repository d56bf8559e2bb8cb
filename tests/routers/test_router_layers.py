import inspect

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


# Every constructor argument set away from its default.
NON_DEFAULT_ARGUMENTS = {
    SoftmaxTokenChoiceRouter: dict(
        num_experts=6,
        num_selected_experts=3,
        capacity_factor=1.5,
        eval_capacity_factor=4.0,
        batch_priority=True,
        importance_loss_weight=0.01,
        load_loss_weight=0.02,
        gshard_loss_weight=0.03,
        z_loss_weight=0.04,
        capacity_multiple_of=2,
        noise_std=0.5,
        seed=7,
        kernel_initializer="zeros",
    ),
    SoftmaxExpertChoiceRouter: dict(
        num_experts=6,
        capacity=5,
        capacity_multiple_of=2,
        noise_std=0.5,
        seed=7,
        kernel_initializer="zeros",
    ),
    SoftRouter: dict(num_experts=6, capacity_factor=1.5),
}


def _constructor_arguments(cls):
    names = set()
    for klass in cls.__mro__:
        if klass is keras.layers.Layer:
            break
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters)
    return names - {"self", "kwargs"}


@pytest.mark.parametrize("cls", list(NON_DEFAULT_ARGUMENTS))
def test_get_config_holds_every_argument(cls):
    arguments = NON_DEFAULT_ARGUMENTS[cls]
    router = cls(**arguments)
    config = router.get_config()
    # Every constructor argument is in the config ...
    assert _constructor_arguments(cls) <= set(config)
    # ... with the value given, and survives from_config.
    clone = cls.from_config(config)
    assert clone.get_config() == config
    for name, value in arguments.items():
        if name == "kernel_initializer":
            assert type(clone.kernel_initializer) is keras.initializers.Zeros
        else:
            assert getattr(clone, name) == value, name
            assert config[name] == value, name


def test_explicit_capacity_replaces_the_default_factor():
    router = SoftmaxTokenChoiceRouter(4, capacity=3, capacity_multiple_of=4)
    config = router.get_config()
    assert config["capacity"] == 3 and config["capacity_factor"] is None
    clone = SoftmaxTokenChoiceRouter.from_config(config)
    # An explicit capacity is used as is, in training and evaluation.
    assert built(clone)(X, training=True).capacity == 3
    assert clone(X, training=False).capacity == 3
    # The default factor is a plain float in the layer and its config.
    default = SoftmaxTokenChoiceRouter(4)
    assert type(default.capacity_factor) is float
    assert default.get_config()["capacity_factor"] == 1.05


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="softmax_expert_choice"):
        routers.get("softmax_expert_chioce", num_experts=4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_routers_compute_in_float32_under_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    half = policy.split("_")[1]
    x = ops.cast(X, half)
    for router in [
        SoftmaxTokenChoiceRouter(4, num_selected_experts=2, capacity_factor=1.0),
        SoftmaxExpertChoiceRouter(4, capacity_factor=1.0),
    ]:
        # The policy reaches the router (float32 weights under a mixed
        # policy), which still routes in float32.
        assert router.compute_dtype == half
        router = built(router)
        assert keras.backend.standardize_dtype(router.gating_kernel.dtype) == "float32"
        # Half-precision tokens, and float32 tokens, which the router does
        # not round to the compute dtype (no autocast).
        for inputs in (x, X):
            routing = router(inputs, training=False)
            combine = routing.combine_tensor()
            assert keras.backend.standardize_dtype(combine.dtype) == "float32"
            # The same numbers as float32 routing of the inputs: the gates
            # are float32 softmaxes, not rounded to the half type.
            tokens = ops.convert_to_numpy(ops.cast(inputs, "float32"))
            gates = ref.softmax(tokens @ KERNEL)
            if isinstance(router, SoftmaxTokenChoiceRouter):
                expected = ref.token_choice(gates, 2, 8)  # C = 12*2*1.0/4 = 6 -> 8
            else:
                expected = ref.expert_choice(gates, 4)  # C = 12*1.0/4 = 3 -> 4
            np.testing.assert_allclose(np_(combine), expected, atol=1e-5)
    soft = SoftRouter(4)
    assert soft.compute_dtype == half
    combine = soft(x).combine_tensor()
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
        (
            lambda: SoftmaxExpertChoiceRouter(4, capacity_factor=2.0, capacity=4),
            "not both",
        ),
        (
            lambda: SoftmaxTokenChoiceRouter(4, capacity_factor=1.05, capacity=8),
            "not both",
        ),
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
