"""Entropic optimal transport (Sinkhorn) between tokens and experts.

Used by the Sinkhorn Token Choice and Sinkhorn Expert Choice routers
(docs/routers.md, "Sinkhorn Token Choice"; Liu et al. 2024,
https://arxiv.org/abs/2401.15969).
"""

import math

from keras import ops

from keras_vmoe.utils.checks import check_positive_float, check_positive_int, check_rank

# Largest spread `max - min` of `logits / epsilon` within a group for which
# the kernel (multiplicative) form runs. With the kernel shifted so that its
# largest entry is 1, the Sinkhorn log-potentials stay within about the
# spread R of 0, so every kernel entry, scaling and partial sum stays inside
# float32's normal range (about e^-87 to e^88) for R <= 50, with room for
# log(group size) on top. Larger spreads use the log-domain iterations.
KERNEL_FORM_MAX_SPREAD = 50.0


def _kernel_form_plan(scores, num_iters, log_b):
    """Sinkhorn with the kernel `exp(scores)`: one `exp`, then scalings only.

    Args:
        scores: float32 tensor `(G, S, E)`, `logits / epsilon`, with a small
            spread in every group (see `KERNEL_FORM_MAX_SPREAD`).
        num_iters: int. Sinkhorn iterations.
        log_b: float. Log of the expert marginal `S / E`.

    Returns:
        float32 tensor `(G, S, E)`: the plan.
    """
    # Shifting by the group maximum changes only the (cancelling) scale of
    # the scalings u, v; the largest kernel entry is 1.
    top = ops.max(scores, axis=(1, 2), keepdims=True)  # (G, 1, 1)
    kernel = ops.exp(scores - top)  # (G, S, E), entries in (e^-50, 1]
    b = math.exp(log_b)

    # The sums are elementwise products and reductions, not einsums: a
    # float32 matmul may run in TF32 (GPU) or bfloat16 passes (TPU) by
    # default, far from float32 rounding.
    def one_iteration(_, u):
        # Expert update v_j = b / sum_i K_ij u_i, then token update
        # u_i = 1 / sum_j K_ij v_j.
        v = b / ops.sum(kernel * u[:, :, None], axis=1)  # (G, E)
        return 1.0 / ops.sum(kernel * v[:, None, :], axis=2)  # (G, S)

    u = ops.ones_like(scores[:, :, 0])  # (G, S)
    u = ops.fori_loop(0, num_iters - 1, one_iteration, u)
    # Last iteration: the expert update, then the token update folded into
    # a row normalisation, P_ij = K_ij v_j / sum_j K_ij v_j (as in the log
    # form's final softmax).
    v = b / ops.sum(kernel * u[:, :, None], axis=1)  # (G, E)
    scaled = kernel * v[:, None, :]  # (G, S, E)
    return scaled / ops.sum(scaled, axis=2, keepdims=True)  # (G, S, E)


def _log_domain_plan(scores, num_iters, log_b):
    """Sinkhorn in the log domain with `logsumexp`: no overflow for any spread.

    Args:
        scores: float32 tensor `(G, S, E)`, `logits / epsilon`.
        num_iters: int. Sinkhorn iterations.
        log_b: float. Log of the expert marginal `S / E`.

    Returns:
        float32 tensor `(G, S, E)`: the plan.
    """

    def one_iteration(_, log_v):
        # Token update: log u_i = log a_i - logsumexp_j(L_ij + log v_j), a = 1.
        log_u = -ops.logsumexp(scores + log_v[:, None, :], axis=2)  # (G, S)
        # Expert update: log v_j = log b_j - logsumexp_i(log u_i + L_ij).
        return log_b - ops.logsumexp(scores + log_u[:, :, None], axis=1)  # (G, E)

    # First expert update from log u = 0.
    log_v = log_b - ops.logsumexp(scores, axis=1)  # (G, E)
    log_v = ops.fori_loop(0, num_iters - 1, one_iteration, log_v)
    # P_ij = exp(log u_i + L_ij + log v_j); as log u is the last token update,
    # this is exactly a softmax over experts, which keeps rows summing to 1
    # in float32 even when the log-potentials are huge.
    return ops.softmax(scores + log_v[:, None, :], axis=2)  # (G, S, E)


def sinkhorn_plan(logits, num_iters=20, epsilon=1.0):
    """Entropic optimal-transport plan between tokens and experts.

    For each group, finds the plan `P = diag(u) K diag(v)` with kernel
    `K = exp(logits / epsilon)` whose token rows sum to 1 and whose expert
    columns sum to `S / E`. Starting from `u = v = 1`, each iteration first
    rescales the expert columns (`v = (S / E) / (K^T u)`) and then the token
    rows (`u = 1 / (K v)`), so the returned token rows sum to exactly 1; the
    columns approach `S / E` as the iterations grow. Always computed in
    float32; no gradient flows through the plan.

    Two exact forms of the same iterations: when every group's spread
    `max - min` of `logits / epsilon` is at most `KERNEL_FORM_MAX_SPREAD`
    (50), the kernel form (one `exp`, then each iteration two scalings and
    sums, fast); otherwise the log domain with `logsumexp` (no overflow
    even for logits of magnitude 1e4). Only one of them runs (`ops.cond`);
    they agree to float32 rounding.

    Reference: Cuturi, "Sinkhorn Distances", NeurIPS 2013
    (https://arxiv.org/abs/1306.0895); used as a router in
    https://arxiv.org/abs/2401.15969.

    Args:
        logits: tensor. Token-expert scores of shape `(G, S, E)` (groups,
            tokens per group, experts), any float dtype.
        num_iters: int. Number of Sinkhorn iterations (each one column then
            one row update). Defaults to 20.
        epsilon: float. Entropic regularisation; the kernel is
            `exp(logits / epsilon)`. Defaults to 1.0.

    Returns:
        float32 tensor of shape `(G, S, E)`: the transport plan, wrapped in
        `stop_gradient`.

    Example:

    >>> import numpy as np
    >>> plan = sinkhorn_plan(np.zeros((1, 4, 2), "float32"))
    >>> np.asarray(plan)[0, 0].tolist()
    [0.5, 0.5]
    """
    num_iters = check_positive_int("num_iters", num_iters)
    epsilon = check_positive_float("epsilon", epsilon)
    logits = ops.convert_to_tensor(logits)
    check_rank("logits", logits, 3, "(groups, tokens, experts)")
    scores = ops.stop_gradient(ops.cast(logits, "float32") / epsilon)  # (G, S, E)
    num_tokens, num_experts = scores.shape[1], scores.shape[2]
    log_b = math.log(num_tokens / num_experts)  # log of expert marginal S / E
    spread = ops.max(scores, axis=(1, 2)) - ops.min(scores, axis=(1, 2))  # (G,)
    # NaN or infinite spreads compare False: they take the log-domain form.
    kernel_safe = ops.all(spread <= KERNEL_FORM_MAX_SPREAD)  # ()
    plan = ops.cond(
        kernel_safe,
        lambda: _kernel_form_plan(scores, num_iters, log_b),
        lambda: _log_domain_plan(scores, num_iters, log_b),
    )  # (G, S, E)
    return ops.stop_gradient(plan)
