"""Entropic optimal transport (Sinkhorn) between tokens and experts.

Used by the Sinkhorn Token Choice and Sinkhorn Expert Choice routers
(ROUTERS.md, routers 2 and 4; Liu et al. 2024, https://arxiv.org/abs/2401.15969).
"""

import math

from keras import ops

from keras_vmoe.ot._checks import check_positive_float, check_positive_int, check_rank


def sinkhorn_plan(logits, num_iters=20, epsilon=1.0):
    """Entropic optimal-transport plan between tokens and experts.

    For each group, finds the plan `P = diag(u) K diag(v)` with kernel
    `K = exp(logits / epsilon)` whose token rows sum to 1 and whose expert
    columns sum to `S / E`. Starting from `u = v = 1`, each iteration first
    rescales the expert columns (`v = (S / E) / (K^T u)`) and then the token
    rows (`u = 1 / (K v)`), so the returned token rows sum to exactly 1; the
    columns approach `S / E` as the iterations grow. The iterations run in the
    log domain with `logsumexp` (same result, no overflow even for logits of
    magnitude 1e4) and always in float32. No gradient flows through the plan.

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
    num_iters = check_positive_int(num_iters, "num_iters")
    epsilon = check_positive_float(epsilon, "epsilon")
    logits = ops.convert_to_tensor(logits)
    check_rank(logits, 3, "logits", "(groups, tokens, experts)")
    scores = ops.cast(logits, "float32") / epsilon  # (G, S, E)
    num_tokens, num_experts = scores.shape[1], scores.shape[2]
    log_b = math.log(num_tokens / num_experts)  # log of expert marginal S / E

    def one_iteration(_, potentials):
        log_u, log_v = potentials  # (G, S), (G, E)
        # Expert update: log v_j = log b_j - logsumexp_i(log u_i + L_ij).
        log_v = log_b - ops.logsumexp(scores + log_u[:, :, None], axis=1)  # (G, E)
        # Token update: log u_i = log a_i - logsumexp_j(L_ij + log v_j), a = 1.
        log_u = -ops.logsumexp(scores + log_v[:, None, :], axis=2)  # (G, S)
        return log_u, log_v

    log_u = ops.zeros_like(scores[:, :, 0])  # (G, S)
    log_v = ops.zeros_like(scores[:, 0, :])  # (G, E)
    log_u, log_v = ops.fori_loop(0, num_iters, one_iteration, (log_u, log_v))
    # P_ij = exp(log u_i + L_ij + log v_j); as log u is the last token update,
    # this is exactly a softmax over experts, which keeps rows summing to 1
    # in float32 even when the log-potentials are huge.
    plan = ops.softmax(scores + log_v[:, None, :], axis=2)  # (G, S, E)
    return ops.stop_gradient(plan)
