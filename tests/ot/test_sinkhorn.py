"""Tests for `keras_vmoe.ot.sinkhorn_plan` against an independent NumPy Sinkhorn."""

import numpy as np
import pytest
from keras import ops

from keras_vmoe.ot import sinkhorn_plan
from keras_vmoe.ot.sinkhorn import (
    KERNEL_FORM_MAX_SPREAD,
    _kernel_form_plan,
    _log_domain_plan,
)


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


def _both_forms(scores, num_iters=20):
    """The kernel-form and log-domain plans of float32 `scores` `(G, S, E)`."""
    scores = ops.convert_to_tensor(np.asarray(scores, "float32"))
    log_b = np.log(scores.shape[1] / scores.shape[2])
    kernel = ops.convert_to_numpy(_kernel_form_plan(scores, num_iters, log_b))
    log = ops.convert_to_numpy(_log_domain_plan(scores, num_iters, log_b))
    return kernel, log


@pytest.mark.parametrize("shape", [(3, 16, 4), (2, 520, 32), (2, 5, 8), (1, 1, 3)])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_kernel_and_log_forms_agree_on_moderate_logits(shape, scale):
    rng = np.random.default_rng(int(10 * scale) + shape[1])
    scores = scale * rng.normal(size=shape)
    kernel, log = _both_forms(scores)
    np.testing.assert_allclose(kernel, log, atol=1e-5)
    np.testing.assert_allclose(kernel, numpy_sinkhorn(scores), atol=1e-5)
    for iters in (1, 3):
        kernel, log = _both_forms(scores, num_iters=iters)
        np.testing.assert_allclose(kernel, log, atol=1e-5)


@pytest.mark.parametrize("pattern", ["uniform", "binary", "one_row", "one_column"])
@pytest.mark.parametrize("shape", [(1, 4, 1), (1, 64, 2), (1, 520, 32), (1, 3, 128)])
def test_kernel_form_is_safe_up_to_its_spread_limit(pattern, shape):
    # Spread exactly at the limit, in patterns that push the Sinkhorn
    # potentials furthest from 0: the kernel form stays finite and equal to
    # the log-domain form.
    spread = KERNEL_FORM_MAX_SPREAD
    rng = np.random.default_rng(0)
    if pattern == "uniform":
        scores = rng.uniform(0.0, spread, size=shape)
        scores[0, 0, 0], scores[0, -1, -1] = 0.0, spread
    elif pattern == "binary":
        scores = spread * (rng.random(shape) < 0.5)
        scores[0, 0, 0], scores[0, -1, -1] = 0.0, spread
    elif pattern == "one_row":
        scores = np.zeros(shape)
        scores[0, 0, :] = spread
    else:
        scores = np.zeros(shape)
        scores[0, :, 0] = spread
    scores = scores - 20.0  # an offset changes nothing
    kernel, log = _both_forms(scores)
    assert np.all(np.isfinite(kernel))
    np.testing.assert_allclose(kernel.sum(axis=2), 1.0, atol=1e-6)
    np.testing.assert_allclose(kernel, log, atol=1e-5)


@pytest.fixture
def form_sentinels(monkeypatch):
    """Makes the kernel form return 0s and the log-domain form 1s."""
    import keras_vmoe.ot.sinkhorn as sinkhorn_module

    monkeypatch.setattr(
        sinkhorn_module, "_kernel_form_plan", lambda s, n, b: ops.zeros_like(s)
    )
    monkeypatch.setattr(
        sinkhorn_module, "_log_domain_plan", lambda s, n, b: ops.ones_like(s)
    )

    def form(logits, **kwargs):
        plan = ops.convert_to_numpy(sinkhorn_plan(logits, **kwargs))
        assert np.all(plan == plan.flat[0])
        return "kernel" if plan.flat[0] == 0.0 else "log"

    return form


def test_form_is_chosen_by_the_largest_group_spread(form_sentinels):
    limit = KERNEL_FORM_MAX_SPREAD
    logits = np.zeros((3, 8, 4), "float32")
    logits[:, 0, 0] = limit
    assert form_sentinels(logits) == "kernel"
    # One group above the limit sends every group to the log domain.
    logits[1, 1, 1] = -0.01
    assert form_sentinels(logits) == "log"
    # The spread is measured on logits / epsilon.
    assert form_sentinels(logits, epsilon=1.001) == "kernel"
    assert form_sentinels(1e4 * logits) == "log"


def test_non_finite_logits_take_the_log_domain_form(form_sentinels):
    for value in (np.inf, -np.inf, np.nan):
        logits = np.zeros((2, 4, 2), "float32")
        logits[1, 0, 0] = value
        assert form_sentinels(logits) == "log"


def test_mixed_spreads_match_numpy():
    # One moderate group and one with a spread of 100: the log domain runs
    # for both and still matches the float64 kernel-form reference.
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 16, 4)).astype("float32")
    logits[1] *= 2.0 * KERNEL_FORM_MAX_SPREAD / np.ptp(logits[1])
    plan = ops.convert_to_numpy(sinkhorn_plan(logits))
    np.testing.assert_allclose(plan, numpy_sinkhorn(logits), atol=1e-5)


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
