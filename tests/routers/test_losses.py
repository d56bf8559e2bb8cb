import numpy as np
import pytest
from keras import ops

from keras_vmoe.routers import gshard_loss, importance_loss, load_loss, router_z_loss
from tests import numpy_reference as ref

RNG = np.random.default_rng(7)
CLEAN = RNG.normal(size=(3, 16, 6)).astype("float32")
NOISY = (CLEAN + RNG.normal(size=CLEAN.shape) / 6).astype("float32")


def np_(x):
    return ops.convert_to_numpy(x)


def test_importance_loss_matches_numpy():
    gates = ref.softmax(CLEAN.astype("float64"))
    np.testing.assert_allclose(
        np_(importance_loss(gates.astype("float32"))),
        ref.importance_loss(gates),
        rtol=1e-4,
    )


def test_importance_loss_hand_worked():
    # Importance per expert (0.5+0.5, 0.5+0.5) -> balanced -> 0.
    # (1+1, 0+0): mean 1, population variance 1 -> CV^2 = 1.
    gates = np.array([[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [1.0, 0.0]]], "float32")
    np.testing.assert_allclose(np_(importance_loss(gates)), [0.0, 1.0], atol=1e-7)


@pytest.mark.parametrize("k", [1, 2])
def test_load_loss_matches_numpy(k):
    np.testing.assert_allclose(
        np_(load_loss(CLEAN, NOISY, noise_std=1.0, num_selected_experts=k)),
        ref.load_loss(CLEAN.astype("float64"), NOISY.astype("float64"), 1.0, k),
        rtol=1e-4,
        atol=1e-7,
    )


def test_load_loss_requires_noise():
    with pytest.raises(ValueError, match="noise_std"):
        load_loss(CLEAN, NOISY, noise_std=0.0, num_selected_experts=1)


def test_gshard_loss_matches_numpy():
    gates = ref.softmax(CLEAN.astype("float64"))
    np.testing.assert_allclose(
        np_(gshard_loss(gates.astype("float32"))), ref.gshard_loss(gates), rtol=1e-5
    )


def test_gshard_loss_hand_worked():
    # Uniform gates 1/E with top-1 fractions (1, 0) (ties -> expert 0):
    # E^2 * mean_e(frac_e * gate_e) = 4 * (1 * 0.5 + 0 * 0.5) / 2 = 1.
    gates = np.full((1, 4, 2), 0.5, "float32")
    np.testing.assert_allclose(np_(gshard_loss(gates)), [1.0], rtol=1e-6)


def test_router_z_loss_matches_numpy():
    np.testing.assert_allclose(
        np_(router_z_loss(CLEAN)), ref.z_loss(CLEAN.astype("float64")), rtol=1e-5
    )
    # logits (0, 0): logsumexp = log 2 -> (log 2)^2.
    np.testing.assert_allclose(
        np_(router_z_loss(np.zeros((1, 3, 2), "float32"))), [np.log(2) ** 2], rtol=1e-6
    )
