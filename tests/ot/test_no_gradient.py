"""No gradient flows through a transport plan, on every backend.

The routers rank tokens on the plans but weight expert outputs with
`softmax(logits)`, so the plans are constants to the optimiser
(docs/routers.md, "Sinkhorn Token Choice", "Sinkhorn Expert Choice" and
"Sparsity-constrained Expert Choice").
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe.ot import sinkhorn_plan, sparse_ot_plan, sparse_ot_plan_with_top_k

LOGITS = np.random.default_rng(0).normal(size=(2, 8, 4)).astype("float32")
WEIGHTS = np.random.default_rng(1).normal(size=(2, 8, 4)).astype("float32")


def gradient(fn, x):
    """d sum(fn(x) * WEIGHTS) / dx as NumPy; zeros where nothing connects."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: (fn(v) * WEIGHTS).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(fn(x) * WEIGHTS)
        grad = tape.gradient(y, x, unconnected_gradients="zero")
        return grad.numpy()
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = (fn(x) * torch.tensor(WEIGHTS)).sum()
    if not y.requires_grad:  # the graph never reached x
        return np.zeros(x.shape, "float32")
    (grad,) = torch.autograd.grad(y, x, allow_unused=True)
    return np.zeros(x.shape, "float32") if grad is None else grad.numpy()


def test_the_gradient_helper_sees_a_connected_function():
    # d sum(softmax(x) * W) / dx is not zero: the helper can fail the tests below.
    grad = gradient(lambda x: ops.softmax(x, axis=-1), LOGITS)
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize(
    "plan",
    [
        lambda x: sinkhorn_plan(x),
        lambda x: sinkhorn_plan(1e3 * x),  # the log-domain form
        lambda x: sparse_ot_plan(ops.softmax(x, axis=-1), k=3),
        lambda x: sparse_ot_plan_with_top_k(ops.softmax(x, axis=-1), k=3)[0],
    ],
    ids=["sinkhorn", "sinkhorn_log_domain", "sparse_ot", "sparse_ot_with_top_k"],
)
def test_no_gradient_through_the_plan(plan):
    np.testing.assert_array_equal(gradient(plan, LOGITS), np.zeros_like(LOGITS))
