import numpy as np
import pytest
from keras import ops

from keras_vmoe.layers import ExpertGlorotUniform, MlpExperts


def test_experts_equal_numpy_per_expert_mlp():
    rng = np.random.default_rng(0)
    experts = MlpExperts(num_experts=3, hidden_dim=5, activation="relu")
    x = rng.normal(size=(3, 2, 4, 6)).astype("float32")  # (E, G, C, d)
    experts.build(x.shape)
    wi = rng.normal(size=(3, 6, 5)).astype("float32")
    bi = rng.normal(size=(3, 5)).astype("float32")
    wo = rng.normal(size=(3, 5, 6)).astype("float32")
    bo = rng.normal(size=(3, 6)).astype("float32")
    for var, value in zip(
        [
            experts.intermediate_kernel,
            experts.intermediate_bias,
            experts.output_kernel,
            experts.output_bias,
        ],
        [wi, bi, wo, bo],
    ):
        var.assign(value)
    expected = np.zeros_like(x)
    for g in range(2):
        for e in range(3):
            h = np.maximum(x[e, g] @ wi[e] + bi[e], 0)
            expected[e, g] = h @ wo[e] + bo[e]
    np.testing.assert_allclose(
        ops.convert_to_numpy(experts(x)), expected, rtol=1e-5, atol=1e-5
    )


def test_identical_init_and_fans():
    kernel = ops.convert_to_numpy(
        ExpertGlorotUniform(identical=True, seed=1)((4, 30, 70))
    )
    for e in range(1, 4):
        np.testing.assert_array_equal(kernel[e], kernel[0])
    # Glorot limit of one expert: sqrt(6 / (30 + 70)) = 0.2449.
    assert np.abs(kernel).max() <= np.sqrt(6 / 100)
    assert np.abs(kernel).max() > 0.9 * np.sqrt(6 / 100)
    distinct = ops.convert_to_numpy(ExpertGlorotUniform(seed=1)((4, 30, 70)))
    assert not np.allclose(distinct[0], distinct[1])


def test_experts_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MlpExperts(0, 4)
    with pytest.raises(ValueError, match="hidden_dim"):
        MlpExperts(2, 0)
    with pytest.raises(ValueError, match="dropout_rate"):
        MlpExperts(2, 4, dropout_rate=1.5)
    with pytest.raises(ValueError, match="num_experts=2"):
        MlpExperts(2, 4)(np.zeros((3, 1, 4, 8), "float32"))


def test_identical_experts_train_and_reload(tmp_path):
    # Regression: a broadcast (stride-0) initial value could not be updated
    # in place on torch.
    import keras

    from keras_vmoe.layers import MoE
    from keras_vmoe.routers import SoftmaxExpertChoiceRouter

    inputs = keras.Input((4, 6))
    experts = MlpExperts(3, 5, identical_init=True, seed=0, name="experts")
    moe = MoE(SoftmaxExpertChoiceRouter(3), experts, group_size=8)
    outputs = keras.layers.Flatten()(moe(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(outputs))
    kernel = ops.convert_to_numpy(experts.intermediate_kernel)
    np.testing.assert_array_equal(kernel[1], kernel[0])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(8, 4, 6)).astype("float32")
    model.fit(x, np.ones((8, 1)), batch_size=8, epochs=1, verbose=0)
    assert not np.allclose(ops.convert_to_numpy(experts.intermediate_kernel), kernel)
    model.save_weights(str(tmp_path / "w.weights.h5"))
    model.load_weights(str(tmp_path / "w.weights.h5"))


def test_get_config_holds_every_argument():
    import inspect

    from keras_vmoe.layers import MoE
    from keras_vmoe.routers import SoftRouter

    arguments = dict(
        num_experts=3,
        hidden_dim=5,
        activation="relu",
        dropout_rate=0.25,
        identical_init=True,
        seed=4,
    )
    experts = MlpExperts(**arguments)
    moe = MoE(
        SoftRouter(3, num_slots=2),
        experts,
        group_size=6,
        use_einsum_dispatch=True,
        expert_axis=None,
    )
    for layer, given in [
        (experts, arguments),
        (moe, dict(group_size=6, use_einsum_dispatch=True, expert_axis=None)),
    ]:
        config = layer.get_config()
        names = set(inspect.signature(type(layer).__init__).parameters)
        assert names - {"self", "kwargs"} <= set(config)
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        for name, value in given.items():
            assert config[name] == value, name
    clone = MoE.from_config(moe.get_config())
    assert clone.router.num_slots == 2
    assert clone.experts.activation is experts.activation
    # The clone computes the same function once it has the same weights.
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    moe(x)
    clone(x)
    clone.set_weights(moe.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(clone(x)), ops.convert_to_numpy(moe(x)), atol=1e-6
    )


def test_gelu_approximate_is_flax_tanh_gelu():
    """flax's `nn.gelu` (vmoe's MLPs): 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""
    from keras_vmoe.layers import gelu_approximate, get_activation

    x = np.linspace(-6, 6, 101).astype("float32")
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    got = ops.convert_to_numpy(gelu_approximate(x))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    exact = ops.convert_to_numpy(get_activation("gelu")(x))
    assert 1e-4 < np.abs(exact - got).max() < 1e-3  # why vmoe's choice matters
    experts = MlpExperts(num_experts=2, hidden_dim=4, activation="gelu_approximate")
    assert experts.get_config()["activation"] == "gelu_approximate"
    clone = MlpExperts.from_config(experts.get_config())
    assert clone.activation is gelu_approximate
    z = np.random.default_rng(1).normal(size=(2, 3, 5)).astype("float32")
    experts(z)
    wi, bi, wo, bo = (ops.convert_to_numpy(w) for w in experts.weights)
    h = np.einsum("emd,edh->emh", z, wi) + bi[:, None]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    np.testing.assert_allclose(
        ops.convert_to_numpy(experts(z)),
        np.einsum("emh,ehd->emd", h, wo) + bo[:, None],
        atol=1e-5,
    )
