"""Tests for `keras_vmoe.ot.sinkhorn_plan` against an independent NumPy Sinkhorn."""

import numpy as np
import pytest
from keras import ops

from keras_vmoe.ot import sinkhorn_plan


def numpy_sinkhorn(logits, num_iters=20, epsilon=1.0):
    """Kernel-form Sinkhorn in float64: u, v scalings, columns then rows."""
    logits = np.asarray(logits, np.float64)
    groups, tokens, experts = logits.shape
    plans = []
    for g in range(groups):
        kernel = np.exp(logits[g] / epsilon)
        u, v = np.ones(tokens), np.ones(experts)
        for _ in range(num_iters):
            v = (tokens / experts) / (kernel.T @ u)
            u = 1.0 / (kernel @ v)
        plans.append(u[:, None] * kernel * v[None, :])
    return np.stack(plans)


def test_matches_numpy_sinkhorn():
    logits = np.random.default_rng(0).normal(size=(3, 16, 4)).astype("float32")
    plan = ops.convert_to_numpy(sinkhorn_plan(logits))
    np.testing.assert_allclose(plan, numpy_sinkhorn(logits), atol=1e-5)


def test_matches_numpy_sinkhorn_other_settings():
    logits = np.random.default_rng(1).normal(size=(2, 12, 3)).astype("float32")
    plan = ops.convert_to_numpy(sinkhorn_plan(logits, num_iters=7, epsilon=0.5))
    expected = numpy_sinkhorn(logits, num_iters=7, epsilon=0.5)
    np.testing.assert_allclose(plan, expected, atol=1e-5)


def test_one_iteration_by_hand():
    # One iteration from u = v = 1 on a 2x2 problem (S / E = 1):
    # v = 1 / colsum(K), then u normalises the rows of K diag(v).
    logits = np.log(np.array([[[1.0, 3.0], [1.0, 1.0]]], "float32"))
    plan = ops.convert_to_numpy(sinkhorn_plan(logits, num_iters=1))
    # K = [[1, 3], [1, 1]] -> v = [1/2, 1/4]; K diag(v) = [[.5, .75], [.5, .25]].
    expected = np.array([[[0.5 / 1.25, 0.75 / 1.25], [0.5 / 0.75, 0.25 / 0.75]]])
    np.testing.assert_allclose(plan, expected, atol=1e-6)


def test_constant_logits_give_uniform_plan():
    plan = ops.convert_to_numpy(sinkhorn_plan(np.full((2, 8, 4), 3.7, "float32")))
    np.testing.assert_allclose(plan, np.full((2, 8, 4), 0.25), atol=1e-7)


def test_rows_sum_to_one():
    logits = 3.0 * np.random.default_rng(2).normal(size=(4, 32, 8)).astype("float32")
    plan = ops.convert_to_numpy(sinkhorn_plan(logits))
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=1e-6)
    assert np.all(plan >= 0.0)


def test_columns_converge_with_many_iterations():
    logits = np.random.default_rng(3).normal(size=(2, 16, 4)).astype("float32")
    plan = ops.convert_to_numpy(sinkhorn_plan(logits, num_iters=500))
    np.testing.assert_allclose(plan.sum(axis=1), 16 / 4, atol=1e-4)
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=1e-6)
    # With 20 iterations the columns are not yet balanced on this input.
    few = ops.convert_to_numpy(sinkhorn_plan(4.0 * logits, num_iters=2))
    assert np.abs(few.sum(axis=1) - 4.0).max() > 1e-3


def test_finite_for_huge_logits():
    logits = 1e4 * np.random.default_rng(4).normal(size=(2, 16, 4)).astype("float32")
    plan = ops.convert_to_numpy(sinkhorn_plan(logits))
    assert np.all(np.isfinite(plan))
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=1e-6)
    # Huge logits make the plan (nearly) a hard assignment.
    np.testing.assert_allclose(plan.max(axis=2), 1.0, atol=1e-6)


def test_bfloat16_input_runs_in_float32():
    logits = np.random.default_rng(5).normal(size=(2, 16, 4)).astype("float32")
    low = ops.cast(logits, "bfloat16")
    plan = sinkhorn_plan(low)
    assert ops.dtype(plan) == "float32"
    plan = ops.convert_to_numpy(plan)
    assert np.all(np.isfinite(plan))
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=1e-6)
    rounded = ops.convert_to_numpy(ops.cast(low, "float32"))
    np.testing.assert_allclose(plan, numpy_sinkhorn(rounded), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_iters": 0}, "num_iters"),
        ({"num_iters": 2.5}, "num_iters"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sinkhorn_plan(np.zeros((1, 4, 2), "float32"), **kwargs)


def test_bad_rank():
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_plan(np.zeros((4, 2), "float32"))


def test_docstring_examples_run():
    import doctest

    import keras_vmoe.ot.sinkhorn

    result = doctest.testmod(keras_vmoe.ot.sinkhorn, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
