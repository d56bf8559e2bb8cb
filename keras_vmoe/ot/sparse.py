"""Sparsity-constrained optimal transport between tokens and experts.

Used by the Sparsity-constrained Expert Choice router (ROUTERS.md, router 5;
Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport",
ICLR 2023, https://arxiv.org/abs/2209.15466).
"""

from keras import ops

from keras_vmoe.backend import top_k
from keras_vmoe.ot._checks import check_positive_float, check_positive_int, check_rank

_ADAM_BETA_1 = 0.9
_ADAM_BETA_2 = 0.999
_ADAM_EPSILON = 1e-8


def _scatter_last_axis(values, indices, n):
    """Dense `(..., n)` tensor with `values` at `indices` along the last axis.

    Args:
        values: float tensor `(..., k)`.
        indices: int tensor `(..., k)`. Distinct positions in `[0, n)` per row.
        n: int. Length of the output's last axis.

    Returns:
        float32 tensor `(..., n)`, zero where no index points.
    """
    lead_shape = ops.shape(values)[:-1]
    k = values.shape[-1]
    flat_values = ops.reshape(values, (-1,))  # (M * k,)
    columns = ops.reshape(ops.cast(indices, "int32"), (-1, k))  # (M, k)
    rows = ops.arange(ops.shape(columns)[0], dtype="int32")[:, None]  # (M, 1)
    rows = ops.broadcast_to(rows, ops.shape(columns))  # (M, k)
    coords = ops.stack([ops.reshape(rows, (-1,)), ops.reshape(columns, (-1,))], 1)
    zeros = ops.zeros((ops.shape(columns)[0], n), "float32")  # (M, n)
    # `scatter_update` (not `scatter`, a Python loop on torch): vectorised on
    # every backend; the positions are distinct, so no accumulation is needed.
    dense = ops.scatter_update(zeros, coords, flat_values)  # (M, n)
    return ops.reshape(dense, (*lead_shape, n))


def ksparse_simplex_projection(x, k, axis=-1):
    """Euclidean projection onto the simplex with at most `k` non-zeros.

    Solves `argmin_p ||p - x||^2` over probability vectors `p` (non-negative,
    summing to 1) with at most `k` non-zero entries, independently along
    `axis`. The solution keeps the `k` largest entries of `x` (on ties the
    lower index wins, on every backend), projects them onto the ordinary
    simplex with the sort-based algorithm and sets every other entry to 0
    (Kyrillidis et al., ICML 2013, https://arxiv.org/abs/1206.1529).
    Computed in float32.

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
    k = check_positive_int(k, "k")
    x = ops.convert_to_tensor(x)
    if len(x.shape) < 1:
        raise ValueError(f"`x` must have rank >= 1, got shape {tuple(x.shape)}.")
    if not isinstance(axis, int) or not -len(x.shape) <= axis < len(x.shape):
        raise ValueError(f"`axis` {axis!r} is out of range for rank {len(x.shape)}.")
    x = ops.moveaxis(ops.cast(x, "float32"), axis, -1)  # (..., n)
    n = x.shape[-1]
    k = min(k, n)
    values, indices = top_k(x, k)  # (..., k), sorted by decreasing value
    # Simplex threshold tau = max_j (sum_{i<=j} v_i - 1) / j over the sorted
    # top-k values: the maximum sits at the support size of the projection.
    ranks = ops.arange(1, k + 1, dtype="float32")  # (k,)
    cumsum = ops.cumsum(values, axis=-1)  # (..., k)
    tau = ops.max((cumsum - 1.0) / ranks, axis=-1, keepdims=True)  # (..., 1)
    # Scatter relu(v - tau) back to the top-k positions (linear in k; the
    # indices are distinct, so ties at the k-th value never add entries).
    kept = ops.relu(values - tau)  # (..., k)
    projected = _scatter_last_axis(kept, indices, n)  # (..., n)
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
    k = check_positive_int(k, "k")
    num_steps = check_positive_int(num_steps, "num_steps")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    similarity = ops.convert_to_tensor(similarity)
    check_rank(similarity, 3, "similarity", "(groups, tokens, experts)")
    similarity = ops.cast(ops.stop_gradient(similarity), "float32")  # (G, S, E)
    num_tokens, num_experts = similarity.shape[1], similarity.shape[2]
    b = num_tokens / num_experts  # expert marginal (gamma = 1)
    # Expert-major layout, so each projection runs along the last axis.
    similarity_t = ops.transpose(similarity, (0, 2, 1))  # (G, E, S)

    def plan_t_at(alpha):
        """Transposed plan `P^T[j] = b * p_j` `(G, E, S)` at `alpha` `(G, S)`."""
        scaled = (alpha[:, None, :] + similarity_t) / b  # (G, E, S)
        return b * ksparse_simplex_projection(scaled, k)  # (G, E, S)

    def adam_step(step, state):
        """One bias-corrected Adam step on the semi-dual objective."""
        alpha, m, v = state  # each (G, S)
        grad = ops.sum(plan_t_at(alpha), axis=1) - 1.0  # (G, S): rowsum(P) - 1
        m = _ADAM_BETA_1 * m + (1.0 - _ADAM_BETA_1) * grad
        v = _ADAM_BETA_2 * v + (1.0 - _ADAM_BETA_2) * ops.square(grad)
        t = ops.cast(step + 1, "float32")
        m_hat = m / (1.0 - ops.power(_ADAM_BETA_1, t))
        v_hat = v / (1.0 - ops.power(_ADAM_BETA_2, t))
        alpha = alpha - learning_rate * m_hat / (ops.sqrt(v_hat) + _ADAM_EPSILON)
        return alpha, m, v

    zeros = ops.zeros_like(similarity[:, :, 0])  # (G, S)
    alpha, _, _ = ops.fori_loop(0, num_steps, adam_step, (zeros, zeros, zeros))
    plan = ops.transpose(plan_t_at(alpha), (0, 2, 1))  # (G, S, E)
    return ops.stop_gradient(plan)
