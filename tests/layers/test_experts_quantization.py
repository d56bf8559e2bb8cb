"""int8 quantization of `MlpExperts`, against a NumPy implementation."""

import keras
import numpy as np
import pytest
from scipy.special import erf

from keras_vmoe.layers import MlpExperts

E, D, H = 3, 8, 16


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _abs_max_quantize(x, axis):
    """int8 values and scale of the abs-max scheme: q = round(x * 127 / max)."""
    scale = 127 / (np.abs(x).max(axis=axis, keepdims=True) + keras.config.epsilon())
    return np.clip(np.round(x * scale), -127, 127), scale


def _numpy_int8_experts(x, w1, b1, w2, b2):
    """Per expert: int8 inputs (per row) x int8 kernel (per output unit)."""
    q1, s1 = _abs_max_quantize(w1, axis=1)  # (E, d, h), (E, 1, h)
    q2, s2 = _abs_max_quantize(w2, axis=1)
    qx, sx = _abs_max_quantize(x, axis=-1)  # (E, M, d), (E, M, 1)
    h = _gelu(np.matmul(qx, q1) / (s1 * sx) + b1[:, None, :])
    qh, sh = _abs_max_quantize(h, axis=-1)
    return np.matmul(qh, q2) / (s2 * sh) + b2[:, None, :], (q1, s1, q2, s2)


def _experts_with_weights(seed=0):
    rng = np.random.RandomState(seed)
    experts = MlpExperts(num_experts=E, hidden_dim=H, name="experts")
    experts.build((E, None, D))
    weights = [
        rng.normal(0, 0.5, (E, D, H)),
        rng.normal(0, 0.1, (E, H)),
        rng.normal(0, 0.5, (E, H, D)),
        rng.normal(0, 0.1, (E, D)),
    ]
    experts.set_weights([w.astype("float32") for w in weights])
    return experts, weights


def test_int8_matches_numpy_and_stays_close_to_float():
    experts, (w1, b1, w2, b2) = _experts_with_weights()
    x = np.random.RandomState(1).normal(size=(E, 2, 5, D)).astype("float32")
    float_out = _np(experts(x))
    experts.quantize("int8")
    assert experts.quantization_mode == "int8"
    assert experts.dtype_policy.name == "int8_from_float32"
    expected, (q1, s1, q2, s2) = _numpy_int8_experts(
        x.reshape(E, 10, D), w1, b1, w2, b2
    )
    # The stored kernels and scales are the abs-max ones, per expert and
    # output unit.
    assert keras.backend.standardize_dtype(experts.intermediate_kernel.dtype) == "int8"
    np.testing.assert_array_equal(_np(experts.intermediate_kernel), q1)
    np.testing.assert_array_equal(_np(experts.output_kernel), q2)
    np.testing.assert_allclose(
        _np(experts.intermediate_kernel_scale), s1[:, 0], rtol=1e-6
    )
    np.testing.assert_allclose(_np(experts.output_kernel_scale), s2[:, 0], rtol=1e-6)
    got = _np(experts(x))
    np.testing.assert_allclose(got.reshape(E, 10, D), expected, rtol=1e-4, atol=1e-4)
    # int8 keeps the outputs within ~1% of the float ones (127 levels per
    # row and column: relative rounding <= 1/254 per factor).
    error = np.abs(got - float_out).max() / np.abs(float_out).max()
    assert 0 < error < 0.02, error
    assert [v.name for v in experts.trainable_weights] == [
        "intermediate_bias",
        "output_bias",
    ]


def test_gradients_reach_the_inputs_through_int8_experts():
    experts, _ = _experts_with_weights()
    x = np.random.RandomState(1).normal(size=(E, 4, D)).astype("float32")
    float_grad = _input_gradient(experts, x)
    experts.quantize("int8")
    int8_grad = _input_gradient(experts, x)
    assert np.abs(float_grad).max() > 0.1
    error = np.abs(int8_grad - float_grad).max() / np.abs(float_grad).max()
    assert error < 0.05, error


def _input_gradient(layer, x):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: layer(v).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = tf.reduce_sum(layer(v))
        return tape.gradient(y, v).numpy()
    import torch

    v = torch.tensor(x, requires_grad=True)
    layer(v).sum().backward()
    return v.grad.numpy()


def test_quantized_layer_saves_and_loads_exactly(tmp_path):
    experts, _ = _experts_with_weights()
    # Keras' "batch" axis is the experts' axis here: inputs (E, 5, d).
    model = keras.Sequential([keras.Input((5, D), batch_size=E), experts])
    x = np.random.RandomState(2).normal(size=(E, 5, D)).astype("float32")
    model.quantize("int8")  # reaches the experts: a layer without sublayers
    assert experts.quantization_mode == "int8"
    expected = _np(model(x))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    restored_experts = [layer for layer in restored.layers if layer.name == "experts"][
        0
    ]
    assert restored_experts.quantization_mode == "int8"
    np.testing.assert_array_equal(_np(restored(x)), expected)


def test_unsupported_modes_and_unbuilt_layers():
    experts, _ = _experts_with_weights()
    with pytest.raises(NotImplementedError):
        experts.quantize("float8")
    with pytest.raises(ValueError, match="isn't yet built"):
        MlpExperts(num_experts=E, hidden_dim=H).quantize("int8")
    experts.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        experts.quantize("int8")
