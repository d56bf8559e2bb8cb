"""Sparsity-constrained optimal transport between tokens and experts.

Used by the Sparsity-constrained Expert Choice router (docs/routers.md,
"Sparsity-constrained Expert Choice";
Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport",
ICLR 2023, https://arxiv.org/abs/2209.15466).
"""

from keras import ops

from keras_vmoe.backend import top_k
from keras_vmoe.utils.checks import check_positive_float, check_positive_int, check_rank

_ADAM_BETA_1 = 0.9
_ADAM_BETA_2 = 0.999
_ADAM_EPSILON = 1e-8


def _top_k_and_threshold(x, k, lower_bound=None):
    """The `k` largest entries of each row and their simplex threshold.

    Args:
        x: float32 tensor `(..., n)` without -0.0 entries (see
            `_canonical_zeros`).
        k: int. `1 <= k <= n`.
        lower_bound: float32 tensor `(..., 1)` or None. A value that at
            least `k` entries of each row reach (e.g. the minimum over any
            `k` entries). Entries below it cannot be among the `k` largest,
            so they are hidden from the top-k, which is then cheaper on XLA
            CPU (about half the time for 520 entries and k = 36) and gives
            the same result.

    Returns:
        `(values, indices, tau)`: `(..., k)` sorted by decreasing value (on
        ties the lower index first), `(..., k)` int32, and the threshold
        `(..., 1)` of the simplex projection of `values`.
    """
    if lower_bound is not None:
        x = ops.where(ops.greater_equal(x, lower_bound), x, float("-inf"))  # (..., n)
    values, indices = top_k(x, k)  # (..., k), sorted by decreasing value
    return values, indices, simplex_threshold(values)


def simplex_threshold(values):
    """The threshold `tau` of the simplex projection of sorted `values`.

    `tau = max_j (sum_{i<=j} v_i - 1) / j` over values sorted by decreasing
    value: the maximum sits at the support size of the projection, which is
    `relu(values - tau)`.

    Args:
        values: float32 tensor `(..., k)`, sorted by decreasing value.

    Returns:
        float32 tensor `(..., 1)`.
    """
    ranks = ops.arange(1, values.shape[-1] + 1, dtype="float32")  # (k,)
    cumsum = ops.cumsum(values, axis=-1)  # (..., k)
    return ops.max((cumsum - 1.0) / ranks, axis=-1, keepdims=True)  # (..., 1)


def _projection_from_top_k(x, values, indices, tau):
    """Dense k-sparse projection `relu(x - tau)` on the top-k entries, else 0.

    The top-k set is rebuilt with a comparison instead of a scatter: the
    entries above the k-th value, plus the entries equal to it up to the
    k-th index (the top-k takes ties lowest index first, so these are
    exactly the ones it took).

    Args:
        x: float32 tensor `(..., n)`, without -0.0 entries.
        values, indices, tau: the outputs of `_top_k_and_threshold(x, k)`.

    Returns:
        float32 tensor `(..., n)`.
    """
    # The k-th value and index, by reductions over all k entries: slicing
    # out the last one would stop XLA from keeping its fast TopK (it then
    # sorts whole rows, about 8x slower on CPU).
    kth_value = ops.min(values, axis=-1, keepdims=True)  # (..., 1)
    kth_index = ops.max(
        ops.where(ops.equal(values, kth_value), indices, -1), axis=-1, keepdims=True
    )  # (..., 1): the largest index among the top-k ties at the k-th value
    positions = ops.arange(x.shape[-1], dtype="int32")  # (n,)
    in_top_k = ops.logical_or(
        ops.greater(x, kth_value),
        ops.logical_and(ops.equal(x, kth_value), ops.less_equal(positions, kth_index)),
    )  # (..., n)
    return ops.where(in_top_k, ops.relu(x - tau), 0.0)  # (..., n)


def _canonical_zeros(x):
    """`x` with -0.0 replaced by +0.0, so that ties compare alike everywhere.

    XLA's top-k ranks +0.0 above -0.0 while comparisons treat them as equal;
    `x + 0.0` is not enough (XLA folds it away).
    """
    return ops.where(ops.equal(x, 0.0), 0.0, x)


def ksparse_simplex_projection(x, k, axis=-1):
    """Euclidean projection onto the simplex with at most `k` non-zeros.

    Solves `argmin_p ||p - x||^2` over probability vectors `p` (non-negative,
    summing to 1) with at most `k` non-zero entries, independently along
    `axis`. The solution keeps the `k` largest entries of `x` (on ties the
    lower index wins, on every backend; -0.0 ties with 0.0), projects them
    onto the ordinary simplex with the sort-based algorithm and sets every
    other entry to 0 (Kyrillidis et al., ICML 2013,
    https://arxiv.org/abs/1206.1529). Computed in float32.

    Args:
        x: tensor. Values to project, any float dtype, rank >= 1.
        k: int. Maximum number of non-zeros; `k` larger than the axis length
            means no sparsity constraint.
        axis: int. The axis holding each vector. Defaults to -1.

    Returns:
        float32 tensor with the shape of `x`: entries along `axis` are
        non-negative, sum to 1 and at most `k` of them are non-zero.

    Example:

    >>> import numpy as np
    >>> p = ksparse_simplex_projection(np.array([0.5, 2.0, 1.6], "float32"), 1)
    >>> np.asarray(p).tolist()
    [0.0, 1.0, 0.0]
    """
    k = check_positive_int("k", k)
    x = ops.convert_to_tensor(x)
    if len(x.shape) < 1:
        raise ValueError(f"`x` must have rank >= 1, got shape {tuple(x.shape)}.")
    if not isinstance(axis, int) or not -len(x.shape) <= axis < len(x.shape):
        raise ValueError(f"`axis` {axis!r} is out of range for rank {len(x.shape)}.")
    x = _canonical_zeros(ops.moveaxis(ops.cast(x, "float32"), axis, -1))  # (..., n)
    k = min(k, x.shape[-1])
    values, indices, tau = _top_k_and_threshold(x, k)  # (..., k), (..., k), (..., 1)
    projected = _projection_from_top_k(x, values, indices, tau)  # (..., n)
    return ops.moveaxis(projected, -1, axis)


def sparse_ot_plan(similarity, k, num_steps=20, learning_rate=0.01):
    """Sparsity-constrained OT plan with at most `k` tokens per expert.

    Quadratically regularised optimal transport (gamma 1) between the tokens
    of each group (marginals `a = 1`) and the experts (marginals
    `b = S / E`), with at most `k` non-zeros in every expert column. Solves
    the semi-dual, for each group,

        min_alpha  sum_j b_j * max_{p in simplex, ||p||_0 <= k}
                   [<p, alpha + s_j> - (b_j / 2) ||p||^2]  -  sum_i alpha_i

    whose inner maximiser is `p_j = ksparse_simplex_projection(
    (alpha + s_j) / b_j, k)` and whose gradient is `rowsum(P) - 1` with
    `P[:, j] = b_j * p_j`. The solver is Adam (beta1 0.9, beta2 0.999,
    eps 1e-8, bias-corrected) run for `num_steps` steps from `alpha = 0`.
    Expert columns of the returned plan sum to exactly `S / E` after every
    step. Token rows approach 1 as the solve converges only where the
    relaxation is tight (e.g. `k >= S`, or `k = S / E` with a clear best
    assignment): for `S / E < k < S` the semi-dual is a convex relaxation of
    a non-convex problem, so the plan at its optimum is k-sparse but its rows
    may stay off 1. Computed in float32; no gradient flows through the solve.

    Reference: Liu, Puigcerver, Blondel, ICLR 2023,
    https://arxiv.org/abs/2209.15466; Blondel, Seguy, Rolet, AISTATS 2018,
    https://arxiv.org/abs/1710.06276 (semi-dual, eq. 10).

    Args:
        similarity: tensor. Token-expert similarities of shape `(G, S, E)`
            (the routers pass `softmax(logits)`), any float dtype.
        k: int. Maximum number of non-zero tokens per expert column (the
            expert capacity in the router).
        num_steps: int. Number of Adam steps. Defaults to 20.
        learning_rate: float. Adam learning rate. Defaults to 0.01.

    Returns:
        float32 tensor of shape `(G, S, E)`: the plan `P` at the final
        `alpha`, wrapped in `stop_gradient`.

    Example:

    >>> import numpy as np
    >>> s = np.random.default_rng(0).random((1, 8, 2)).astype("float32")
    >>> plan = np.asarray(sparse_ot_plan(s, k=4))
    >>> plan.sum(axis=1).round(5).tolist()
    [[4.0, 4.0]]
    """
    k = check_positive_int("k", k)
    num_steps = check_positive_int("num_steps", num_steps)
    learning_rate = check_positive_float("learning_rate", learning_rate)
    similarity = ops.convert_to_tensor(similarity)
    check_rank("similarity", similarity, 3, "(groups, tokens, experts)")
    similarity = ops.cast(ops.stop_gradient(similarity), "float32")  # (G, S, E)
    num_tokens = similarity.shape[1]
    k = min(k, num_tokens)
    plan_t, _, _ = _solve_transposed(similarity, k, num_steps, learning_rate)
    plan = ops.transpose(plan_t, (0, 2, 1))  # (G, S, E)
    return ops.stop_gradient(plan)


def sparse_ot_plan_with_top_k(similarity, k, num_steps=20, learning_rate=0.01):
    """`sparse_ot_plan`, plus each expert column's top-k tokens of the solve.

    The solver's last step ranks the tokens of every expert column by
    `z = (alpha + s_j) / b`; the plan is `b * relu(z - tau_j)` on the top `k`
    of them and 0 elsewhere. This returns that ranking with the plan, so
    that a caller ranking tokens by plan value (Expert Choice) can reuse it
    instead of a second top-k: the plan is non-increasing along it.

    Args:
        similarity: tensor `(G, S, E)`, any float dtype.
        k: int. Maximum number of non-zeros per expert column, `k <= S`.
        num_steps: int. Number of Adam steps. Defaults to 20.
        learning_rate: float. Adam learning rate. Defaults to 0.01.

    Returns:
        `(plan, top_tokens)`: the float32 plan `(G, S, E)` of
        `sparse_ot_plan` and int32 `(G, E, k)`, each column's `k` tokens of
        largest `z` in decreasing order (ties: lower index first), both
        without gradient.
    """
    k = check_positive_int("k", k)
    num_steps = check_positive_int("num_steps", num_steps)
    learning_rate = check_positive_float("learning_rate", learning_rate)
    similarity = ops.convert_to_tensor(similarity)
    check_rank("similarity", similarity, 3, "(groups, tokens, experts)")
    if k > similarity.shape[1]:
        raise ValueError(f"`k` ({k}) must be at most S ({similarity.shape[1]}).")
    similarity = ops.cast(ops.stop_gradient(similarity), "float32")  # (G, S, E)
    plan_t, _, top_tokens = _solve_transposed(
        similarity, k, num_steps, learning_rate
    )  # (G, E, S), (G, E, k)
    plan = ops.transpose(plan_t, (0, 2, 1))  # (G, S, E)
    return ops.stop_gradient(plan), ops.stop_gradient(top_tokens)


def _solve_transposed(similarity, k, num_steps, learning_rate):
    """Runs the Adam solve of `sparse_ot_plan`, expert-major.

    Each step needs the top-k tokens of every expert column of
    `z = (alpha + s_j) / b`. From the second step on, the previous step's
    top-k tokens bound the new k-th value from below (they are k tokens, so
    the k-th largest value is at least their minimum at the new `alpha`);
    tokens below that bound are hidden from the top-k, which gives the same
    tokens and values in about half the time on XLA CPU.

    Args:
        similarity: float32 tensor `(G, S, E)`, no gradient.
        k: int. `1 <= k <= S`.
        num_steps: int. Adam steps.
        learning_rate: float. Adam learning rate.

    Returns:
        `(plan_t, values, indices)`: the transposed plan `P^T` `(G, E, S)`
        at the final `alpha`, and each expert column's top-k values of
        `z` (decreasing) and token indices `(G, E, k)`, from which `P^T` is
        `b * relu(values - tau)` at `indices`.
    """
    num_tokens, num_experts = similarity.shape[1], similarity.shape[2]
    b = num_tokens / num_experts  # expert marginal (gamma = 1)
    # Expert-major layout, so each projection runs along the last axis.
    similarity_t = _canonical_zeros(ops.transpose(similarity, (0, 2, 1)))  # (G, E, S)

    def project(alpha, previous_indices):
        """Top-k of `z = (alpha + s_j) / b` and the plan `P^T` `(G, E, S)`."""
        z = (alpha[:, None, :] + similarity_t) / b  # (G, E, S)
        lower_bound = None
        if previous_indices is not None:
            previous = ops.take_along_axis(z, previous_indices, axis=2)  # (G, E, k)
            lower_bound = ops.min(previous, axis=2, keepdims=True)  # (G, E, 1)
        values, indices, tau = _top_k_and_threshold(z, k, lower_bound)
        plan_t = b * _projection_from_top_k(z, values, indices, tau)  # (G, E, S)
        return plan_t, values, indices

    def adam_step(step, state, previous_indices):
        """One bias-corrected Adam step on the semi-dual objective."""
        alpha, m, v = state  # each (G, S)
        plan_t, _, indices = project(alpha, previous_indices)
        grad = ops.sum(plan_t, axis=1) - 1.0  # (G, S): rowsum(P) - 1
        m = _ADAM_BETA_1 * m + (1.0 - _ADAM_BETA_1) * grad
        v = _ADAM_BETA_2 * v + (1.0 - _ADAM_BETA_2) * ops.square(grad)
        t = ops.cast(step + 1, "float32")
        m_hat = m / (1.0 - ops.power(_ADAM_BETA_1, t))
        v_hat = v / (1.0 - ops.power(_ADAM_BETA_2, t))
        alpha = alpha - learning_rate * m_hat / (ops.sqrt(v_hat) + _ADAM_EPSILON)
        return alpha, m, v, indices

    zeros = ops.zeros_like(similarity[:, :, 0])  # (G, S)
    # The first step has no previous top-k; the others carry theirs.
    state = adam_step(0, (zeros, zeros, zeros), None)
    state = ops.fori_loop(
        1, num_steps, lambda step, st: adam_step(step, st[:3], st[3]), state
    )
    alpha, _, _, indices = state
    return project(alpha, indices)
