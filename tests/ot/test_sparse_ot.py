"""Tests for `keras_vmoe.ot.ksparse_simplex_projection` and `sparse_ot_plan`."""

import itertools

import numpy as np
import pytest
from keras import ops

from keras_vmoe.ot import (
    ksparse_simplex_projection,
    sparse_ot_plan,
    sparse_ot_plan_with_top_k,
)
from keras_vmoe.ot.sparse import _projection_from_top_k, _top_k_and_threshold


def numpy_simplex_projection(v):
    """Projection onto the probability simplex (Held et al.), float64."""
    v = np.asarray(v, np.float64)
    u = np.sort(v)[::-1]
    cumsum = np.cumsum(u)
    rho = max(j for j in range(1, len(v) + 1) if u[j - 1] - (cumsum[j - 1] - 1) / j > 0)
    tau = (cumsum[rho - 1] - 1) / rho
    return np.maximum(v - tau, 0.0)


def brute_force_ksparse_projection(x, k):
    """Nearest point over every face of the simplex with <= k vertices."""
    x = np.asarray(x, np.float64)
    best, best_dist = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(len(x)), size):
            p = np.zeros_like(x)
            p[list(support)] = numpy_simplex_projection(x[list(support)])
            dist = np.sum((p - x) ** 2)
            if dist < best_dist - 1e-12:
                best, best_dist = p, dist
    return best


def numpy_ksparse(x, k):
    """Top-k (stable, lower index first) then simplex projection, float64."""
    x = np.asarray(x, np.float64)
    top = np.argsort(-x, kind="stable")[:k]
    p = np.zeros_like(x)
    p[top] = numpy_simplex_projection(x[top])
    return p


def numpy_sparse_ot(similarity, k, num_steps, learning_rate):
    """Adam on the semi-dual of k-sparse quadratic OT, one group at a time."""
    similarity = np.asarray(similarity, np.float64)
    plans = []
    for s in similarity:
        tokens, experts = s.shape
        b = tokens / experts

        def plan(alpha, s=s, b=b, experts=experts):
            cols = [b * numpy_ksparse((alpha + s[:, j]) / b, k) for j in range(experts)]
            return np.stack(cols, axis=1)

        alpha, m, v = np.zeros(tokens), np.zeros(tokens), np.zeros(tokens)
        for t in range(1, num_steps + 1):
            grad = plan(alpha).sum(axis=1) - 1.0
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
            alpha = alpha - learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
        plans.append(plan(alpha))
    return np.stack(plans)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_ksparse_projection_matches_brute_force(k):
    rng = np.random.default_rng(k)
    for scale in (0.3, 1.0, 3.0):
        x = (scale * rng.normal(size=(5, 6))).astype("float32")
        p = ops.convert_to_numpy(ksparse_simplex_projection(x, k))
        expected = np.stack([brute_force_ksparse_projection(row, k) for row in x])
        np.testing.assert_allclose(p, expected, atol=1e-6)
        assert np.all((p > 0).sum(axis=-1) <= k)
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-6)


def test_ksparse_projection_other_axis():
    x = np.random.default_rng(7).normal(size=(2, 6, 3)).astype("float32")
    p = ops.convert_to_numpy(ksparse_simplex_projection(x, 2, axis=1))
    for g in range(2):
        for j in range(3):
            expected = brute_force_ksparse_projection(x[g, :, j], 2)
            np.testing.assert_allclose(p[g, :, j], expected, atol=1e-6)


def test_ksparse_projection_by_hand():
    # Top-2 of [0.1, 0.8, 0.5] is {0.8, 0.5}: tau = (1.3 - 1) / 2 = 0.15.
    p = ksparse_simplex_projection(np.array([0.1, 0.8, 0.5], "float32"), 2)
    np.testing.assert_allclose(ops.convert_to_numpy(p), [0.0, 0.65, 0.35], atol=1e-6)
    # k >= length is the ordinary simplex projection.
    p = ksparse_simplex_projection(np.array([0.1, 0.8, 0.5], "float32"), 10)
    np.testing.assert_allclose(
        ops.convert_to_numpy(p), numpy_simplex_projection([0.1, 0.8, 0.5]), atol=1e-6
    )


def test_ksparse_projection_ties_keep_lower_index_and_at_most_k():
    x = np.array([[0.2, 0.7, 0.7, 0.7, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]], "float32")
    p = ops.convert_to_numpy(ksparse_simplex_projection(x, 2))
    np.testing.assert_allclose(p[0], [0.0, 0.5, 0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0, 0.0, 0.0], atol=1e-6)
    assert np.all((p > 0).sum(axis=-1) <= 2)


def test_ksparse_projection_bfloat16():
    x = ops.cast(np.array([3.0, 1.0, 2.0, 0.0], "float32"), "bfloat16")
    p = ksparse_simplex_projection(x, 2)
    assert ops.dtype(p) == "float32"
    np.testing.assert_allclose(ops.convert_to_numpy(p), [1.0, 0.0, 0.0, 0.0])


def _tied_values(rng, shape, levels):
    """float32 values on a coarse grid, so that many entries tie."""
    return (rng.integers(-levels, levels + 1, size=shape) / levels).astype("float32")


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_ksparse_projection_with_many_ties_matches_numpy(k):
    rng = np.random.default_rng(10 + k)
    for levels in (2, 5, 50):
        x = _tied_values(rng, (7, 20), levels)
        x[0, :4] = [0.0, -0.0, -0.0, 0.0]  # -0.0 ties with 0.0
        p = ops.convert_to_numpy(ksparse_simplex_projection(x, k))
        expected = np.stack([numpy_ksparse(row, k) for row in x])
        np.testing.assert_allclose(p, expected, atol=1e-6)
        assert np.all((p > 0).sum(axis=-1) <= k)


def test_negative_zero_ties_with_zero():
    x = np.array([[-0.0, 0.0, -0.0], [0.0, -0.0, -1.0]], "float32")
    p = ops.convert_to_numpy(ksparse_simplex_projection(x, 1))
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


def _bounded_top_k(x, k, lower_bound=None):
    x = ops.convert_to_tensor(x)
    values, indices, tau = _top_k_and_threshold(x, k, lower_bound)
    dense = _projection_from_top_k(x, values, indices, tau)
    return [ops.convert_to_numpy(t) for t in (values, indices, tau, dense)]


@pytest.mark.parametrize("k", [1, 4, 9, 30])
def test_lower_bound_gives_the_same_top_k(k):
    # Any k entries of a row bound its k-th largest value from below; with
    # such a bound (loose, or exactly the k-th value, ties included) the
    # bounded top-k, threshold and projection equal the unbounded ones.
    rng = np.random.default_rng(k)
    for levels in (3, 1000):
        x = _tied_values(rng, (2, 5, 30), levels)
        unbounded = _bounded_top_k(x, k)
        subset = np.stack([rng.permutation(30)[:k] for _ in range(10)]).reshape(2, 5, k)
        loose = np.take_along_axis(x, subset, axis=-1).min(axis=-1, keepdims=True)
        tight = unbounded[0][..., -1:]  # the k-th value itself
        for bound in (loose, tight):
            bounded = _bounded_top_k(x, k, ops.convert_to_tensor(bound))
            for got, want in zip(bounded, unbounded):
                np.testing.assert_array_equal(got, want)
        # The projection is the k-sparse one.
        expected = np.stack([numpy_ksparse(row, k) for row in x.reshape(-1, 30)])
        np.testing.assert_allclose(unbounded[3].reshape(-1, 30), expected, atol=1e-6)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_sparse_ot_matches_numpy_adam():
    rng = np.random.default_rng(0)
    similarity = _softmax(rng.normal(size=(2, 12, 3))).astype("float32")
    plan = ops.convert_to_numpy(sparse_ot_plan(similarity, k=5, num_steps=3))
    expected = numpy_sparse_ot(similarity, 5, num_steps=3, learning_rate=0.01)
    np.testing.assert_allclose(plan, expected, atol=1e-5)
    plan = ops.convert_to_numpy(
        sparse_ot_plan(similarity, k=3, num_steps=3, learning_rate=0.2)
    )
    expected = numpy_sparse_ot(similarity, 3, num_steps=3, learning_rate=0.2)
    np.testing.assert_allclose(plan, expected, atol=1e-5)


def test_sparse_ot_bounded_top_k_changes_nothing(monkeypatch):
    # The solver hides tokens below the previous step's top-k from each
    # top-k. On inputs full of ties (coarse similarities, duplicated tokens)
    # and on random ones, the plan equals, bit for bit, the plan of the same
    # solver with every top-k over all tokens.
    import keras_vmoe.ot.sparse as sparse_module

    rng = np.random.default_rng(4)
    tied = _tied_values(rng, (2, 16, 4), 4) * 0.5 + 0.5
    tied[:, 8:] = tied[:, :8]
    random = _softmax(rng.normal(size=(2, 40, 5))).astype("float32")
    settings = [(tied, 3, 5), (tied, 4, 20), (tied, 9, 20), (random, 8, 20)]
    bounded = [
        ops.convert_to_numpy(sparse_ot_plan(s, k=k, num_steps=n))
        for s, k, n in settings
    ]
    unbounded_top_k = sparse_module._top_k_and_threshold
    monkeypatch.setattr(
        sparse_module,
        "_top_k_and_threshold",
        lambda x, k, lower_bound=None: unbounded_top_k(x, k),
    )
    for plan, (s, k, n) in zip(bounded, settings):
        expected = ops.convert_to_numpy(sparse_ot_plan(s, k=k, num_steps=n))
        np.testing.assert_array_equal(plan, expected)


def test_plan_with_top_k_ranks_each_column():
    rng = np.random.default_rng(8)
    similarity = _softmax(rng.normal(size=(2, 30, 4))).astype("float32")
    plan, top = sparse_ot_plan_with_top_k(similarity, k=9, num_steps=6)
    plan, top = ops.convert_to_numpy(plan), ops.convert_to_numpy(top)
    assert top.shape == (2, 4, 9) and top.dtype == np.int32
    np.testing.assert_array_equal(
        plan, ops.convert_to_numpy(sparse_ot_plan(similarity, k=9, num_steps=6))
    )
    for g in range(2):
        for j in range(4):
            column = plan[g, :, j]
            assert len(set(top[g, j])) == 9
            # Every non-zero is among the top tokens, and the plan does not
            # increase along them.
            assert set(np.flatnonzero(column)) <= set(top[g, j])
            assert np.all(np.diff(column[top[g, j]]) <= 0.0)
    with pytest.raises(ValueError, match="k"):
        sparse_ot_plan_with_top_k(similarity, k=31)


def _best_balanced_assignment_value(s):
    """max <P, s> - |P|^2 / 2 over 0/1 plans giving each expert S / E tokens."""
    tokens, experts = s.shape
    per_expert = tokens // experts
    best = -np.inf
    for perm in itertools.permutations(range(tokens)):
        # Canonical form only: tokens of each expert in increasing order.
        chunks = [perm[j * per_expert : (j + 1) * per_expert] for j in range(experts)]
        if any(list(c) != sorted(c) for c in chunks):
            continue
        value = sum(s[i, j] for j, c in enumerate(chunks) for i in c) - tokens / 2
        best = max(best, value)
    return best


def test_sparse_ot_converges_with_many_steps():
    # k = S / E: here the relaxation is tight and the solve reaches a feasible
    # plan. (For S / E < k < S the k-sparse semi-dual is a convex relaxation
    # of a non-convex problem and row sums can stay off 1; see the solver's
    # docstring.)
    rng = np.random.default_rng(1)
    similarity = _softmax(3.0 * rng.normal(size=(4, 6, 3))).astype("float32")
    plan = ops.convert_to_numpy(
        sparse_ot_plan(similarity, k=2, num_steps=2000, learning_rate=0.01)
    )
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=1e-3)
    np.testing.assert_allclose(plan.sum(axis=1), 6 / 3, atol=1e-5)
    assert np.all((plan > 0).sum(axis=1) <= 2)
    assert np.all(plan >= 0.0)
    # A feasible plan at a dual stationary point is primal optimal: at least
    # as good as the best hard balanced assignment.
    for g in range(4):
        value = np.sum(plan[g] * similarity[g]) - 0.5 * np.sum(plan[g] ** 2)
        assert value >= _best_balanced_assignment_value(similarity[g]) - 1e-3


def test_sparse_ot_without_sparsity_converges():
    # k = S: ordinary quadratically regularised OT (smooth semi-dual).
    rng = np.random.default_rng(2)
    similarity = _softmax(rng.normal(size=(2, 6, 2))).astype("float32")
    plan = ops.convert_to_numpy(
        sparse_ot_plan(similarity, k=6, num_steps=2000, learning_rate=0.01)
    )
    # Constant-step Adam hovers around the optimum rather than landing on it.
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=5e-3)
    np.testing.assert_allclose(plan.sum(axis=1), 3.0, atol=1e-5)


def test_sparse_ot_default_steps_keeps_columns_and_sparsity():
    rng = np.random.default_rng(2)
    similarity = _softmax(rng.normal(size=(3, 32, 8))).astype("float32")
    plan = ops.convert_to_numpy(sparse_ot_plan(similarity, k=4))
    np.testing.assert_allclose(plan.sum(axis=1), 32 / 8, atol=1e-5)
    assert np.all((plan > 0).sum(axis=1) <= 4)
    expected = numpy_sparse_ot(similarity, 4, num_steps=20, learning_rate=0.01)
    np.testing.assert_allclose(plan, expected, atol=1e-4)


def test_sparse_ot_first_step_by_hand():
    # With one step, the plan is at alpha = -lr * sign(grad(0)) (Adam's first
    # step has size lr). 2 tokens, 1 expert, k = 1, b = 2: at alpha = 0 the
    # expert takes token 0 (similarity 0.9 > 0.1), so grad = [2 - 1, -1].
    similarity = np.array([[[0.9], [0.1]]], "float32")
    plan = ops.convert_to_numpy(sparse_ot_plan(similarity, k=1, num_steps=1))
    np.testing.assert_allclose(plan, [[[2.0], [0.0]]], atol=1e-6)
    # With k = 2 both tokens share: p = proj((alpha + s) / 2) with
    # alpha = [-0.01, 0.01]: (0.445, 0.055) -> tau = -0.25 -> p = (.695, .305).
    plan = ops.convert_to_numpy(sparse_ot_plan(similarity, k=2, num_steps=1))
    np.testing.assert_allclose(plan, [[[1.39], [0.61]]], atol=1e-5)


def test_sparse_ot_bfloat16_input():
    rng = np.random.default_rng(3)
    similarity = _softmax(rng.normal(size=(1, 16, 4))).astype("float32")
    plan = sparse_ot_plan(ops.cast(similarity, "bfloat16"), k=4)
    assert ops.dtype(plan) == "float32"
    plan = ops.convert_to_numpy(plan)
    np.testing.assert_allclose(plan.sum(axis=1), 4.0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": 2, "num_steps": 0}, "num_steps"),
        ({"k": 2, "learning_rate": 0.0}, "learning_rate"),
        ({"k": 2, "learning_rate": -0.1}, "learning_rate"),
    ],
)
def test_sparse_ot_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sparse_ot_plan(np.full((1, 4, 2), 0.5, "float32"), **kwargs)


def test_bad_rank_and_k():
    with pytest.raises(ValueError, match="similarity"):
        sparse_ot_plan(np.full((4, 2), 0.5, "float32"), k=2)
    with pytest.raises(ValueError, match="k"):
        ksparse_simplex_projection(np.ones((3,), "float32"), 0)
    with pytest.raises(ValueError, match="x"):
        ksparse_simplex_projection(np.float32(1.0), 1)
