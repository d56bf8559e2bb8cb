"""`keras_vmoe.backend`: the backend-specific kernels, against NumPy."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import backend


def test_top_k_ties_go_to_the_lower_index():
    x = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]], "float32")
    values, indices = backend.top_k(x, 3)
    np.testing.assert_array_equal(ops.convert_to_numpy(indices), [[1, 3, 0]])
    np.testing.assert_array_equal(ops.convert_to_numpy(values), x[:, [1, 3, 0]])
    assert ops.convert_to_numpy(indices).dtype == np.int32


@pytest.mark.parametrize(
    "shape, k",
    [
        ((4, 3, 40), 1),
        ((4, 3, 40), 7),
        ((5, 32), 2),
        ((6, 520), 36),
        ((3, 9), 4),
        ((3, 9), 6),
        ((2, 9), 9),
    ],
)
def test_top_k_with_many_ties_equals_a_stable_sort(shape, k):
    # Coarse values tie often, also at the k-th value; ties go to the lower
    # index on every backend (torch fixes up torch.topk's arbitrary ties).
    rng = np.random.default_rng(k)
    for levels in (2, 7, 10_000):
        x = (rng.integers(0, levels, size=shape) / levels).astype("float32")
        # (Not -0.0: XLA's TopK ranks it below 0.0.)
        x.reshape(-1, shape[-1])[0, :3] = [0.0, np.inf, np.inf]
        values, indices = backend.top_k(x, k)
        expected = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(ops.convert_to_numpy(indices), expected)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(values), np.take_along_axis(x, expected, axis=-1)
        )
        assert ops.convert_to_numpy(indices).dtype == np.int32


def test_grouped_take_equals_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 5, 4).astype("float32")  # (G, S, d)
    idx = rng.randint(0, 5, size=(3, 7)).astype("int32")  # (G, N), repeats
    out = ops.convert_to_numpy(backend.grouped_take(x, idx))
    expected = np.stack([x[g][idx[g]] for g in range(3)])  # (G, N, d)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("tail", [(), (2,)])
def test_grouped_segment_sum_equals_numpy(tail):
    rng = np.random.RandomState(1)
    data = rng.randn(3, 6, *tail).astype("float32")  # (G, N, ...)
    ids = rng.randint(0, 4, size=(3, 6)).astype("int32")
    out = ops.convert_to_numpy(backend.grouped_segment_sum(data, ids, num_segments=4))
    expected = np.zeros((3, 4) + tail, "float32")
    for g in range(3):
        np.add.at(expected[g], ids[g], data[g])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # Segment 3 of a group that never names it stays 0.
    ids[0] = 0
    out = ops.convert_to_numpy(backend.grouped_segment_sum(data, ids, num_segments=4))
    np.testing.assert_allclose(out[0, 0], data[0].sum(0), rtol=1e-5)
    assert not out[0, 1:].any()


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX device mesh")
def test_top_k_under_a_device_mesh_equals_top_k():
    # Under a keras.distribution, JAX uses a stable sort (partitionable).
    x = np.array([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, -1.0, 5.0]], "float32")
    plain = [ops.convert_to_numpy(t) for t in backend.top_k(x, 3)]
    mesh = keras.distribution.DeviceMesh(
        (1,), ("batch",), keras.distribution.list_devices()[:1]
    )
    with keras.distribution.DataParallel(device_mesh=mesh).scope():
        sharded = [ops.convert_to_numpy(t) for t in backend.top_k(x, 3)]
    np.testing.assert_array_equal(plain[1], [[0, 2, 3], [3, 0, 1]])
    for a, b in zip(plain, sharded):
        np.testing.assert_array_equal(a, b)
    assert sharded[1].dtype == np.int32
